"""`compilation: true` start-up, cold and warm: each run in a fresh process (as a new run or a restarted rank
starts), timing the first engine step (graph capture + inductor's code generation and C++ compile, or their cache
hits) and the steady steps after it; eager for reference. The cache is the engine's (`compile_cache_dir`).
Prints JSON.

Usage: python benchmarks/compile_cache.py [--size small] [--batch 64] [--steps 5] [--games 10] [--threads 1] [--rounds 3]
The warm process also times the compiled step against the eager one in alternating rounds (samples per CPU-second).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> None:
    """One run: build the engine's trainer, time its first step and `--steps` more (prints one JSON line)."""
    t_start = time.perf_counter()
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step import KitStep  # noqa: E402
    torch.set_num_threads(args.threads)
    t_import = time.perf_counter()
    kit = KitStep(Path(args.data), args.size, args.batch, {"compilation": args.compile, "compile_cache_dir": args.cache},
                  Path(args.out))
    first, _, _ = kit.steps(1)
    wall, _, _ = kit.steps(args.steps)
    out = {"import_s": round(t_import - t_start, 2), "first_step_s": round(first, 2),
           "samples_per_s_after": round(args.steps * args.batch / wall, 1),
           "cache_files": sum(1 for _ in Path(args.cache).rglob("*") if _.is_file()) if args.compile else 0}
    if args.compile and args.rounds:      # compiled against eager in this process, alternating rounds (CPU seconds)
        eager = KitStep(Path(args.data), args.size, args.batch, {}, Path(args.out + "-eager"))
        eager.steps(1)
        rates = {"compiled": [], "eager": []}
        for _ in range(args.rounds):
            for name, k in (("compiled", kit), ("eager", eager)):
                _, cpu, _ = k.steps(args.steps)
                rates[name].append(args.steps * args.batch / cpu)
        med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
        out["side_by_side_samples_per_cpu_s"] = {k: round(v, 1) for k, v in med.items()}
        out["compiled_over_eager"] = round(med["compiled"] / med["eager"], 2)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--games", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="compiled vs eager rounds in the warm process (0: none)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--data"), ap.add_argument("--cache"), ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from training import temporary_data
    with temporary_data(args.games) as (tmp, pre):
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
        runs = {}
        for name, compiled in (("eager", False), ("compiled_cold", True), ("compiled_warm", True)):
            cmd = [sys.executable, __file__, "--child", "--size", args.size, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--data", str(pre),
                   "--rounds", str(args.rounds if name == "compiled_warm" else 0),
                   "--cache", str(tmp / "cache"), "--out", str(tmp / name)] + (["--compile"] if compiled else [])
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[name] = {**json.loads(out.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - t0, 2)}
    cold, warm = runs["compiled_cold"]["first_step_s"], runs["compiled_warm"]["first_step_s"]
    print(json.dumps({"benchmark": "compile_cache", "size": args.size, "batch": args.batch, "threads": args.threads,
                      "runs": runs, "first_step_cold_over_warm": round(cold / warm, 2),
                      "load_average_at_end": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
