"""Does a speed lever change learning? The engine's Stage 3 loss curve over the first few hundred steps, per lever,
on the same real data, seed and schedule: window means of the training loss and the final validation figures.
Prints JSON.

Usage: python benchmarks/step_learning.py [--steps 300] [--batch 64] [--size small] [--variants kit,channels_last,bf16]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import SIZES, VARIANTS  # noqa: E402
from training import temporary_data  # noqa: E402

from maou_nb.train import train


def curve(data: Path, size: str, batch: int, steps: int, overrides: dict, out: Path) -> dict:
    """Training losses of `steps` steps and the validation metrics at the end."""
    arch, preset, model_config = SIZES[size]
    losses = []
    result = train({"stage": "3", "stage3_data": str(data), "model": arch, "preset": preset, "model_config": model_config,
                    "batch_size": batch, "device": "cpu", "out_dir": str(out), "epoch": 50, "max_steps": steps,
                    "log_every": 10**9, **overrides}, progress=False, callback=lambda info: losses.append(info["loss"]))
    return {"losses": losses, "stopped": result.stopped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", default="small")
    ap.add_argument("--variants", default="kit,channels_last,bf16,channels_last+bf16")
    ap.add_argument("--games", type=int, default=200)
    ap.add_argument("--window", type=int, default=50)
    args = ap.parse_args()
    with temporary_data(args.games) as (tmp, pre):
        curves = {v: curve(pre, args.size, args.batch, args.steps, VARIANTS[v], tmp / v)["losses"]
                  for v in args.variants.split(",")}
    base = np.array(curves["kit"])
    w = args.window
    out = {}
    for v, losses in curves.items():
        x = np.array(losses)
        out[v] = {"window_means": [round(float(x[i:i + w].mean()), 4) for i in range(0, len(x), w)],
                  "max_abs_diff_vs_kit": round(float(np.abs(x - base).max()), 4),
                  "mean_diff_vs_kit_last_window": round(float(x[-w:].mean() - base[-w:].mean()), 4)}
    # noise floor: how much the fp32 curve itself moves between consecutive windows at the end
    noise = float(np.std([base[i:i + w].mean() for i in range(len(base) - 3 * w, len(base), w)]))
    print(json.dumps({"benchmark": "step_learning", "size": args.size, "batch": args.batch, "steps": args.steps,
                      "window": w, "fp32_window_noise_std": round(noise, 4), "curves": out}, indent=1))


if __name__ == "__main__":
    main()
