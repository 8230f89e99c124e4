"""Throughput of CSA -> HCPE conversion (maou_nb.records) on copies of the real records in tests/data/records.

Synthetic input: each file is a multi-game CSA file holding every single-game CSA record with moves from
tests/data/records (the repository's own copy), repeated; `--files` such files go into a temporary folder. Prints JSON:
positions/s for the per-file core on one core in this process (read + parse + check every move + HCPE rows),
and for `convert_records` end to end (worker processes, shards written) with 1 worker and with all cores.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from maou_nb.records import convert_file, convert_records, find_record_files

RECORDS = Path(__file__).resolve().parents[1] / "tests" / "data" / "records"


def make_input(folder: Path, n_files: int, repeat: int) -> list[Path]:
    """`n_files` CSA files, each the real single-game records with moves, repeated `repeat` times."""
    games = []
    for p in sorted(RECORDS.glob("*.csa")):
        text = p.read_text(encoding="utf-8").replace("\r\n", "\n").strip("\n")
        if "\n/\n" not in text and any(l[:1] in "+-" and l[1:2].isdigit() for l in text.split("\n")):
            games.append(text)
    body = "\n/\n".join(games * repeat) + "\n"
    paths = []
    for i in range(n_files):
        paths.append(folder / f"synthetic_{i:04d}.csa")
        paths[-1].write_text(body, encoding="utf-8")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        make_input(tmp / "in", args.files, args.repeat)
        files = find_record_files(tmp / "in")

        t = time.perf_counter()
        rows = sum(len(convert_file(str(p), key).hcpe) for p, key in files)
        core = time.perf_counter() - t

        timings = {}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        for workers in sorted({1, cores}):
            t = time.perf_counter()
            out = convert_records(tmp / "in", tmp / f"out{workers}", workers=workers, progress=False)
            timings[workers] = time.perf_counter() - t
            assert out.stats["rows"] == rows
    print(json.dumps({
        "benchmark": "records.convert (CSA -> HCPE)",
        "files": len(files), "positions": rows,
        "core_one_process_positions_per_s": round(rows / core),
        **{f"convert_records_workers_{w}_positions_per_s": round(rows / s) for w, s in timings.items()},
        "cores": cores,
    }))


if __name__ == "__main__":
    main()
