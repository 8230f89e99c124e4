"""Throughput of the local shard cache (maou_nb.cloud) from each emulator, started here on 127.0.0.1.

Synthetic input: `--shards` .npy shards of `--mb` MB each, uploaded to gcp-storage-emulator (GCS) and moto's
S3 server. Prints JSON per backend: shards/s and MB/s into an empty cache (cold, `--workers` parallel downloads,
each verified by size and MD5 and renamed into place), the seconds a second `materialise` takes when everything is
cached (warm: one listing, nothing downloaded), and for comparison the MB/s of reading the cached shards back
against reading the same shards from a local folder (best of 5, interleaved; the cached copy is a plain local file, so training on a
warm cache reads exactly what it reads locally).

Then training samples/s (`--train-rounds` > 0): the same `train()` run (Stage 3, a small ResNet, `--train-steps`
steps of `--batch` on preprocessed shards of `--games` random cshogi games) on a local folder, on a gs:// copy read
through a cold cache (a fresh cache folder each round: listing, download, then training), through a warm cache
(everything cached: one listing, nothing downloaded) and streamed (`input_max_cached_bytes` half the data: the
shard window), in alternating order each round. `samples_per_s`: steps x batch / the run's wall time, start-up
(listing, downloads, model) included; `loop_samples_per_s`: the rate between the first and the last optimiser step
(the data path inside the loop). Best of the rounds (the machine is shared and noisy); `warm_vs_local` is the ratio
of the two best wall-time rates (the issue's target: >= 0.95).
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
    parser.add_argument("--train-rounds", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--games", type=int, default=60)
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
    if args.train_rounds:
        out["training"] = training(args, tmp)
    gcs.stop()
    s3.stop()
    print(json.dumps(out, indent=2))


def training(args, tmp: Path) -> dict:
    """Training samples/s on a local folder vs a gs:// copy through a cold cache, a warm cache and the shard window."""
    from maou_nb.cloud import upload_folder
    from maou_nb.preprocess import preprocess
    from maou_nb.records import random_games
    from maou_nb.storage import save_hcpe, write_manifest
    from maou_nb.train import train
    hcpe, ids = random_games(args.games, seed=0, min_plies=60, max_plies=120)
    save_hcpe(tmp / "hcpe" / "all.npy", hcpe, ids)
    write_manifest(tmp / "hcpe", "hcpe", [tmp / "hcpe" / "all.npy"], rows=len(hcpe))
    preprocess(tmp / "hcpe", tmp / "pre", rows_per_shard=max(1, len(hcpe) // 12), progress=False)
    upload_folder(tmp / "pre", "gs://bench/pre")
    size = sum(p.stat().st_size for p in (tmp / "pre").iterdir())
    base = {"stage": "3", "device": "cpu", "preset": "small", "model_config": {"resnet_widths": [16, 16, 16, 16]},
            "batch_size": args.batch, "epoch": 1, "max_steps": args.train_steps, "log_every": 10_000, "seed": 0,
            "input_max_workers": args.workers}
    modes = {"local": {"stage3_data": str(tmp / "pre")},
             "cold": {"stage3_data": "gs://bench/pre"},
             "warm": {"stage3_data": "gs://bench/pre", "input_local_cache_dir": str(tmp / "warm-cache")},
             "stream": {"stage3_data": "gs://bench/pre", "input_max_cached_bytes": size // 2}}
    train({**base, **modes["warm"], "out_dir": str(tmp / "prime"), "max_steps": 1}, progress=False)  # fills the warm cache
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    loop: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.train_rounds):
        names = list(modes)[r % len(modes):] + list(modes)[:r % len(modes)]   # alternate the order
        for m in names:
            extra = {"input_local_cache_dir": str(tmp / f"cache-{m}-{r}")} if m in ("cold", "stream") else {}
            stamps: list[float] = []
            t0 = time.perf_counter()
            train({**base, **modes[m], **extra, "out_dir": str(tmp / f"run-{m}-{r}")}, progress=False,
                  callback=lambda info: stamps.append(time.perf_counter()))
            seconds[m].append(time.perf_counter() - t0)
            loop[m].append((len(stamps) - 1) * args.batch / (stamps[-1] - stamps[0]))
    samples = args.train_steps * args.batch
    rate = {m: round(samples / min(t), 1) for m, t in seconds.items()}
    return {"rows": len(hcpe), "data_mb": round(size / 1e6, 2), "shards": len(list((tmp / "pre").glob("*[0-9].npy"))),
            "batch": args.batch, "steps": args.train_steps, "rounds": args.train_rounds,
            "samples_per_s": rate, "loop_samples_per_s": {m: round(max(v), 1) for m, v in loop.items()},
            "seconds": {m: [round(x, 2) for x in t] for m, t in seconds.items()},
            "warm_vs_local": round(rate["warm"] / rate["local"], 3), "cold_vs_local": round(rate["cold"] / rate["local"], 3),
            "stream_vs_local": round(rate["stream"] / rate["local"], 3)}


if __name__ == "__main__":
    main()
