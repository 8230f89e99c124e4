"""Can the value head rank a position's moves? A cheap, low-noise proxy for playing strength against the baseline.

For held-out positions, every legal move is scored by the model's value of the position after it (the mover's
view) and compared with the baseline engine's own depth-1 scores of the same moves: how often the value's pick is
the engine's best move, how often it is a blunder (at least `--blunder` centipawns below the best), the same two
for the policy's top move, and the mean rank correlation of the values with the engine's scores. With
`--capture-extension` the side to move at each child may first take a piece (a one-ply capture search on the
value), the measure of what a capture-resolving leaf would give a search. Prints one JSON object.

Usage: python benchmarks/value_ranking.py --model runs/<id>/models/model.onnx --positions runs/<id>/data/split/val
    [--n 400] [--blunder 300] [--capture-extension] [--seed 0]
`--positions` is anything `preprocess.hcpe_inputs` takes: an HCPE file (raw `.hcpe` or a kit shard) or a folder.
"""
import argparse
import json
import time
from pathlib import Path

import cshogi
import numpy as np

from maou_nb.export import load_policy
from maou_nb.preprocess import hcpe_shards
from maou_nb.selfplay import BaselineEngine
from maou_nb.storage import load_hcpe


def captures(board: cshogi.Board) -> list[int]:
    """The legal moves of `board` that take a piece."""
    return [m for m in board.legal_moves if not cshogi.move_is_drop(m) and board.piece(cshogi.move_to(m))]


def child_values(evaluator, board: cshogi.Board, moves: np.ndarray, capture_extension: bool) -> tuple[np.ndarray, int]:
    """The mover's value of each move (1 - the child's mover's win probability; a move that ends the game counts
    as a win for the mover), and the number of positions evaluated."""
    children = []
    for m in moves.tolist():
        child = board.copy()
        child.push(m)
        children.append(child)
    live = [i for i, c in enumerate(children) if not c.is_game_over()]
    replies, owner = [], []
    if capture_extension:
        for i in live:
            for m in captures(children[i]):
                reply = children[i].copy()
                reply.push(m)
                if not reply.is_game_over():
                    replies.append(reply)
                    owner.append(i)
    child_value = np.zeros(len(moves))          # the child's mover's win probability (0: it is mated)
    if live:
        _, _, value, _ = evaluator.evaluate_many([children[i] for i in live] + replies)
        child_value[live] = value[:len(live)]
        for i, v in zip(owner, value[len(live):]):
            child_value[i] = max(child_value[i], 1.0 - v)   # the child's mover may take a piece first
    return 1.0 - child_value, len(live) + len(replies)


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an .onnx file or a checkpoint (.pt)")
    ap.add_argument("--positions", required=True, type=Path, help="held-out HCPE file or folder")
    ap.add_argument("--n", type=int, default=400, help="positions drawn from --positions")
    ap.add_argument("--blunder", type=float, default=300.0, help="centipawns below the engine's best")
    ap.add_argument("--capture-extension", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = np.concatenate([load_hcpe(f, mmap=False) for f in hcpe_shards(args.positions)])
    rows = rows[np.random.default_rng(args.seed).choice(len(rows), min(args.n, len(rows)), replace=False)]
    evaluator, engine = load_policy(args.model, threads=args.threads), BaselineEngine(temperature=0)
    hits = {"value": 0, "policy": 0}
    blunders = {"value": 0, "policy": 0}
    correlations, evaluated, used, start = [], 0, 0, time.perf_counter()
    for row in rows:
        board = cshogi.Board()
        board.set_hcp(row["hcp"])
        if board.is_game_over():
            continue
        moves, scores = engine.score_moves(board)
        if len(moves) < 2:
            continue
        values, n = child_values(evaluator, board, moves, args.capture_extension)
        probs, _ = evaluator.evaluate(board)
        picks = {"value": int(values.argmax()), "policy": int(np.argmax([probs.get(int(m), 0.0) for m in moves]))}
        for name, i in picks.items():
            hits[name] += bool(scores[i] == scores.max())
            blunders[name] += bool(scores[i] < scores.max() - args.blunder)
        if scores.std() > 0 and values.std() > 0:
            correlations.append(float(np.corrcoef(ranks(values), ranks(scores))[0, 1]))
        evaluated += n + 1
        used += 1
    if not used:
        raise SystemExit(f"{args.positions}: no position with two or more legal moves among the {len(rows)} drawn")
    print(json.dumps({"benchmark": "value_ranking", "model": str(args.model), "positions": used,
                      "capture_extension": args.capture_extension, "blunder_cp": args.blunder,
                      "value_pick_is_best": round(hits["value"] / used, 4),
                      "policy_pick_is_best": round(hits["policy"] / used, 4),
                      "value_blunders": round(blunders["value"] / used, 4),
                      "policy_blunders": round(blunders["policy"] / used, 4),
                      "value_rank_correlation": round(float(np.mean(correlations)), 4) if correlations else None,
                      "evaluations_per_position": round(evaluated / used, 1),
                      "seconds": round(time.perf_counter() - start, 1)}, indent=1))


if __name__ == "__main__":
    main()
