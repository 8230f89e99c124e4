"""gs:// and s3:// data paths, the local shard cache and the run mirror, against real servers on 127.0.0.1:
gcp-storage-emulator (GCS) and moto's S3 server, started here and stopped by their handles. The code under test
reaches them only through the clients' own endpoint variables, as it reaches the cloud."""
import hashlib
import http.client
import http.server
import itertools
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from maou_nb import cloud
from maou_nb.cloud import (CloudError, Mirror, ShardCache, check_uri, list_uri, read_hcpe_table, upload_file,
                           upload_folder, write_hcpe_table)
from maou_nb.storage import load_checkpoint, load_game_ids, load_hcpe, manifest_shards, save_array, write_manifest

ROOT = Path(__file__).resolve().parents[1]
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bigquery(servers):
    """bqemulator on loopback (REST and gRPC), in this process; yields the project with a dataset `maou`.
    Its engine loads DuckDB's spatial extension at start, which needs a download: skipped (no GEOGRAPHY here)."""
    from bqemulator.config import PersistenceMode, Settings
    from bqemulator.storage.engine import DuckDBEngine
    from bqemulator.testing._thread_runner import ThreadedEmulator
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DuckDBEngine, "_load_spatial", lambda self: None)
        mp.setenv("BQEMU_ENABLE_FORMAT_EXTENSIONS", "false")
        mp.setenv("BQEMU_WRITE_API_MAX_REQUEST_BYTES", str(256 << 20))
        server = ThreadedEmulator(Settings(persistence_mode=PersistenceMode.EPHEMERAL, rest_host="127.0.0.1",
                                           rest_port=0, grpc_host="127.0.0.1", grpc_port=0))
        server.start()
        try:
            mp.setenv("BIGQUERY_EMULATOR_HOST", server.server.rest_url)
            mp.setenv("BIGQUERY_STORAGE_EMULATOR_HOST", server.server.grpc_endpoint)
            cloud.bq_backend("test-project").client.create_dataset("maou")
            yield "test-project"
        finally:
            server.stop()


def new_bucket(scheme: str) -> str:
    """A fresh bucket on the server of `scheme`."""
    name = f"b{next(_names):03d}-{os.getpid()}"
    b = cloud.backend(scheme)
    b.client.create_bucket(name) if scheme == "gs" else b.client.create_bucket(Bucket=name)
    return name


def corpus(folder: Path, n: int = 3, rows: int = 1000) -> Path:
    """A data folder like the kit's: n .npy shards and a manifest."""
    for i in range(n):
        save_array(folder / f"part{i}.npy", np.arange(rows * i, rows * (i + 1), dtype=np.int64))
    write_manifest(folder, "hcpe", sorted(folder.glob("*.npy")), rows=n * rows)
    return folder


@pytest.fixture(params=["gs", "s3"])
def remote(request, servers, tmp_path):
    """(scheme, uri of an uploaded 3-shard corpus, its local source folder)."""
    scheme = request.param
    source = corpus(tmp_path / "source")
    uri = f"{scheme}://{new_bucket(scheme)}/corpus/v1"
    upload_folder(source, uri)
    return scheme, uri, source


def test_list_download_and_reuse(remote, tmp_path):
    scheme, uri, source = remote
    _, objects, is_folder = list_uri(uri)
    assert is_folder and sorted(Path(o.key).name for o in objects) == ["manifest.json", "part0.npy", "part1.npy", "part2.npy"]
    assert all(o.md5 == hashlib.md5((source / Path(o.key).name).read_bytes()).hexdigest() for o in objects)
    cache = ShardCache(tmp_path / "cache", max_workers=3, max_cached_bytes=None)
    [local] = cache.materialise(uri)
    assert [p.name for p in manifest_shards(local, "hcpe")] == ["part0.npy", "part1.npy", "part2.npy"]
    for p in source.iterdir():
        assert (local / p.name).read_bytes() == p.read_bytes()
    assert cache.downloaded == 4
    again = ShardCache(tmp_path / "cache", max_workers=3, max_cached_bytes=None)   # a later process, same disk
    assert again.materialise(uri) == [local] and again.downloaded == 0
    [one] = again.materialise(f"{uri}/part1.npy")                                  # a URI naming one object
    assert one == local / "part1.npy" and again.downloaded == 0


