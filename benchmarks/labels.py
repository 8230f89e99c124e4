"""Throughput of the batch encodings in maou_nb.encoding on positions reached by seeded random play.

Prints JSON: positions per second (best of `--repeats`) for encode_hcps, legal_moves_labels (Stage 2
label generation, target >= 50,000 positions/s on one core) and reachable_squares_labels (Stage 1).

    python benchmarks/labels.py [--positions 50000] [--repeats 3] [--seed 0]
"""
import argparse
import json
import os
import platform
import time

import cshogi
import numpy as np

from maou_nb.encoding import encode_hcps, legal_moves_labels, reachable_squares_labels
from maou_nb.records import random_positions

STAGE2_TARGET = 50_000  # positions/s for legal_moves_labels on one core


def random_play_hcps(n: int, seed: int) -> np.ndarray:
    """HuffmanCodedPos records of `n` positions of long seeded random games (`maou_nb.records.random_positions`)."""
    out = np.empty(n, cshogi.HuffmanCodedPos)
    out["hcp"] = random_positions(n, seed)[0]["hcp"]
    return out


def positions_per_second(fn, hcps: np.ndarray, repeats: int) -> float:
    """Best-of-`repeats` throughput of `fn(hcps)`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(hcps)
        best = min(best, time.perf_counter() - start)
    return len(hcps) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hcps = random_play_hcps(args.positions, args.seed)
    speeds = {fn.__name__: round(positions_per_second(fn, hcps, args.repeats))
              for fn in (encode_hcps, legal_moves_labels, reachable_squares_labels)}
    print(json.dumps({
        "positions": len(hcps),
        "positions_per_s": speeds,
        "stage2_target_positions_per_s": STAGE2_TARGET,
        "stage2_meets_target": speeds["legal_moves_labels"] >= STAGE2_TARGET,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
