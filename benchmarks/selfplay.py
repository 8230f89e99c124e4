"""Self-play speed: baseline vs baseline at default settings, one process and two; prints JSON.

Usage: python benchmarks/selfplay.py [--games N] [--seed S]
"""
import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from maou_nb.selfplay import BaselineEngine, play_games
from maou_nb.storage import read_manifest


def measure(games: int, seed: int, workers: int) -> dict:
    """Play `games` default self-play games with `workers` processes; games/s and positions/s (wall clock)."""
    with tempfile.TemporaryDirectory() as tmp:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        play_games(games, Path(tmp), seed=seed, workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        positions = read_manifest(Path(tmp) / "hcpe", expect_kind="hcpe")["rows"]
    return {"workers": workers, "games": games, "positions": positions, "seconds": round(seconds, 2),
            "games_per_s": round(games / seconds, 2), "positions_per_s": round(positions / seconds, 1),
            "cpu_seconds": round(cpu, 2), "positions_per_cpu_s": round(positions / cpu, 1)}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker pools), so a busy machine shows as such."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    engine = BaselineEngine()
    results = [measure(args.games, args.seed, workers) for workers in (1, 2)]
    print(json.dumps({"benchmark": "selfplay", "engine": repr(engine), "max_moves": 256, "cpus": os.cpu_count(),
                      "load_average_1min": round(os.getloadavg()[0], 2),
                      "runs": results}, indent=2))


if __name__ == "__main__":
    main()
