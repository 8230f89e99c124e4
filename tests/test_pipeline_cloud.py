"""A run's outputs in a bucket the Maou way (output_gcs / output_s3 keys), uploaded as each file is finalised, and
remote HCPE preprocessed through a cache smaller than the corpus, against moto's S3 server on 127.0.0.1 (started
here, stopped by its handle). The code under test reaches it only through AWS_ENDPOINT_URL_S3, as it reaches S3."""
import http.client
import http.server
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from maou_nb import cloud
from maou_nb.cloud import Mirror, ShardCache, upload_folder
from maou_nb.pipeline import load_params, materialise_inputs, output_provider, run_pipeline, start_mirror
from maou_nb.storage import ShardError, load_array, manifest_shards, read_json, read_manifest, write_json

_names = itertools.count()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback, AWS_ENDPOINT_URL_S3 pointing at it; yields the endpoint."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL_S3": "http://%s:%d" % server.get_host_and_port(), "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env["AWS_ENDPOINT_URL_S3"]
    server.stop()


def new_bucket() -> str:
    name = f"pc{next(_names):03d}-{os.getpid()}"
    cloud.backend("s3").client.create_bucket(Bucket=name)
    return name


def keys(uri: str) -> set[str]:
    """The keys below `uri`, relative to it (empty when there are none)."""
    r = cloud.parse_uri(uri)
    return {o.key[len(r.key) + 1:] for o in cloud.backend("s3").list(r.bucket, f"{r.key}/")}


# --- 1. Maou's output keys ---------------------------------------------------------------------------------------

def test_maou_output_keys_name_the_mirror_and_refuse_two_or_half_given(tmp_path):
    gcs = load_params({"steps": ["selfplay"], "output_gcs": True, "gcs_bucket_name": "my-runs", "gcs_base_path": "maou"})
    assert gcs["output_uri"] == "gs://my-runs/maou" and not {"output_gcs", "gcs_bucket_name"} & set(gcs)
    assert output_provider({"output_s3": True, "s3_bucket_name": "my-runs"}) == {"output_uri": "s3://my-runs"}
    for params, message in [
            ({"output_gcs": True, "gcs_bucket_name": "a-b", "output_s3": True, "s3_bucket_name": "c-d"},
             "output_gcs and output_s3 each say where the run is mirrored"),
            ({"output_uri": "s3://x-y/z", "output_gcs": True, "gcs_bucket_name": "a-b"}, "output_uri and output_gcs each say where"),
            ({"output_s3": True}, "output_s3: true needs s3_bucket_name"),
            ({"s3_bucket_name": "my-runs"}, "s3_bucket_name is given without output_s3"),
            ({"gcs_base_path": "runs"}, "gcs_base_path is given without output_gcs"),
            ({"output_gcs": "yes", "gcs_bucket_name": "a-b"}, "output_gcs='yes': give true"),
            ({"output_gcs": True, "gcs_bucket_name": "Not A Bucket"}, "not a cloud URI")]:
        with pytest.raises((ValueError, cloud.CloudError), match=message):   # a bad bucket name: parse_uri's CloudError
            output_provider(params)


def test_missing_client_for_the_output_warns_with_the_install_command_and_runs_locally(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "boto3", None)          # as if the aws extra were not installed
    monkeypatch.setattr(cloud, "_BACKENDS", {})
    params = load_params({"steps": ["selfplay"], "output_s3": True, "s3_bucket_name": "my-runs"})
    lines: list[str] = []
    assert start_mirror(tmp_path / "r1", params["output_uri"], lines.append) is None
    assert len(lines) == 1 and 'pip install "maou_nb[aws]"' in lines[0] and str(tmp_path / "r1") in lines[0]


# --- 2. uploads as each file is finalised, never blocking the writer ----------------------------------------------

class SlowFailingUploads(http.server.ThreadingHTTPServer):
    """A proxy on loopback in front of S3 that passes reads but refuses every upload (403) after `delay` seconds."""
    def __init__(self, upstream: str, delay: float):
        self.upstream, self.delay, self.uploads = upstream.removeprefix("http://"), delay, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        conn = http.client.HTTPConnection(self.server.upstream, timeout=10)
        conn.request("GET", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        self.server.uploads += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.server.delay)
        body = b"<Error><Code>AccessDenied</Code><Message>keys revoked mid-run</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


def test_failing_uploads_never_block_the_writer_and_are_reported(s3, tmp_path, monkeypatch):
    """Every upload hangs and then fails (the keys were revoked mid-run): the kit's writes still return at once, the
    local files are whole, and close() lists each failure."""
    uri = f"s3://{new_bucket()}/runs/r1"
    proxy = SlowFailingUploads(s3, delay=0.5)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:%d" % proxy.server_address[1])
        mirror = Mirror(tmp_path / "r1", uri, attempts=1, poll=0.02).start()
        seconds = []
        for i in range(4):
            t0 = time.perf_counter()
            write_json(tmp_path / "r1" / f"m{i}.json", {"step": i})
            seconds.append(time.perf_counter() - t0)
            time.sleep(0.1)                            # the mirror has queued it: its upload is under way
        assert max(seconds) < 0.1, seconds            # an upload in the writer's thread would take >= 0.5 s
        assert proxy.uploads >= 3                      # yet each was sent as it was written, not at close()
        failures = mirror.close(timeout=60)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert sorted(failures) == [f"m{i}.json" for i in range(4)] and "keys revoked" in failures["m0.json"]
    assert [read_json(tmp_path / "r1" / f"m{i}.json")["step"] for i in range(4)] == [0, 1, 2, 3]
    monkeypatch.undo()
    assert keys(uri) == set()


