"""Peak memory of the preprocess step's work on remote HCPE as the input grows 1x, 2x, 4x (target: flat).

Usage: python benchmarks/preprocess_memory.py [--rows 50000] [--memory-mb 4] [--cache-shards 2] [--local]
Starts moto's S3 server on 127.0.0.1 and uploads 4 blocks of `--rows` random-game HCPE rows (distinct games, 8
shards each, game-id sidecars); the 1x, 2x and 4x corpora are the first 1, 2 and 4 blocks. Each step (split_hcpe,
preprocess, make_stage2_data) runs on each corpus in a fresh process, reading it from the bucket through a shard
cache that holds `--cache-shards` shards (so the 4x corpus streams through a cache of a fraction of its size),
with `--memory-mb` as the merge's `memory_bytes`. Prints one JSON line per run, with `peak_rss_mb` (VmHWM of that
process), and a last line with each step's peak at 4x over its peak at 1x. `--local` reads the same corpora from a
local folder instead (as a step reads them once they are all in the cache), with no cache argument, so the same
command also measures an older maou_nb (`PYTHONPATH=<its checkout>`).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCKS, SHARDS_PER_BLOCK = 4, 8
STEPS = ("split_hcpe", "preprocess", "make_stage2_data")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_step(step: str, uri: str, cache: dict | None, memory_bytes: int) -> dict:
    """Run one step on the corpus at `uri` (called in a fresh process) and measure it."""
    from maou_nb import preprocess as pp
    from maou_nb.storage import read_manifest
    out = Path(tempfile.mkdtemp()) / step
    shard_cache = None
    if cache is not None:
        from maou_nb.cloud import ShardCache
        shard_cache = ShardCache(**cache)
    through = {"cache": shard_cache} if shard_cache else {}
    start = time.perf_counter()
    if step == "split_hcpe":
        train, val = pp.split_hcpe(uri, out, 0.1, seed=0, **through)
        rows = read_manifest(train)["rows"] + read_manifest(val)["rows"]
    else:
        getattr(pp, step)(uri, out, memory_bytes=memory_bytes, rows_per_shard=4096, progress=False, **through)
        rows = read_manifest(out)["rows"]
    result = {"step": step, "seconds": round(time.perf_counter() - start, 2), "output_rows": rows}
    if shard_cache:
        result |= {"cache_cap_mb": round(cache["max_cached_bytes"] / 2**20, 2),
                   "cached_mb_after": round(shard_cache.cached_bytes() / 2**20, 2),
                   "objects_downloaded": shard_cache.downloaded}
    return {**result, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the 1x corpus")
    parser.add_argument("--memory-mb", type=float, default=4.0, help="the merge's memory_bytes, in MiB")
    parser.add_argument("--cache-shards", type=float, default=2.0, help="the cache's cap, in shards")
    parser.add_argument("--local", action="store_true", help="read local folders instead of the bucket")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    memory_bytes = int(args.memory_mb * 2**20)
    if args.step:
        print(json.dumps(run_step(args.step, args.uri, json.loads(args.cache) if args.cache else None, memory_bytes)),
              flush=True)
        return
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL_S3="http://%s:%d" % server.get_host_and_port(), AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    from maou_nb.cloud import backend, upload_folder
    from maou_nb.records import random_positions
    from maou_nb.storage import save_hcpe
    tmp = Path(tempfile.mkdtemp())
    backend("s3").client.create_bucket(Bucket="bench")
    for b in range(BLOCKS):                                  # distinct games per block: the output grows too
        hcpe, ids = random_positions(args.rows, seed=b, min_plies=10, max_plies=120)
        for s, (part, part_ids) in enumerate(zip(np.array_split(hcpe, SHARDS_PER_BLOCK),
                                                 np.array_split(ids + (b << 40), SHARDS_PER_BLOCK))):
            save_hcpe(tmp / "blocks" / f"block{b}-{s:02d}.npy", part, part_ids)
    shard_bytes = max(p.stat().st_size for p in (tmp / "blocks").glob("*.npy"))
    for scale in (1, 2, 4):
        folder = tmp / f"x{scale}"
        folder.mkdir()
        for p in (tmp / "blocks").glob("*.npy"):
            if int(p.name[5]) < scale:
                os.link(p, folder / p.name)
        upload_folder(folder, f"s3://bench/x{scale}")
    peaks = {}
    try:
        for step in STEPS:
            for scale in (1, 2, 4):
                cache = {"root": str(tmp / f"cache-{step}-{scale}"), "max_workers": 4,
                         "max_cached_bytes": int(args.cache_shards * shard_bytes * 1.3)}   # shard + sidecar
                source = str(tmp / f"x{scale}") if args.local else f"s3://bench/x{scale}"
                line = subprocess.run([sys.executable, __file__, "--step", step, "--uri", source,
                                       *([] if args.local else ["--cache", json.dumps(cache)]),
                                       "--memory-mb", str(args.memory_mb)],
                                      check=True, capture_output=True, text=True, env=os.environ).stdout.splitlines()[-1]
                size = sum(p.stat().st_size for p in (tmp / f"x{scale}").iterdir())
                result = {"scale": scale, "source": "local" if args.local else "s3", "input_rows": scale * args.rows,
                          "input_mb": round(size / 2**20, 2), "memory_mb": args.memory_mb, **json.loads(line)}
                peaks[(step, scale)] = result["peak_rss_mb"]
                print(json.dumps(result), flush=True)
    finally:
        server.stop()
    print(json.dumps({"peak_4x_over_1x": {s: round(peaks[(s, 4)] / peaks[(s, 1)], 3) for s in STEPS}}), flush=True)


if __name__ == "__main__":
    main()
