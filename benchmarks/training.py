"""Training-step throughput: a full Stage 3 step (forward, loss, backward, clip, optimiser, schedule) per backbone
at its default and small size, fed from real preprocessed shards through the engine's DataLoader versus the
same step on a batch already in memory (ratio must be <= 1.10), plus Stage 2 steps. Prints JSON.

Usage: python benchmarks/training.py [--batch-size 64] [--steps 4] [--device auto] [--data DIR] [--models resnet,vit]
Without --data it makes real data: seeded random cshogi games -> HCPE -> preprocess / make_stage2_data.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from maou_nb.model import build_train_model
from maou_nb.settings import resolve_device
from maou_nb.config import TrainConfig
from maou_nb.train import TrainRun, seed_everything, stage_trainer


def make_data(root: Path, n_games: int, seed: int = 0) -> tuple[Path, Path]:
    """Preprocessed and Stage 2 folders from seeded random legal games."""
    from maou_nb.preprocess import make_stage2_data, preprocess
    from maou_nb.records import random_games
    from maou_nb.storage import save_hcpe, write_manifest
    hcpe, ids = random_games(n_games, seed, branching=None, min_plies=40, max_plies=120)
    save_hcpe(root / "hcpe" / "games.npy", hcpe, ids)
    write_manifest(root / "hcpe", "hcpe", [root / "hcpe" / "games.npy"], rows=len(hcpe))
    preprocess(root / "hcpe", root / "pre", progress=False)
    make_stage2_data(root / "hcpe", root / "stage2", progress=False)
    return root / "pre", root / "stage2"


@contextmanager
def temporary_data(n_games: int) -> Iterator[tuple[Path, Path]]:
    """A temporary folder with `make_data`'s folders in its `data/`: yields (the folder, the preprocessed folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        yield tmp, make_data(tmp / "data", n_games)[0]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(stage: str, data: Path, model: str, preset: str | None, batch_size: int, steps: int, device: str,
               out: Path, rounds: int = 3, warmup: int = 2) -> dict:
    """Samples/s of the engine's full training step on real shards and on an in-memory batch."""
    c = TrainConfig(stage=stage, **{f"stage{stage}_data": str(data)}, model=model, preset=preset,
                    batch_size=batch_size, device=device, out_dir=str(out), log_every=10**9, save_every=0)
    seed_everything(0)
    net = build_train_model(model, [stage], preset=preset).to(device)
    params = sum(p.numel() for p in net.parameters())
    run = TrainRun(out, c)
    tr = stage_trainer(stage, c, net, run.log, device, progress=False)

    def step(batch):
        tr.backward(batch, 0)
        tr.optimizer_step()

    def real_batches():
        for epoch in range(10**6):
            yield from tr.epoch_batches(epoch)

    def timed(batches) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(next(batches))
        sync(device)
        return steps * batch_size / (time.perf_counter() - t0)

    real_iter = real_batches()
    memory = {k: v.clone() for k, v in next(real_iter).items()}
    memory_iter = iter(lambda: memory, None)
    for _ in range(warmup):                                 # warm both paths (allocator, optimiser state, caches)
        step(next(real_iter)); step(memory)
    rounds_real, rounds_memory = [], []
    for _ in range(rounds):                                 # alternate, so drifts hit both alike; report medians
        rounds_real.append(timed(real_iter))
        rounds_memory.append(timed(memory_iter))
    real, synthetic = float(np.median(rounds_real)), float(np.median(rounds_memory))
    run.log.close()
    return {"stage": stage, "model": model, "size": preset or "default", "parameters": params,
            "real_samples_per_s": round(real, 2), "in_memory_samples_per_s": round(synthetic, 2),
            "ratio_in_memory_over_real": round(synthetic / real, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating real / in-memory rounds (medians reported)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", help="root with pre/ and stage2/ folders (default: make them)")
    ap.add_argument("--games", type=int, default=60)
    ap.add_argument("--models", default="resnet,vit,mlp-mixer")
    ap.add_argument("--sizes", default="small,default")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pre, stage2 = ((Path(args.data) / "pre", Path(args.data) / "stage2") if args.data
                       else make_data(tmp / "data", args.games))
        results = []
        for model in args.models.split(","):
            for size in args.sizes.split(","):
                preset = None if size == "default" else size
                for stage, data in (("3", pre), ("2", stage2)):
                    results.append(throughput(stage, data, model, preset, args.batch_size, args.steps, device,
                                              tmp / f"run-{model}-{size}-{stage}", rounds=args.rounds))
    stage3 = [r for r in results if r["stage"] == "3"]
    print(json.dumps({"benchmark": "training", "device": device,
                      "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
                      "results": results,
                      "max_ratio_stage3": max(r["ratio_in_memory_over_real"] for r in stage3),
                      "ratio_ok": all(r["ratio_in_memory_over_real"] <= 1.10 for r in stage3)}, indent=1))


if __name__ == "__main__":
    main()
