"""Throughput of the local shard cache (maou_nb.cloud) from each emulator, started here on 127.0.0.1.

Synthetic input: `--shards` .npy shards of `--mb` MB each, uploaded to gcp-storage-emulator (GCS) and moto's
S3 server. Prints JSON per backend: shards/s and MB/s into an empty cache (cold, `--workers` parallel downloads,
each verified by size and MD5 and renamed into place), the seconds a second `materialise` takes when everything is
cached (warm: one listing, nothing downloaded), and for comparison the MB/s of reading the cached shards back
against reading the same shards from a local folder (best of 5, interleaved; the cached copy is a plain local file, so training on a
warm cache reads exactly what it reads locally).
"""
import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_all(folder: Path) -> float:
    t0 = time.perf_counter()
    for p in sorted(folder.glob("*.npy")):
        np.load(p, allow_pickle=False).sum()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    from gcp_storage_emulator.server import create_server
    from moto.server import ThreadedMotoServer
    port = _free_port()
    gcs = create_server("127.0.0.1", port, in_memory=True)
    gcs.start()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    os.environ.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}",
                      AWS_ENDPOINT_URL_S3="http://%s:%d" % s3.get_host_and_port(),
                      AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    from maou_nb.cloud import ShardCache, backend, upload_folder
    from maou_nb.storage import save_array
    tmp = Path(tempfile.mkdtemp())
    rows = int(args.mb * 1e6 / 8)
    for i in range(args.shards):
        save_array(tmp / "local" / f"part{i:04d}.npy", np.random.default_rng(i).integers(0, 1 << 60, rows))
    mb = sum(p.stat().st_size for p in (tmp / "local").glob("*.npy")) / 1e6
    out = {"shards": args.shards, "mb": round(mb, 1), "workers": args.workers}
    for scheme in ("gs", "s3"):
        b = backend(scheme)
        b.client.create_bucket("bench") if scheme == "gs" else b.client.create_bucket(Bucket="bench")
        upload_folder(tmp / "local", f"{scheme}://bench/corpus")
        cache = ShardCache(tmp / f"cache-{scheme}", max_workers=args.workers, max_cached_bytes=None)
        t0 = time.perf_counter()
        [local] = cache.materialise(f"{scheme}://bench/corpus")
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.materialise(f"{scheme}://bench/corpus")
        warm = time.perf_counter() - t0
        times = [(_read_all(tmp / "local"), _read_all(local)) for _ in range(5)]   # interleaved, best of 5
        read_local, read_cached = min(t[0] for t in times), min(t[1] for t in times)
        out[scheme] = {"cold_shards_per_s": round(args.shards / cold, 1), "cold_mb_per_s": round(mb / cold, 1),
                       "warm_seconds": round(warm, 3), "read_local_mb_per_s": round(mb / read_local, 1),
                       "read_cached_mb_per_s": round(mb / read_cached, 1)}
    gcs.stop()
    s3.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
