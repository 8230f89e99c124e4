"""Speed and peak memory of preprocess (in memory and through disk buckets), Stage 1/2 data and split_hcpe.

Usage: python benchmarks/preprocess.py [--rows 200000]
Prints one JSON line per step. Each step runs in a fresh process so `peak_rss_mb` is that step's own peak.
`positions_per_s` is wall-clock; `positions_per_cpu_s` divides by the step's CPU time (its worker processes
included), a fairer number on a shared machine.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _data import write_hcpe_folder  # noqa: E402

STEPS = {  # name -> (function, keyword arguments; memory_bytes is given per input row)
    "preprocess_in_memory": ("preprocess", {}),
    "preprocess_external_64MB": ("preprocess", {"memory_bytes": 64 << 20}),
    "preprocess_external_8MB": ("preprocess", {"memory_bytes": 8 << 20}),
    "preprocess_external_8MB_2_workers": ("preprocess", {"memory_bytes": 8 << 20, "workers": 2}),
    "stage2": ("make_stage2_data", {}),
    "stage2_external_8MB": ("make_stage2_data", {"memory_bytes": 8 << 20}),
    "stage1_from_hcpe": ("make_stage1_data_from_hcpe", {}),
    "split_hcpe": ("split_hcpe", {}),
}


def run_step(name: str, data: Path) -> dict:
    """Run one step on `data/hcpe` and measure it (called in a fresh process)."""
    from maou_nb import preprocess as pp
    from maou_nb.storage import read_manifest
    function, kwargs = STEPS[name]
    out = data / name
    start = time.perf_counter()
    if function == "split_hcpe":
        pp.split_hcpe(data / "hcpe", out, 0.1, seed=0)
    else:
        getattr(pp, function)(data / "hcpe", out, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    rows = read_manifest(data / "hcpe")["rows"]
    result = {"step": name, "input_rows": rows, "seconds": round(seconds, 3),
              "positions_per_s": round(rows / seconds), "positions_per_cpu_s": round(rows / cpu),
              "peak_rss_mb": round(max(u.ru_maxrss for u in usage) / 1024)}
    if function != "split_hcpe":
        manifest = read_manifest(out)
        result |= {"output_rows": manifest["rows"], "bytes_per_position": manifest["bytes_per_position"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, Path(args.data))), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_hcpe_folder(Path(tmp) / "hcpe", args.rows)
        for name in STEPS:
            subprocess.run([sys.executable, __file__, "--step", name, "--data", tmp], check=True)
        from maou_nb.preprocess import make_stage1_data
        start = time.perf_counter()
        make_stage1_data(Path(tmp) / "stage1")
        print(json.dumps({"step": "stage1_curriculum", "rows": 1105,
                          "seconds": round(time.perf_counter() - start, 3)}), flush=True)


if __name__ == "__main__":
    main()