TRAIN = {"stage": "3", "preset": "small", "model_config": {"resnet_widths": [8, 8, 8, 8]}, "batch_size": 8,
         "epoch": 1, "max_steps": 6, "save_every": 1, "log_every": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """Real Stage 3 data: the kit's self-play (4 short games), split and merged by the library."""
    from maou_nb.preprocess import preprocess, split_hcpe
    from maou_nb.selfplay import play_games
    out = tmp_path_factory.mktemp("data")
    play_games(4, out / "selfplay", max_moves=40, workers=1, games_per_shard=1, progress=False)
    train, val = split_hcpe(out / "selfplay" / "hcpe", out / "split", test_ratio=0.5)
    for side, folder in (("train", train), ("val", val)):
        preprocess(folder, out / "preprocessed" / side)
    return out


def test_checkpoint_reaches_the_bucket_while_the_train_step_still_runs(s3, preprocessed, tmp_path, monkeypatch):
    """The train step's kernel writes checkpoints; each reaches the bucket (with its pointer) before the step ends,
    not at the scan after it. Mirrored by Maou's keys, output_s3 + s3_bucket_name + s3_base_path."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bucket, seen, stop = new_bucket(), {}, threading.Event()
    target = f"s3://{bucket}/maou/live"

    def watch():
        while not stop.is_set():
            listed = keys(target) - set(seen)
            now = time.time()   # keys first listed in the same poll share its time (a set has no upload order)
            for key in listed:
                seen[key] = now
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    params = {"name": "live", "steps": ["train"], "output_s3": True, "s3_bucket_name": bucket, "s3_base_path": "maou/",
              "train": {**TRAIN, "stage3_data": str(preprocessed / "preprocessed/train"),
                        "stage3_val_data": str(preprocessed / "preprocessed/val")}}
    try:
        run = run_pipeline(params, run_id="live", runs_root=str(tmp_path / "runs"), echo=lambda line: None)
    finally:
        stop.set()
        watcher.join()
    step_end = (run / "train.done.json").stat().st_mtime             # the notebook's last cell
    assert seen["checkpoints/last.pt"] < step_end and seen["checkpoints/latest.json"] < step_end, (seen, step_end)
    assert seen["checkpoints/latest.json"] >= seen["checkpoints/last.pt"]
    assert seen["metrics.jsonl"] < step_end and seen["stats.json"] < step_end
    assert {"notebooks/train.ipynb", "summary.md", "checkpoints/best.pt"} <= set(seen) | keys(target)
    pointer = json.loads(cloud.backend("s3").client.get_object(
        Bucket=bucket, Key="maou/live/checkpoints/latest.json")["Body"].read())
    assert pointer["size"] == (run / "checkpoints/last.pt").stat().st_size
    assert not (run / ".finalised.log").exists() and "MAOU_NB_FINALISED" not in os.environ


# --- 3. remote HCPE through a cache smaller than the corpus -------------------------------------------------------

def test_remote_hcpe_streams_through_a_cache_smaller_than_the_corpus(s3, preprocessed, tmp_path):
    """Four shards in S3, a cache that holds about one of them: the split, the merge and the Stage 2 data read the
    corpus a window at a time and write exactly what they write from the local copy; the cache stays under its cap."""
    from maou_nb.preprocess import make_stage2_data, preprocess, split_hcpe
    local = preprocessed / "selfplay" / "hcpe"
    uri = f"s3://{new_bucket()}/corpus/v1"
    upload_folder(local, uri)
    shard = max(p.stat().st_size + (p.with_name(p.stem + ".games.npy")).stat().st_size
                for p in local.glob("*.npy") if "." not in p.stem)
    arguments = {"root": str(tmp_path / "cache"), "max_workers": 2, "max_cached_bytes": int(shard * 1.5)}
    cache = ShardCache(**arguments)
    step = materialise_inputs("preprocess", {"hcpe_inputs": [uri], "test_ratio": 0.5}, cache, echo=lambda _: None)
    assert step == {"hcpe_inputs": [uri], "test_ratio": 0.5, "cache": {**arguments, "timeout": cache.timeout}}
    assert not (tmp_path / "cache").exists()                  # nothing copied before the step: it streams

    remote_train, _ = split_hcpe(uri, tmp_path / "remote-split", test_ratio=0.5, cache=step["cache"])
    local_train, _ = split_hcpe(local, tmp_path / "local-split", test_ratio=0.5)
    assert read_manifest(remote_train)["rows"] == read_manifest(local_train)["rows"] > 0
    def positions(folder):
        return np.concatenate([load_array(p) for p in manifest_shards(folder)])
    for fn, kind in ((preprocess, "preprocessed"), (make_stage2_data, "stage2")):
        cache = ShardCache(**arguments)
        fn(uri, tmp_path / f"remote-{kind}", memory_bytes=10_000, rows_per_shard=64, cache=cache)   # disk buckets
        fn(local, tmp_path / f"local-{kind}", rows_per_shard=64)                                  # in memory
        assert np.array_equal(positions(tmp_path / f"remote-{kind}"), positions(tmp_path / f"local-{kind}"))
        assert 0 < cache.cached_bytes() <= arguments["max_cached_bytes"] and cache.downloaded == 8   # 4 shards, 4 sidecars
    with pytest.raises(ShardError, match="do not fit in input_max_cached_bytes=100"):
        preprocess(uri, tmp_path / "tiny-cache", cache={**arguments, "max_cached_bytes": 100})
