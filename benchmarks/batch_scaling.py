"""Larger batches with the learning rate scaled: the engine's Stage 3 step speed per batch size (samples per
CPU-second, alternating rounds), and what a run learns at equal samples seen with `lr_scaling` none / linear / sqrt
(the validation losses after the same epochs of the same real data). Prints JSON.

Usage: python benchmarks/batch_scaling.py [--size maou] [--batches 256,1024,2048] [--learn-size small]
       [--learn 256:none,1024:none,1024:linear,1024:sqrt] [--epochs 3] [--games 200] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import SIZES, KitStep  # noqa: E402
from training import temporary_data  # noqa: E402

from maou_nb.train import train


def speed(data: Path, size: str, batches: list[int], rounds: int, steps: int, tmp: Path) -> dict:
    """Samples per CPU-second (and wall samples/s) of the default engine step at each batch, in alternating rounds."""
    kits = {b: KitStep(data, size, b, {}, tmp / f"speed-{b}") for b in batches}
    for k in kits.values():
        k.steps(1)                                                       # warm-up
    cpu, wall = {b: [] for b in batches}, {b: [] for b in batches}
    for _ in range(rounds):
        for b, k in kits.items():
            w, c, _ = k.steps(steps)
            cpu[b].append(steps * b / c)
            wall[b].append(steps * b / w)
    base = float(np.median(cpu[batches[0]]))
    return {str(b): {"samples_per_cpu_s": round(float(np.median(cpu[b])), 1),
                     "vs_first": round(float(np.median(cpu[b])) / base, 2),
                     "wall_samples_per_s": round(float(np.median(wall[b])), 1)} for b in batches}


def learn(data: Path, size: str, batch: int, scaling: str, epochs: int, out: Path) -> dict:
    """Validation figures after `epochs` epochs at `batch` with `lr_scaling=scaling` (reference batch 256)."""
    arch, preset, model_config = SIZES[size]
    losses = []
    result = train({"stage": "3", "stage3_data": str(data), "model": arch, "preset": preset, "model_config": model_config,
                    "batch_size": batch, "device": "cpu", "out_dir": str(out), "epoch": epochs, "log_every": 10**9,
                    "lr_scaling": scaling, "lr_reference_batch": 256}, progress=False,
                   callback=lambda info: losses.append((info["loss"], info["lr"])))
    m = result.stages["3"]["metrics"]
    return {"steps": result.stages["3"]["steps"], "peak_lr": round(max(lr for _, lr in losses), 6),
            "seconds": result.stages["3"]["seconds"], "val_loss": round(m["loss"], 4),
            "val_policy_loss": round(m["policy_loss"], 4), "val_value_loss": round(m["value_loss"], 4),
            "val_top1": round(m["top1"], 4), "last_train_loss": round(losses[-1][0], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="maou")
    ap.add_argument("--batches", default="256,1024,2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--learn-size", default="small")
    ap.add_argument("--learn", default="256:none,1024:none,1024:linear,1024:sqrt")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--games", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with temporary_data(args.games) as (tmp, pre):
        out = {"benchmark": "batch_scaling", "threads": torch.get_num_threads()}
        if args.batches:
            out["speed"] = {"size": args.size, "by_batch": speed(pre, args.size, [int(b) for b in args.batches.split(",")],
                                                                 args.rounds, args.steps, tmp)}
        if args.learn:
            out["learning"] = {"size": args.learn_size, "epochs": args.epochs, "runs": {
                spec: learn(pre, args.learn_size, int(spec.split(":")[0]), spec.split(":")[1], args.epochs, tmp / spec)
                for spec in args.learn.split(",")}}
        out["load_average_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
