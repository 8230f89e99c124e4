"""Forward and training-step speed of maou_nb.model networks on the CPU (or --device).

Inputs are random piece IDs (int32, as the ONNX interface uses) and hand counts; speed does not depend on
the values. For each architecture and batch size prints JSON: parameters (stem+backbone+policy+value and
total with all four heads), eval forward ms per batch and positions/s, and one training step (forward of all
heads, a loss on every head, backward, AdamW step) ms per batch and positions/s.
"""
import argparse
import json
import time

import torch

from maou_nb.model import ARCHS, build_model, count_parameters


def timed(fn, repeats: int) -> float:
    """Mean seconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(arch: str, preset: str, batch: int, repeats: int, device: str) -> dict:
    """Speed figures of one model at one batch size."""
    model = build_model(arch, preset=preset).to(device)
    board = torch.randint(0, 29, (batch, 9, 9), dtype=torch.int32, device=device)
    hand = torch.randint(0, 4, (batch, 14), device=device).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def forward():
        with torch.no_grad():
            model.eval()(board, hand)

    def train_step():
        out = model.train()(board, hand)
        loss = sum(v.float().square().mean() for v in out.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    fwd, step = timed(forward, repeats), timed(train_step, repeats)
    counts = count_parameters(model)
    return {"arch": arch, "preset": preset, "batch": batch, "params_reference": counts["reference"],
            "params_total": counts["total"], "forward_ms": round(fwd * 1000, 2), "forward_positions_per_s": round(batch / fwd),
            "train_step_ms": round(step * 1000, 2), "train_positions_per_s": round(batch / step)}


def main() -> None:
    """Parse arguments and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench(a, args.preset, b, args.repeats, args.device) for a in args.archs for b in args.batches]
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
