"""How much the kit learns per sample on real positions: train a named config (a params file's `train:` section
and/or a model preset) for N epochs on an HCPE file, then report per epoch, on a held-out HCPE file with no
position shared with training (checked by HCP bytes; shared rows are dropped and counted), policy top-1 over
the legal moves (the argmax of the logits masked to the legal moves is the move played) and value-sign accuracy
(the value's sign agrees with the mover's result; draws left out), beside wall time and samples/s. Prints JSON.

Usage:
  python benchmarks/learning.py --train ../shared/data/hcpe/train.hcpe --val ../shared/data/hcpe/val.hcpe \\
      [--preset spatial-small] [--params params/real-hcpe.yaml] [--stages 3|all] [--epochs 3] [--rows N] \\
      [--set key=json ...] [--model-set key=json ...] [--out result.json] [--work DIR]
`--stages all` runs Stage 1 (the fixed curriculum, to its 0.99 gate) -> Stage 2 (legal moves of the training
positions, validated on the held-out ones; one epoch unless the params file says otherwise) -> Stage 3; `--stages 3` Stage 3 alone. Stage 3 reads the training rows as HCPE (one-hot move
played, mover's result), as python-dlshogi2 does. `--rows N` keeps the first N training rows (a quick ranking run).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maou_nb.config import TrainConfig
from maou_nb.encoding import encode_hcps, hcp_turns, legal_moves_labels, move16_labels
from maou_nb.model import count_parameters, load_model
from maou_nb.preprocess import make_stage1_data, make_stage2_data
from maou_nb.storage import load_hcpe, read_yaml, save_hcpe
from maou_nb.train import train


def held_out(train_rows: np.ndarray, val_rows: np.ndarray) -> tuple[np.ndarray, int]:
    """(validation rows whose position (HCP bytes) never occurs in training, number dropped)."""
    seen = {bytes(h) for h in np.ascontiguousarray(train_rows["hcp"])}
    keep = np.array([bytes(h) not in seen for h in np.ascontiguousarray(val_rows["hcp"])], bool)
    return val_rows[keep], int((~keep).sum())


@torch.no_grad()
def accuracies(model: torch.nn.Module, rows: np.ndarray, batch: int = 1024) -> dict:
    """Policy top-1 over legal moves and value-sign accuracy of `model` on HCPE `rows`."""
    model.eval()
    turns = hcp_turns(rows["hcp"])
    played = move16_labels(rows["bestMove16"].view(np.uint16), turns).astype(np.int64)
    result = rows["gameResult"]
    mover_won = ((result == 1) & (turns == 0)) | ((result == 2) & (turns == 1))
    decisive = result != 0
    hits = value_hits = 0
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        board, hand = encode_hcps(part["hcp"])
        legal = torch.from_numpy(legal_moves_labels(part["hcp"]))
        out = model(torch.from_numpy(board).int(), torch.from_numpy(hand).float())
        policy = out["policy"].float().masked_fill(~legal, float("-inf"))
        hits += int((policy.argmax(1).numpy() == played[start:start + batch]).sum())
        sign = out["value"].float().reshape(-1).numpy() > 0
        d = decisive[start:start + batch]
        value_hits += int((sign == mover_won[start:start + batch])[d].sum())
    return {"policy_top1_legal": round(hits / len(rows), 4), "value_sign": round(value_hits / max(1, int(decisive.sum())), 4)}


def parse_sets(items: list[str]) -> dict:
    """`key=value` pairs, the value read as JSON when it parses (numbers, lists, null), else as a string."""
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def run(args) -> dict:
    """Train as the arguments say and evaluate every Stage 3 epoch; the JSON-able result."""
    work = Path(args.work or tempfile.mkdtemp(prefix="learning-"))
    rows = np.asarray(load_hcpe(args.train))[: args.rows or None]
    val, dropped = held_out(rows, np.asarray(load_hcpe(args.val)))
    save_hcpe(work / "train" / "rows.npy", rows)
    save_hcpe(work / "val" / "rows.npy", val)
    config = dict((read_yaml(Path(args.params)) or {}).get("train", {})) if args.params else {}
    for wired in ("stage1_data", "stage2_data", "stage2_val_data", "stage3_val_data", "out_dir", "resume_from"):
        config.pop(wired, None)
    config.update({"stage": args.stages, "input_format": "hcpe", "stage3_data": str(work / "train" / "rows.npy"),
                   "stage3_val_data": str(work / "val" / "rows.npy"), "epoch": args.epochs, "keep_epochs": args.epochs,
                   "out_dir": str(work / "run"), "device": args.device, "seed": args.seed})
    if args.preset:
        config["preset"] = args.preset
    config["model_config"] = {**config.get("model_config", {}), **parse_sets(args.model_set)}
    config.update(parse_sets(args.set))
    prep = {}
    if args.stages == "all":
        t0 = time.perf_counter()
        make_stage1_data(work / "stage1")
        make_stage2_data(work / "train", work / "stage2" / "train", progress=False)
        make_stage2_data(work / "val", work / "stage2" / "val", progress=False)
        prep["stage_data_s"] = round(time.perf_counter() - t0, 1)
        config.update(stage1_data=str(work / "stage1"), stage2_data=str(work / "stage2" / "train"),
                      stage2_val_data=str(work / "stage2" / "val"))
        for key, value in {"stage1_max_epochs": 100, "stage2_threshold": None, "stage2_max_epochs": 1}.items():
            config.setdefault(key, value)          # without a params file: Stage 1 to its gate, one Stage 2 epoch
    c = TrainConfig.from_dict(config)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    result = train(c, progress=False)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    stage3 = [r for r in vals if r["stage"] == "3"]
    start3 = max([r["elapsed_s"] for r in vals if r["stage"] != "3"], default=0.0)
    epochs, before = [], start3
    for r in stage3:
        model = load_model(work / "run" / "checkpoints" / f"epoch{r['epoch']}.pt")
        seconds = r["elapsed_s"] - before
        epochs.append({"epoch": r["epoch"], **accuracies(model, val), "train_s": round(seconds, 1),
                       "samples_per_s": round(len(rows) / max(seconds, 1e-9), 1),
                       "val_loss": round(r["loss"], 4), "val_value_loss": round(r["value_loss"], 4)})
        before = r["elapsed_s"]
    stages = {s: {"epochs": info["epochs"], "seconds": info["seconds"],
                  **{k: round(v, 4) for k, v in info["metrics"].items() if k in ("accuracy", "f1", "top1", "value_accuracy")}}
              for s, info in result.stages.items()}
    model = load_model(work / "run" / "checkpoints" / "last.pt")
    return {"benchmark": "learning", "train": str(args.train), "train_rows": len(rows), "val": str(args.val),
            "val_rows": len(val), "val_rows_dropped_shared_with_train": dropped, "stages": args.stages,
            "model": c.model, "preset": c.preset, "model_config": model.config,
            "params": count_parameters(model)["reference"], "config": {k: v for k, v in config.items() if "data" not in k},
            **prep, "stage_results": stages, "epochs": epochs, "wall_s": round(wall, 1),
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "work": str(work)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="HCPE file or folder to train on (raw .hcpe or the kit's shards)")
    p.add_argument("--val", required=True, help="held-out HCPE file or folder (rows shared with --train are dropped)")
    p.add_argument("--params", help="a params file whose train: section is the config (stage and data are set here)")
    p.add_argument("--preset", help="model preset, e.g. spatial-small (overrides the params file's)")
    p.add_argument("--stages", choices=("3", "all"), default="3")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rows", type=int, default=0, help="train on the first N rows only (0: all)")
    p.add_argument("--set", action="append", default=[], help="a TrainConfig field, key=json")
    p.add_argument("--model-set", action="append", default=[], help="a model_config key, key=json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="work folder (default: a new temporary one)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    out = run(args)
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
