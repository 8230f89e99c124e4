"""Batch loading speed of the Stage 1/2/3 datasets from memory-mapped shards; prints one JSON line per stage.

Usage: python benchmarks/loading.py [--rows 200000] [--batch-size 4096] [--batches 50]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _data import write_hcpe_folder  # noqa: E402

from maou_nb.datasets import HcpeDataset, Stage1Dataset, Stage2Dataset, Stage3Dataset, make_loader  # noqa: E402
from maou_nb.preprocess import make_stage1_data, make_stage2_data, preprocess  # noqa: E402


def time_batches(ds, batch_size: int, n_batches: int, seed: int = 0) -> float:
    """Positions per second of `ds[random index array]` over `n_batches` batches."""
    rng = np.random.default_rng(seed)
    ds[rng.integers(len(ds), size=batch_size)]  # warm the page cache
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        ds[rng.integers(len(ds), size=batch_size)]
    n = n_batches * batch_size
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu_start)


def time_loader(ds, batch_size: int, n_batches: int, workers: int) -> float:
    """Positions per second through make_loader's DataLoader (shuffled, `workers` processes)."""
    loader, sampler = make_loader(ds, batch_size, shuffle=True, seed=0, workers=workers,
                            prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    it, seen = batches(), 0
    next(it)
    start = time.perf_counter()
    for _, batch in zip(range(n_batches), it):
        seen += len(batch["hand"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_hcpe_folder(tmp / "hcpe", args.rows)
        preprocess(tmp / "hcpe", tmp / "pre", rows_per_shard=args.rows // 3, progress=False)
        make_stage2_data(tmp / "hcpe", tmp / "stage2", rows_per_shard=args.rows // 3, progress=False)
        make_stage1_data(tmp / "stage1")
        datasets = {"stage1": Stage1Dataset(tmp / "stage1"), "stage2": Stage2Dataset(tmp / "stage2"),
                    "stage3": Stage3Dataset(tmp / "pre"),
                    "stage3_win_rate": Stage3Dataset(tmp / "pre", policy_target="win_rate"),
                    "hcpe": HcpeDataset(tmp / "hcpe")}
        for name, ds in datasets.items():
            n_batches = max(3, args.batches // 10) if name == "hcpe" else args.batches
            wall, cpu = time_batches(ds, args.batch_size, n_batches)
            print(json.dumps({
                "stage": name, "rows": len(ds), "shards": len(ds.paths), "batch_size": args.batch_size,
                "positions_per_s": round(wall), "positions_per_cpu_s": round(cpu),
                "loader_0_workers_positions_per_s": round(time_loader(ds, args.batch_size, n_batches, 0)),
                f"loader_{args.workers}_workers_positions_per_s": round(
                    time_loader(ds, args.batch_size, n_batches, args.workers)),
            }), flush=True)


if __name__ == "__main__":
    main()