def test_changed_object_is_fetched_again(remote, tmp_path):
    scheme, uri, source = remote
    cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None)
    [local] = cache.materialise(uri)
    save_array(tmp_path / "v2.npy", np.full(5, 7))
    upload_file(tmp_path / "v2.npy", f"{uri}/part1.npy")      # same name, new bytes: a new generation / ETag
    cache.materialise(uri)
    assert cache.downloaded == 5
    assert np.load(local / "part1.npy", allow_pickle=False).tolist() == [7] * 5


def test_object_changed_mid_download_is_not_cached(remote, tmp_path):
    """The listing said one version; the server then holds another: the download is refused, nothing is left."""
    scheme, uri, source = remote
    r, objects, _ = list_uri(uri)
    info = next(o for o in objects if o.key.endswith("part0.npy"))
    save_array(tmp_path / "v2.npy", np.full(5, 7))
    upload_file(tmp_path / "v2.npy", f"{uri}/part0.npy")
    cache = ShardCache(tmp_path / "cache", max_workers=1, max_cached_bytes=None)
    dest = cache.local_path(r) / "part0.npy"
    with pytest.raises(CloudError, match="changed|does not match"):
        cache._fetch(r, info, dest)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


class CuttingProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy on loopback in front of a storage server that cuts every object download off half-way."""
    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        super().__init__(("127.0.0.1", 0), _CutHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _CutHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(self.server.upstream, timeout=10)
        conn.request(self.command, self.path, body, {k: v for k, v in self.headers.items() if k.lower() != "host"})
        resp = conn.getresponse()
        data = resp.read()
        media = "alt=media" in self.path or (self.command == "GET" and "?" not in self.path and self.path.count("/") >= 2)
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if media and len(data) > 100 else data)
        self.close_connection = True

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_truncated_download_never_cached_under_its_name(remote, tmp_path, monkeypatch, servers):
    scheme, uri, source = remote
    proxy = CuttingProxy(servers[scheme])
    try:
        monkeypatch.setenv(cloud.backend(scheme).env, "http://127.0.0.1:%d" % proxy.server_address[1])
        cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None, timeout=3)
        t0 = time.time()
        with pytest.raises(CloudError, match="part|manifest"):
            cache.materialise(uri)
        assert time.time() - t0 < 30
        leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != "index.json"]
        assert leftovers == []                   # no shard under its name, no temporary either
    finally:
        proxy.shutdown()
        proxy.server_close()
    monkeypatch.undo()                           # the real server again: the same cache now completes
    cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None)
    [local] = cache.materialise(uri)
    assert (local / "part2.npy").read_bytes() == (source / "part2.npy").read_bytes()


def test_eviction_keeps_the_cache_under_its_cap(servers, tmp_path):
    a, b = (f"s3://{new_bucket('s3')}/{name}" for name in ("a", "b"))
    upload_folder(corpus(tmp_path / "a"), a)
    upload_folder(corpus(tmp_path / "b"), b)
    one = sum(p.stat().st_size for p in (tmp_path / "a").iterdir())
    cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=int(one * 1.5))
    [la] = cache.materialise(a)
    [lb] = cache.materialise(b)                  # a is the least recently used: as much of it evicted as needed
    kept = len(list(la.iterdir()))
    assert 0 < kept < 4 and len(list(lb.iterdir())) == 4
    assert cache.cached_bytes() <= int(one * 1.5)
    cache.materialise(a)                         # a again: only what was evicted is downloaded
    assert cache.downloaded == 8 + 4 - kept and len(list(la.iterdir())) == 4 and len(list(lb.iterdir())) < 4
    with pytest.raises(CloudError, match="input_max_cached_bytes"):
        cache.materialise([a, b])                # both at once cannot fit: refused before downloading


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_unreachable_endpoint_is_a_clear_bounded_error(scheme, servers, monkeypatch):
    env = {"gs": "STORAGE_EMULATOR_HOST", "s3": "AWS_ENDPOINT_URL_S3"}[scheme]
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(env, dead)
    t0 = time.time()
    with pytest.raises(CloudError) as e:
        list_uri(f"{scheme}://somewhere/data", timeout=3)
    assert time.time() - t0 < 20
    assert dead.removeprefix("http://") in str(e.value) and env in str(e.value) and "cannot reach" in str(e.value)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_missing_bucket_and_prefix(scheme, servers):
    with pytest.raises(CloudError, match=r"train.stage3_data: .*bucket 'no-such-bucket' not found"):
        check_uri(f"{scheme}://no-such-bucket/data", "train.stage3_data")
    with pytest.raises(CloudError, match="no objects there"):
        check_uri(f"{scheme}://{new_bucket(scheme)}/nothing/here")


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)          # as if the aws extra were not installed
    monkeypatch.setattr(cloud, "_BACKENDS", {})
    with pytest.raises(CloudError, match=r'pip install "maou_nb\[aws\]"'):
        cloud.backend("s3")


def test_mirror_rerun_uploads_only_what_is_missing(servers, tmp_path):
    run = tmp_path / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"w" * 1000)
    (run / "stats.json").write_text("{}")
    (run / "summary.md").write_text("# r1")
    uri = f"s3://{new_bucket('s3')}/base/r1"
    first = Mirror(run, uri)
    assert first.close(timeout=60) == {} and sorted(first.uploaded) == ["checkpoints/last.pt", "stats.json", "summary.md"]
    b = cloud.backend("s3")
    bucket, key = uri[5:].split("/", 1)
    b.client.delete_object(Bucket=bucket, Key=f"{key}/stats.json")
    (run / "summary.md").write_text("# r1, rerun")
    second = Mirror(run, uri)
    assert second.close(timeout=60) == {} and sorted(second.uploaded) == ["stats.json", "summary.md"]
    pointer = b.client.get_object(Bucket=bucket, Key=f"{key}/checkpoints/latest.json")["Body"].read()
    assert hashlib.md5(b"w" * 1000).hexdigest().encode() in pointer


# --- whole pipeline runs: data in a bucket, outputs mirrored, a resume from the mirror --------------------------

TRAIN = {"stage": "3", "preset": "small", "model_config": {"resnet_widths": [8, 8, 8, 8]}, "batch_size": 16,
         "epoch": 1, "log_every": 1, "device": "cpu", "input_max_workers": 2}


@pytest.fixture(scope="module")
def hcpe(tmp_path_factory):
    """Real HCPE shards from the kit's own self-play (4 short games)."""
    from maou_nb.selfplay import play_games
    out = tmp_path_factory.mktemp("selfplay")
    play_games(4, out, max_moves=60, workers=1)
    return out / "hcpe"


