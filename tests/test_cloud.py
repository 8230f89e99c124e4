"""gs:// and s3:// data paths, the local shard cache and the run mirror, against real servers on 127.0.0.1:
gcp-storage-emulator (GCS) and moto's S3 server, started here and stopped by their handles. The code under test
reaches them only through the clients' own endpoint variables, as it reaches the cloud."""
import hashlib
import http.client
import http.server
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from maou_nb import cloud
from maou_nb.cloud import CloudError, Mirror, ShardCache, check_uri, list_uri, upload_file, upload_folder
from maou_nb.storage import (HCPE_DTYPE, load_game_ids, load_hcpe, manifest_shards, save_array, save_hcpe, sidecar_path,
                             write_manifest)

from cloud_servers import corpus, free_port, new_bucket, servers  # noqa: F401 (servers: a fixture)

ROOT = Path(__file__).resolve().parents[1]


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
    """An HTTP proxy on loopback in front of a storage server that cuts every object download off half-way;
    `ranges` records the Range header of each object download it forwards (None: from the first byte)."""
    def __init__(self, upstream: str):
        self.upstream, self.ranges = upstream.removeprefix("http://"), []
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
        if media:
            self.server.ranges.append(self.headers.get("Range"))
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if media and len(data) > 100 else data)
        self.close_connection = True

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def _partials(cache: Path) -> dict[str, bytes]:
    """{shard name: bytes} of the partial downloads in the cache; fails if a shard is there under its own name."""
    assert not list(cache.rglob("part*.npy"))            # no shard under its own name
    return {p.name[1:].rsplit(".", 2)[0]: p.read_bytes() for p in cache.rglob(".*.partial")}


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_cut_download_resumes_with_a_ranged_request_and_is_never_cached_under_its_name(scheme, tmp_path, monkeypatch, servers):
    """A download cut off part-way keeps its bytes aside (never under the shard's name); the next attempt asks only
    for the rest, and the whole file is verified; an object changed between attempts starts again from zero.
    (Shards of 320 kB: the clients write what they received in chunks of some kB.)"""
    source, uri = corpus(tmp_path / "source", n=2, rows=40_000), f"{scheme}://{new_bucket(scheme)}/big"
    upload_folder(source, uri)
    proxy = CuttingProxy(servers[scheme])
    try:
        monkeypatch.setenv(cloud.backend(scheme).env, "http://127.0.0.1:%d" % proxy.server_address[1])
        cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None, timeout=2)
        shards = [f"{uri}/part{i}.npy" for i in range(2)]    # one at a time: a first failure cancels the others
        t0 = time.time()
        for shard in shards:
            with pytest.raises(CloudError, match=r"part\d.npy: .*Nothing was cached under its name; the \d+ of \d+ bytes"):
                cache.materialise(shard)
        assert time.time() - t0 < 30
        first = _partials(tmp_path / "cache")
        assert sorted(first) == ["part0.npy", "part1.npy"]
        for name, got in first.items():                     # what came is a true prefix of the object
            assert 0 < len(got) < len((source / name).read_bytes()) and (source / name).read_bytes().startswith(got)
        proxy.ranges.clear()
        for shard in shards:
            with pytest.raises(CloudError):
                cache.materialise(shard)                    # cut again, but it asked only for the rest
        assert {f"bytes={len(got)}-" for got in first.values()} <= set(proxy.ranges)
        assert all(len(_partials(tmp_path / "cache")[n]) > len(got) for n, got in first.items())
    finally:
        proxy.shutdown()
        proxy.server_close()
    monkeypatch.undo()                                          # the real server again: the same cache now completes
    save_array(tmp_path / "v2.npy", np.arange(40_000, 80_000, dtype=np.int64) * 3)
    upload_file(tmp_path / "v2.npy", f"{uri}/part1.npy")      # changed between attempts: its old bytes are useless
    cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None)
    [local] = cache.materialise(uri)
    assert (local / "part0.npy").read_bytes() == (source / "part0.npy").read_bytes()
    assert (local / "part1.npy").read_bytes() == (tmp_path / "v2.npy").read_bytes()
    assert not list((tmp_path / "cache").rglob("*.partial"))    # each resumed or restarted, then renamed into place


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


