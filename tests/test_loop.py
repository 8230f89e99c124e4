"""The self-improvement loop end to end on a small untrained model (wiring, registry, resume)."""
import json
from pathlib import Path

import pytest

from maou_nb.loop import LoopParams, gauntlet, load_registry, rating_table, run


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from maou_nb.model import build_model
    from maou_nb.storage import save_checkpoint
    torch.set_num_threads(1)  # small batches: extra threads only spin on a busy 2-core runner
    torch.manual_seed(0)
    model = build_model("resnet", preset="small")
    path = tmp_path_factory.mktemp("loop") / "start.pt"
    save_checkpoint(path, {"arch": model.arch, "model_config": model.config, "model": model.state_dict()})
    return path


def test_loop_runs_records_and_resumes(start_checkpoint, tmp_path):
    params = {"initial_model": str(start_checkpoint), "out_dir": str(tmp_path / "loop"), "iterations": 2,
              "games": 4, "max_moves": 50, "gauntlet_games": 2, "fairy_level": None, "require_interval": False,
              "thresholds": {"random": 0.0, "baseline": None, "best": 0.0}, "train": {"batch_size": 64},
              "simulations": 2}
    summaries = run(params, progress=False)
    assert [s["iteration"] for s in summaries] == [0, 1]
    reg = load_registry(tmp_path / "loop" / "registry.json")
    ids = [m["id"] for m in reg["models"]]
    assert len(ids) == 3 and reg["models"][0]["status"] == "promoted"
    # zero thresholds: every candidate is promoted and becomes the parent of the next
    assert [m["status"] for m in reg["models"]] == ["promoted"] * 3
    assert reg["best"] == ids[2] and reg["models"][2]["parent"] == ids[1]
    # a threshold of None: the baseline is played and recorded, not required
    rows = {r["role"]: r for r in reg["models"][1]["evaluations"][0]["rows"]}
    assert rows["baseline"]["threshold"] is None and rows["baseline"]["passed"] is None
    assert rows["baseline"]["games"] == 2 and rows["best"]["passed"] is True
    assert summaries[1]["best_before"] == summaries[0]["candidate"]
    for i in range(2):
        it = tmp_path / "loop" / f"iter_{i:03d}"
        assert len(list((it / "selfplay").glob("*.csa"))) == 4
        assert json.loads((it / "preprocessed" / "manifest.json").read_text())["kind"] == "preprocessed"
        assert Path(summaries[i]["candidate"]).is_file()
        # on a CPU the players evaluated ONNX twins of the checkpoints, made beside them
        assert Path(summaries[i]["candidate"]).with_suffix(".onnx").is_file()
    assert start_checkpoint.with_suffix(".onnx").is_file()
    # the second iteration trained on both iterations' games (window 2)
    sources = json.loads((tmp_path / "loop" / "iter_001" / "preprocessed" / "manifest.json").read_text())["sources"]
    assert {Path(s).parent.parent.name for s in sources} == {"iter_000", "iter_001"}
    # resume: finished iterations are read back, not replayed
    done = tmp_path / "loop" / "iter_001" / "done.json"
    before = done.stat().st_mtime_ns
    again = run(params, progress=False)
    assert again == json.loads(json.dumps(summaries)) and done.stat().st_mtime_ns == before
    # a crash after iteration 0: only iteration 1 runs again
    done.unlink()
    third = run(params, progress=False)
    assert done.is_file() and [s["iteration"] for s in third] == [0, 1]
    assert len(load_registry(tmp_path / "loop" / "registry.json")["models"]) >= 3


def test_loop_params_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="initial_model"):
        run({"initial_model": str(tmp_path / "missing.pt"), "out_dir": str(tmp_path / "loop")}, progress=False)
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text("loop:\n  initial_model: a.pt\n  iterations: 5\n")
    assert LoopParams.load(yaml_path).iterations == 5


def test_loop_params_files_are_valid():
    from maou_nb.config import TrainConfig
    files = sorted((Path(__file__).resolve().parents[1] / "params" / "loop").glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        p = LoopParams.load(path)
        TrainConfig.from_dict({"stage": "3", "stage3_data": "x", **p.train}, check_files=False)


def test_gauntlet_records_decisions_in_the_registry(start_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    from maou_nb.model import build_model
    from maou_nb.storage import save_checkpoint
    reg_path = tmp_path / "models" / "registry.json"
    # strict thresholds: 4 games cannot put the interval above 50%, so the candidate is rejected
    first = gauntlet(start_checkpoint, registry=reg_path, games=4, max_moves=60, fairy_level=None)
    assert not first["promoted"] and first["best"] is None
    assert [r["role"] for r in first["rows"]] == ["random", "baseline"]
    reg = load_registry(reg_path)
    (entry,) = reg["models"]
    assert entry["status"] == "rejected" and entry["id"] == first["id"] and len(reg["matches"]) == 2
    # lenient thresholds promote it; a second model then also plays the current best
    again = gauntlet(start_checkpoint, registry=reg_path, games=2, max_moves=60, fairy_level=None,
                     thresholds={"random": 0.0, "baseline": 0.0}, require_interval=False)
    assert again["promoted"] and again["id"] == first["id"] and again["best"] == first["id"]
    torch.manual_seed(1)
    other = build_model("resnet", preset="small")
    other_path = tmp_path / "other.pt"
    save_checkpoint(other_path, {"arch": other.arch, "model_config": other.config, "model": other.state_dict()})
    third = gauntlet(other_path, registry=reg_path, games=2, max_moves=60, fairy_level=None, run="run-2")
    assert [r["role"] for r in third["rows"]] == ["random", "baseline", "best"]
    reg = load_registry(reg_path)
    assert [m["status"] for m in reg["models"]] == ["promoted", "promoted" if third["promoted"] else "rejected"]
    assert reg["models"][1]["parent"] == first["id"] and reg["models"][1]["run"] == "run-2"
    assert reg["models"][1]["arch"] == "resnet"
    table = rating_table(reg)
    assert {r["player"] for r in table} == {"random", "baseline", first["id"], third["id"]}
    assert sum(r["games"] for r in table) == 2 * sum(m["wins"] + m["draws"] + m["losses"] for m in reg["matches"])
