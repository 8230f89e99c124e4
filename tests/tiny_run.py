"""One run of `params/tiny.yaml`, shared by test_stages.py and test_pipeline.py (it is the slow part of both)."""
import os
from pathlib import Path

from maou_nb.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "params" / "tiny.yaml"
STAGES = ROOT / "nbs" / "stages"
_cache: dict = {}


def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """(run directory, progress lines) of the tiny pipeline, run once per pytest session."""
    if "run" not in _cache:
        lines: list[str] = []
        # One intra-op thread per kernel: tiny models on a busy 2-core machine run many times faster than with two.
        before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            run = run_pipeline(TINY, run_id="tiny", runs_root=str(tmp_path_factory.mktemp("runs")), echo=lines.append)
        finally:
            if before is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = before
        _cache["run"] = (run, lines)
    return _cache["run"]