def _synthetic_preprocessed(folder: Path, shards: int = 5, rows: int = 40) -> Path:
    """A preprocessed data folder as preprocess writes it (ShardWriter: shards and their .moves.npy), random rows."""
    from maou_nb.preprocess import MOVE_DTYPE, POSITION_DTYPE, ShardWriter
    rng, n = np.random.default_rng(0), shards * rows
    pos = np.zeros(n, POSITION_DTYPE)
    pos["hcp"], pos["board"], pos["hand"] = rng.integers(0, 256, (n, 32)), rng.integers(0, 30, (n, 9, 9)), rng.integers(0, 3, (n, 14))
    pos["count"], pos["value"], pos["move_count"] = rng.integers(1, 9, n), rng.random(n), rng.integers(1, 4, n)
    pos["move_start"] = np.cumsum(pos["move_count"]) - pos["move_count"]
    moves = np.zeros(int(pos["move_count"].sum()), MOVE_DTYPE)
    moves["label"], moves["count"] = rng.integers(0, 1496, len(moves)), rng.integers(1, 5, len(moves))
    moves["wins"] = moves["count"] * rng.random(len(moves))
    writer = ShardWriter(folder, rows)
    writer.add(pos, moves)
    writer.flush()
    write_manifest(folder, "preprocessed", writer.shards, rows=writer.rows)
    return folder


def _synthetic_hcpe(folder: Path, shards: int = 4, rows: int = 30) -> Path:
    """An HCPE data folder: every other shard with a game-id sidecar, the others with none (one id per shard)."""
    rng, paths = np.random.default_rng(1), []
    for i in range(shards):
        h = np.zeros(rows, HCPE_DTYPE)
        h["hcp"], h["eval"] = rng.integers(0, 256, (rows, 32)), rng.integers(-999, 999, rows)
        paths.append(save_hcpe(folder / f"part{i}.npy", h, rng.integers(0, 1 << 40, rows) if i % 2 == 0 else None))
    write_manifest(folder, "hcpe", paths, rows=shards * rows)
    return folder


def test_bundling_packs_small_shards_and_reads_back_the_same_rows(servers, tmp_path):
    """Small remote shards become a few local bundles (a manifest of the same kind listing them) that read back as the
    same rows in the same order: Stage 3 targets from the moves, HCPE game ids; reused, and evicted a bundle at a time."""
    from maou_nb.datasets import Stage3Dataset
    bucket = new_bucket("s3")
    pre, hcpe = _synthetic_preprocessed(tmp_path / "pre"), _synthetic_hcpe(tmp_path / "hcpe")
    pre_uri, hcpe_uri = f"s3://{bucket}/pre", f"s3://{bucket}/hcpe"
    upload_folder(pre, pre_uri)
    upload_folder(hcpe, hcpe_uri)
    one = sum(p.stat().st_size for p in pre.glob("positions-00000*.npy"))         # a shard and its moves
    cache = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None, bundle_bytes=int(2.5 * one))
    [view] = cache.materialise(pre_uri)
    bundles = manifest_shards(view, "preprocessed")
    assert [p.name[:12] for p in bundles] == ["bundle-00000", "bundle-00001", "bundle-00002"] and cache.downloaded == 10
    assert sorted(p.name for p in view.iterdir()) == sorted([p.name for p in bundles] + [
        p.name.replace(".npy", ".moves.npy") for p in bundles] + ["manifest.json"])              # nothing else is left
    mine, theirs = Stage3Dataset(pre), Stage3Dataset(view)
    a, b = mine.batch(np.arange(len(mine))), theirs.batch(np.arange(len(theirs)))
    assert len(theirs) == len(mine) == 200 and all(np.array_equal(a[k], b[k]) for k in a)     # same rows, same order
    [hview] = cache.materialise(hcpe_uri)
    source, packed = manifest_shards(hcpe, "hcpe"), manifest_shards(hview, "hcpe")
    assert len(packed) == 1 and load_hcpe(packed[0]).tobytes() == np.concatenate([load_hcpe(p) for p in source]).tobytes()
    assert np.array_equal(load_game_ids(packed[0]), np.concatenate([load_game_ids(p) for p in source]))
    before = cache.downloaded
    cache.materialise([pre_uri, hcpe_uri])                                         # cached: nothing fetched again
    assert cache.downloaded == before
    packed_bytes = [p.read_bytes() for p in bundles]
    capped = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=cache.cached_bytes() - 1, bundle_bytes=int(2.5 * one))
    capped.materialise(hcpe_uri)                 # one least recently used bundle goes, with its moves; the others stay
    [gone] = [p for p in bundles if not p.is_file()]
    assert not sidecar_path(gone, "moves").exists() and all(sidecar_path(p, "moves").is_file() for p in bundles if p != gone)
    capped.materialise(pre_uri)                  # only that bundle's shards (and their moves) are fetched again
    assert capped.downloaded == (4 if gone != bundles[2] else 2) and [p.read_bytes() for p in bundles] == packed_bytes
    changed = np.load(pre / "positions-00004.npy", allow_pickle=False)
    changed["value"] = 0.25
    save_array(pre / "positions-00004.npy", changed)
    upload_file(pre / "positions-00004.npy", f"{pre_uri}/positions-00004.npy")   # the last bundle's member changed
    again = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None, bundle_bytes=int(2.5 * one))
    now = manifest_shards(again.materialise(pre_uri)[0], "preprocessed")
    assert again.downloaded == 2 and now[:2] == bundles[:2] and now[2] != bundles[2] and not bundles[2].exists()
    assert np.array_equal(Stage3Dataset(view).batch(np.arange(200))["value"], Stage3Dataset(pre).batch(np.arange(200))["value"])


