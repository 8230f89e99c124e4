"""The training step on a busy machine: samples/s of the engine's Stage 3 step with and without competing CPU work,
for each choice of intra-op threads and OpenMP wait policy (each in its own process: the policy is read when the
OpenMP runtime starts). The competitor is one busy process per core (pure Python loops). Prints JSON.

Usage: python benchmarks/contention.py [--threads 1,2] [--policies default,active,passive] [--batch 64] [--steps 6]
(`default`: OMP_WAIT_POLICY unset, the OpenMP runtime's own choice).
`--quiet-only --rounds 5` measures only without competitors, the policies in alternating rounds (the cost of a
policy on an idle machine: medians, each policy against the first), with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import sys, time, json, torch
sys.path.insert(0, sys.argv[1])
from step import KitStep
k = KitStep(__import__("pathlib").Path(sys.argv[2]), "small", int(sys.argv[3]), {}, __import__("pathlib").Path(sys.argv[4]))
k.steps(2)
rates = []
for _ in range(3):
    seconds, _, _ = k.steps(int(sys.argv[5]))
    rates.append(int(sys.argv[5]) * int(sys.argv[3]) / seconds)
print(json.dumps({"samples_per_s": sorted(rates)[1], "threads": torch.get_num_threads()}))
'''


def measure(data: Path, threads: int, policy: str, batch: int, steps: int, tmp: Path, busy: int) -> dict:
    """Samples/s of one configuration, with `busy` competing processes running."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"OMP_NUM_THREADS": str(threads), **({} if policy == "default" else {"OMP_WAIT_POLICY": policy.upper()})})
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(data), str(batch),
                              str(tmp / f"run-{threads}-{policy}-{busy}-{time.monotonic_ns()}"), str(steps)],
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return json.loads(out.strip().splitlines()[-1])


def quiet_rounds(pre: Path, args, tmp: Path) -> dict:
    """Each (threads, policy) without competitors, in alternating rounds; medians and ratios to the first policy."""
    import statistics
    load_before, policies = os.getloadavg(), args.policies.split(",")
    out = {"benchmark": "contention_quiet", "rounds": args.rounds, "batch": args.batch, "results": []}
    for threads in map(int, args.threads.split(",")):
        rates = {p: [] for p in policies}
        for _ in range(args.rounds):
            for policy in policies:
                rates[policy].append(measure(pre, threads, policy, args.batch, args.steps, tmp, 0)["samples_per_s"])
        first = statistics.median(rates[policies[0]])
        out["results"].append({"threads": threads, **{p: {"median_samples_per_s": round(statistics.median(r), 1),
                                                           "vs_" + policies[0]: round(statistics.median(r) / first, 3),
                                                           "rounds": [round(x, 1) for x in r]} for p, r in rates.items()}})
    return {**out, "load_average_before": load_before, "load_average_after": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--policies", default="default,active,passive")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--games", type=int, default=20)
    ap.add_argument("--quiet-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from training import temporary_data
    cores = len(os.sched_getaffinity(0))
    rows = []
    with temporary_data(args.games) as (tmp, pre):
        if args.quiet_only:
            return print(json.dumps(quiet_rounds(pre, args, tmp), indent=1))
        for threads in map(int, args.threads.split(",")):
            for policy in args.policies.split(","):
                quiet = measure(pre, threads, policy, args.batch, args.steps, tmp, 0)["samples_per_s"]
                busy = measure(pre, threads, policy, args.batch, args.steps, tmp, cores)["samples_per_s"]
                # fair share: T trainer threads among T + `cores` runnable threads on `cores` cores
                fair = min(threads, cores) * (threads + cores) / (cores * threads)
                rows.append({"threads": threads, "omp_wait_policy": policy, "quiet_samples_per_s": round(quiet, 1),
                             "busy_samples_per_s": round(busy, 1), "slowdown": round(quiet / busy, 2),
                             "fair_share_slowdown": round(fair, 2)})
    print(json.dumps({"benchmark": "contention", "cores": cores, "competitors": cores, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
