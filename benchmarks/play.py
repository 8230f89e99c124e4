"""Play speed: games/s for random, baseline and network players, and network positions/s per batch size.

Run: python benchmarks/play.py [--quick] [--threads N]. Prints one JSON object. What is measured:
- games_per_s: whole games through `play_match` (random openings of 4 plies, max 256 moves), all games
  of a match stepped together (the network player evaluates every game in flight in one batch);
- positions_per_s: the network alone on encoded real positions (from random games), per batch size,
  for PyTorch (small ResNet preset, untrained; the speed does not depend on the weights) and onnxruntime;
- choose_many_per_s: the network player end to end (encoding, legal masks, forward pass, move pick);
- network_puct16_vs_random: the network searching 16 PUCT simulations per move (leaves batched across games).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from maou_nb.encoding import encode_boards
from maou_nb.export import TorchEvaluator, export_onnx, load_onnx
from maou_nb.arena import play_match, random_openings
from maou_nb.players import NetworkPlayer
from maou_nb.records import random_boards


def games_per_s(a, b, games: int, seed: int = 0) -> dict:
    "Play a match; games per second and plies per second."
    start = time.perf_counter()
    result = play_match(a, b, games=games, openings=random_openings(max(1, games // 2), seed=seed),
                        max_moves=256, seed=seed)
    elapsed = time.perf_counter() - start
    plies = sum(g.plies for g in result.games)
    return {"games": games, "seconds": round(elapsed, 3), "games_per_s": round(games / elapsed, 3),
            "plies_per_s": round(plies / elapsed, 1), "avg_plies": round(plies / games, 1)}


def positions_per_s(evaluator, planes, hands, batch: int, min_seconds: float) -> float:
    "Positions per second of `evaluator` at one batch size."
    evaluator(planes[:batch], hands[:batch])  # warm up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        evaluator(planes[:batch], hands[:batch])
        n += batch
    return round(n / (time.perf_counter() - start), 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer games and shorter timings")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads (default 1: on a busy 2-core machine more threads spin and run far slower)")
    args = parser.parse_args(argv)
    threads = args.threads
    torch.set_num_threads(threads)
    from maou_nb.model import build_model
    torch.manual_seed(0)
    model = build_model("resnet", preset="small").eval()
    batches = [1, 8, 32, 128] if args.quick else [1, 8, 32, 128, 512]
    seconds = 0.5 if args.quick else 2.0
    report = {"machine": {"cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
                          "torch": torch.__version__, "platform": platform.platform()},
              "model": {"arch": "resnet", "preset": "small",
                        "parameters": sum(p.numel() for p in model.parameters())}}
    g = 20 if args.quick else 100
    report["random_vs_random"] = games_per_s("random", "random", g)
    report["baseline_vs_baseline"] = games_per_s("baseline", "baseline", 2 if args.quick else 10)
    net = NetworkPlayer(TorchEvaluator(model), name="network")
    report["network_vs_baseline"] = games_per_s(net, "baseline", 4 if args.quick else 16)
    report["network_vs_random"] = games_per_s(NetworkPlayer(TorchEvaluator(model), name="network"), "random",
                                              16 if args.quick else 64)
    search = NetworkPlayer(TorchEvaluator(model), simulations=16, name="network_puct16")
    report["network_puct16_vs_random"] = games_per_s(search, "random", 8 if args.quick else 32)

    boards = random_boards(max(batches), max_plies=120, playable=True)
    planes, hands = encode_boards(boards)
    report["positions_per_s"] = {"torch": {}, "onnxruntime": {}}
    torch_eval = TorchEvaluator(model)
    with tempfile.TemporaryDirectory() as d:
        onnx_eval = load_onnx(export_onnx(model, Path(d) / "small.onnx", fp16=False)["path"], threads=threads)
        for b in batches:
            report["positions_per_s"]["torch"][str(b)] = positions_per_s(torch_eval, planes, hands, b, seconds)
            report["positions_per_s"]["onnxruntime"][str(b)] = positions_per_s(onnx_eval, planes, hands, b, seconds)
    report["choose_many_per_s"] = {}
    player = NetworkPlayer(torch_eval)
    for b in batches:
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            player.choose_many(boards[:b]); n += b
        report["choose_many_per_s"][str(b)] = round(n / (time.perf_counter() - start), 1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