def test_bundling_knobs_reach_the_cache(tmp_path):
    from maou_nb.pipeline import input_cache
    on = {"train": {"input_enable_bundling": True, "input_bundle_size_gb": 0.5, "input_local_cache_dir": str(tmp_path)}}
    assert input_cache(on).bundle_bytes == 500_000_000 and input_cache({**on, "train": {}}).bundle_bytes is None


def _moto_auth(endpoint: str, after: str) -> None:
    """Make moto's server enforce authentication after `after` more requests ("0": now, "inf": never), through its
    /moto-api/reset-auth endpoint: the server-mode form of its INITIAL_NO_AUTH_ACTION_COUNT setting."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=after.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


def test_refused_s3_credentials_are_a_clear_error_before_any_step(servers, tmp_path, monkeypatch):
    """Keys the server does not know, and a profile that does not exist, each stop the run's up-front check with the
    URI, the endpoint, the credential settings and the fix."""
    from maou_nb.pipeline import load_params
    uri = f"s3://{new_bucket('s3')}/pre/train"
    upload_folder(corpus(tmp_path / "c"), uri)
    params = {"steps": ["train"], "train": {"stage": "3", "stage3_data": uri, "stage3_val_data": uri}}
    _moto_auth(servers["s3"], "0")
    try:
        with pytest.raises(CloudError) as e:
            load_params(params)
    finally:
        _moto_auth(servers["s3"], "inf")
    for part in ("train.stage3_data", uri, servers["s3"], "were refused", "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"):
        assert part in str(e.value), (part, str(e.value))
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(CloudError, match=r"train.stage3_data: s3://.*AWS_PROFILE='no-such-profile' names no profile"):
        load_params(params)


@pytest.mark.parametrize("key", ["malformed", "missing"])
def test_unusable_gcs_credentials_are_a_clear_error_before_any_step(key, tmp_path, monkeypatch):
    """The real endpoint (no emulator variable) with a key file the client cannot use: refused by the client itself,
    before any request, naming the URI, the endpoint, GOOGLE_APPLICATION_CREDENTIALS and its value, and the fix."""
    from maou_nb.pipeline import load_params
    path = tmp_path / "key.json"
    if key == "malformed":
        path.write_text('{"type": "service_account", "private_key": ')
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    uri = "gs://my-shogi-data/preprocessed/v1/train"
    with pytest.raises(CloudError) as e:
        load_params({"steps": ["train"], "train": {"stage": "3", "stage3_data": uri, "stage3_val_data": uri}})
    for part in ("train.stage3_data", uri, "https://storage.googleapis.com", "DefaultCredentialsError", str(path),
                 "GOOGLE_APPLICATION_CREDENTIALS", "gcloud auth application-default login"):
        assert part in str(e.value), (part, str(e.value))