def test_bigquery_writer_and_reader_round_trip(bigquery, hcpe, tmp_path):
    """HCPE shards -> a partitioned table -> the Storage Read API -> the same rows and game ids as local shards."""
    uri = f"bq://{bigquery}.maou.roundtrip"
    rows = write_hcpe_table(hcpe, uri, partition_date="2026-01-01", clustering_key="gameId")
    write_hcpe_table(hcpe, uri, partition_date="2026-01-02")
    assert check_uri(uri) == 2 * rows
    shards = sorted(p for p in hcpe.glob("*.npy") if "." not in p.stem)
    original = {(bytes(h["hcp"]), int(h["bestMove16"]), int(g)) for p in shards
                for h, g in zip(load_hcpe(p), load_game_ids(p))}
    cache = ShardCache(tmp_path / "cache", max_workers=1, max_cached_bytes=None, batch_size=40, partition_date="2026-01-01")
    [local] = cache.materialise(uri)
    read = manifest_shards(local, "hcpe")
    assert len(read) == -(-rows // 40) and all(len(load_hcpe(p)) <= 40 for p in read)
    assert {(bytes(h["hcp"]), int(h["bestMove16"]), int(g)) for p in read
            for h, g in zip(load_hcpe(p), load_game_ids(p))} == original
    assert cache.materialise(uri) == [local] and cache.downloaded == 1          # unchanged table: reused
    write_hcpe_table(shards[:1], uri, partition_date="2026-01-01")              # the table changed: read again
    cache.materialise(uri)
    assert cache.downloaded == 2 and sum(len(load_hcpe(p)) for p in manifest_shards(local, "hcpe")) > rows
    with pytest.raises(CloudError, match="no rows in partition 2030-01-01"):
        read_hcpe_table(uri, tmp_path / "empty", partition_date="2030-01-01")
    with pytest.raises(CloudError, match=r"train.stage3_data: .*table not found"):
        check_uri(f"bq://{bigquery}.maou.nothing", "train.stage3_data")


def _objects(uri: str) -> set[str]:
    r, objects, _ = list_uri(uri)
    return {o.key[len(r.key) + 1:] for o in objects}


def test_pipeline_reads_buckets_mirrors_and_resumes_from_the_mirror(servers, bigquery, hcpe, tmp_path, monkeypatch):
    from maou_nb.pipeline import load_params, run_pipeline
    from maou_nb.selfplay import play_games
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MAOU_NB_DATA_ROOT", str(tmp_path / "data-root"))
    gs_in, gs_out = f"gs://{new_bucket('gs')}/hcpe", f"gs://{new_bucket('gs')}/runs"
    upload_folder(hcpe, gs_in)
    bq_in = f"bq://{bigquery}.maou.more_games"                                   # two other games, from a table
    write_hcpe_table(play_games(2, tmp_path / "more", seed=7, max_moves=60, workers=1)[0].parent, bq_in)
    first = {"name": "cloud-first", "steps": ["preprocess", "train"], "output_uri": gs_out,
             "preprocess": {"hcpe_inputs": [gs_in, bq_in], "test_ratio": 0.5}, "train": {**TRAIN, "max_steps": 2}}
    assert load_params(first)["preprocess"]["hcpe_inputs"] == [gs_in, bq_in]   # a URI stays a URI
    lines: list[str] = []
    run1 = run_pipeline(first, run_id="first", runs_root=str(tmp_path / "machine1"), echo=lines.append)
    assert any("remote input(s)" in line for line in lines) and any("mirror complete" in line for line in lines)
    mirrored = _objects(f"{gs_out}/first")
    assert {"checkpoints/last.pt", "checkpoints/latest.json", "notebooks/preprocess.ipynb", "notebooks/train.ipynb",
            "stats.json", "metrics.jsonl", "summary.md", "params.yaml", "run.json"} <= mirrored
    assert any(k.startswith("logs/") and "tfevents" in k for k in mirrored) and not any(k.startswith("data/") for k in mirrored)
    split = sum(json.loads((run1 / "data" / "split" / side / "manifest.json").read_text())["rows"] for side in ("train", "val"))
    assert split == sum(len(load_hcpe(p)) for p in hcpe.glob("*.npy") if "." not in p.stem) + sum(
        len(load_hcpe(p)) for p in (tmp_path / "more" / "hcpe").glob("*.npy") if "." not in p.stem)
    stopped = load_checkpoint(run1 / "checkpoints" / "last.pt")
    assert stopped["global_step"] == 2

    # a fresh machine: training data from S3, the run to resume from in the GCS mirror, outputs mirrored to S3
    s3_data, s3_out = f"s3://{new_bucket('s3')}/preprocessed", f"s3://{new_bucket('s3')}/runs"
    upload_folder(run1 / "data" / "preprocessed", s3_data)
    second = {"name": "cloud-second", "steps": ["train", "export"], "output_uri": s3_out,
              "train": {**TRAIN, "stage3_data": f"{s3_data}/train", "stage3_val_data": f"{s3_data}/val",
                        "resume_from": f"{gs_out}/first"},
              "export": {"positions_data": f"{s3_data}/val", "verify_positions": 8, "fp16": False}}
    run2 = run_pipeline(second, run_id="second", runs_root=str(tmp_path / "machine2"), echo=lines.append)
    resumed = load_checkpoint(run2 / "checkpoints" / "last.pt")
    assert resumed["global_step"] > 2 and resumed["completed_stages"] == ["3"]
    assert {"checkpoints/last.pt", "checkpoints/latest.json", "models/model.onnx", "summary.md",
            "notebooks/export.ipynb"} <= _objects(f"{s3_out}/second")


def test_load_params_refuses_a_missing_remote_path_before_any_step(servers, tmp_path):
    from maou_nb.pipeline import load_params
    uri = f"gs://{new_bucket('gs')}/records"
    with pytest.raises(CloudError, match=r"convert.inputs: .*no objects there"):
        load_params({"steps": ["convert"], "convert": {"inputs": [uri]}})
    upload_file(ROOT / "tests" / "data" / "records" / "README.md", f"{uri}/README.md")
    assert load_params({"steps": ["convert"], "convert": {"inputs": [uri]}})["convert"]["inputs"] == [uri]
    with pytest.raises(CloudError, match="not a cloud URI"):
        load_params({"steps": ["convert"], "convert": {"inputs": [uri]}, "output_uri": "gs:/x"})


@pytest.mark.parametrize("name", ["gcs", "s3"])
def test_cloud_params_files_are_valid_against_an_emulator(name, servers, tmp_path):
    """The README's examples load as written once their buckets hold data; before, the first URI param is named."""
    from maou_nb.pipeline import find_params, load_params
    scheme = {"gcs": "gs", "s3": "s3"}[name]
    b = cloud.backend(scheme)
    with pytest.raises(CloudError, match=r"(hcpe_inputs|stage3_data|positions_data): .*(not found|no objects)"):
        load_params(find_params(f"cloud/{name}"))
    for bucket in ("my-shogi-data", "my-shogi-runs"):
        if not _exists(b, bucket):
            b.client.create_bucket(bucket) if scheme == "gs" else b.client.create_bucket(Bucket=bucket)
    (tmp_path / "x.npy").write_bytes(b"x")
    for prefix in ("hcpe/v1", "preprocessed/v1/train", "preprocessed/v1/val"):
        upload_file(tmp_path / "x.npy", f"{scheme}://my-shogi-data/{prefix}/x.npy")
    params = load_params(find_params(f"cloud/{name}"))
    assert params["output_uri"] == f"{scheme}://my-shogi-runs/maou"


def _exists(b, bucket: str) -> bool:
    try:
        b.list(bucket, "")
        return True
    except CloudError:
        return False


def test_bigquery_params_file_is_valid_against_the_emulator(bigquery, hcpe):
    from maou_nb.pipeline import find_params, load_params
    with pytest.raises(CloudError, match=r"preprocess.hcpe_inputs: .*not found"):
        load_params(find_params("cloud/bigquery"))
    cloud.bq_backend("my-project").client.create_dataset("shogi", exists_ok=True)
    write_hcpe_table(hcpe, "bq://my-project.shogi.hcpe", partition_date="2026-01-01")
    params = load_params(find_params("cloud/bigquery"))
    assert params["preprocess"]["hcpe_inputs"] == ["bq://my-project.shogi.hcpe"]
    assert params["train"]["input_partitioning_key_date"] == "2026-01-01"


def test_one_input_provider_per_data_path(servers, tmp_path):
    """Maou's provider keys name the Stage 3 data; two providers at once are refused naming both keys."""
    from maou_nb.pipeline import load_params
    bucket = new_bucket("s3")
    upload_folder(corpus(tmp_path / "c"), f"s3://{bucket}/pre/train")
    base = {"steps": ["train"], "train": {"stage": "3", "stage3_val_data": f"s3://{bucket}/pre/train"}}
    params = load_params({**base, "train": {**base["train"], "input_s3": {"bucket": bucket, "prefix": "pre/train"}}})
    assert params["train"]["stage3_data"] == f"s3://{bucket}/pre/train" and "input_s3" not in params["train"]
    with pytest.raises(ValueError, match="train.stage3_data and train.input_s3 each name the Stage 3 training data"):
        load_params({**base, "train": {**base["train"], "stage3_data": "data/x", "input_s3": {"bucket": bucket}}})
    with pytest.raises(ValueError, match="train.input_gcs and train.input_dataset_id"):
        load_params({**base, "train": {**base["train"], "input_gcs": {"bucket": bucket},
                                       "input_dataset_id": "p.d", "input_table_name": "t"}})


def test_output_uri_to_a_missing_bucket_stops_the_command_before_the_run_folder(servers, tmp_path, capsys):
    from maou_nb.cli import main
    code = main(["run", "tiny", "--runs-root", str(tmp_path / "runs"), "--output-uri", "gs://no-such-bucket/runs"])
    assert code == 2 and "bucket 'no-such-bucket' not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_server_gone_after_caching_fails_clearly_and_keeps_the_cache(remote, tmp_path, monkeypatch):
    """The server stops (here: its endpoint no longer answers) after a first run cached the data: the next
    materialise fails in bounded time naming the endpoint, and the cached shards stay whole."""
    scheme, uri, source = remote
    cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None, timeout=3)
    [local] = cache.materialise(uri)
    monkeypatch.setenv(cloud.backend(scheme).env, f"http://127.0.0.1:{free_port()}")
    t0 = time.time()
    with pytest.raises(CloudError, match="cannot reach"):
        cache.materialise(uri)
    assert time.time() - t0 < 20
    assert all((local / p.name).read_bytes() == p.read_bytes() for p in source.iterdir())
