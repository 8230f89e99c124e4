"""The pipeline end to end on params/tiny.yaml: layout, rerun skips finished steps, bad parameters fail early."""
import shutil
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml

from maou_nb.pipeline import STEPS, load_params, main, run_pipeline
from tiny_run import ROOT, STAGES, TINY, tiny_run

PARAMS = sorted((ROOT / "params").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_tiny_run_layout(tiny):
    """Every step ran once, in order; the run folder holds what the README promises."""
    run, lines = tiny
    steps = yaml.safe_load(TINY.read_text())["steps"]
    assert [l.split(":")[0] for l in lines if "done in" in l] == [f"[{k}/{len(steps)}] {s}" for k, s in enumerate(steps, 1)]
    for name in ("params.yaml", "run.json", "summary.md", "stats.json", "models/model.onnx",
                 "checkpoints/best.pt", "checkpoints/last.pt", "eval/evaluation.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "notebooks").glob("*.ipynb")) == sorted(STEPS[s].notebook for s in steps)
    resolved = yaml.safe_load((run / "params.yaml").read_text())
    assert resolved["run_id"] == "tiny" and resolved["train"] == yaml.safe_load(TINY.read_text())["train"]
    assert str(run) in lines[-1]  # the summary, printed last, says where everything is


def test_rerun_skips_complete_steps_and_redoes_missing(tiny):
    """Same run_id: finished steps are skipped untouched; a step without its done file runs again."""
    run, _ = tiny
    best = run / "checkpoints/best.pt"
    stamp = best.stat().st_mtime_ns
    lines = []
    run_pipeline(TINY, run_id="tiny", runs_root=str(run.parent), echo=lines.append)
    assert all("complete, skipped" in l for l in lines if l.startswith("["))
    assert best.stat().st_mtime_ns == stamp
    STEPS["evaluate"].done_file(run).unlink()
    lines = []
    run_pipeline(TINY, run_id="tiny", runs_root=str(run.parent), echo=lines.append)
    ran = [l for l in lines if "done in" in l]
    assert len(ran) == 1 and "evaluate" in ran[0] and STEPS["evaluate"].done_file(run).is_file()
    assert best.stat().st_mtime_ns == stamp


def test_same_run_id_with_other_params_is_refused(tiny, tmp_path):
    run, _ = tiny
    other = yaml.safe_load(TINY.read_text())
    other["selfplay"]["games"] += 1
    with pytest.raises(ValueError, match="already holds a run with other params"):
        run_pipeline(other | {"name": "tiny"}, run_id="tiny", runs_root=str(run.parent), echo=lambda _: None)


@pytest.mark.parametrize("step", ["selfplay", "train"])
def test_typo_in_injected_parameters_fails_naming_it(step, tmp_path):
    """Papermill only warns about an unknown parameter; the stage's first cell stops on it."""
    out = tmp_path / "out"
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(STAGES / STEPS[step].notebook), str(tmp_path / "executed.ipynb"),
                            parameters={"gmaes": 3, "out_dir": str(out)}, kernel_name="python3", progress_bar=False)
    assert "unknown parameter(s) ['gmaes']" in str(err.value) and "allowed:" in str(err.value)
    assert not out.exists()  # nothing ran after the check


def _bad(tmp_path, **changes) -> Path:
    params = yaml.safe_load(TINY.read_text()) | changes
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"sefplay": {"games": 3}}, "unknown key(s) ['sefplay']"),
    ({"selfplay": {"gmaes": 3}}, "selfplay.gmaes is not a parameter of selfplay.ipynb; allowed:"),
    ({"selfplay": {"games": "many"}}, "selfplay.games='many' has type str, expected int"),
    ({"train": {"batch_size": 1.5}}, "train.batch_size=1.5 has type float, expected int"),
    ({"preprocess": {"hcpe_inputs": ["no/such/folder"]}}, "no/such/folder does not exist"),
    ({"steps": ["selfplay", "trian"]}, "unknown step(s) ['trian']"),
    ({"steps": []}, "'steps' must be a non-empty list"),
])
def test_bad_params_fail_before_any_notebook_runs(changes, message, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        run_pipeline(_bad(tmp_path, **changes), runs_root=str(runs), echo=lambda _: None)
    assert message in str(err.value)
    assert not runs.exists()


def test_missing_params_file_and_missing_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    stages = tmp_path / "stages"
    stages.mkdir()
    shutil.copy(STAGES / "selfplay.ipynb", stages)
    params = yaml.safe_load(TINY.read_text()) | {"stages_dir": str(stages)}
    with pytest.raises(FileNotFoundError, match="needs notebook .*preprocess.ipynb, which does not exist"):
        load_params(params)


def test_command_line_reports_bad_params(tmp_path, capsys):
    code = main(["run", str(_bad(tmp_path, selfplay={"gmaes": 3})), "--runs-root", str(tmp_path / "runs")])
    assert code == 2 and "selfplay.gmaes" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("path", PARAMS, ids=[p.stem for p in PARAMS])
def test_shipped_params_files_are_valid(path):
    """Every params file in params/ passes the checks against the stage notebooks."""
    params = load_params(path)
    assert params["steps"] and all(params.get(s) is None or isinstance(params[s], dict) for s in params["steps"])


@pytest.mark.parametrize("path", PARAMS, ids=[p.stem for p in PARAMS])
def test_shipped_train_sections_are_valid_configs(path):
    """Each params file's train section, over the notebook's defaults, is a valid TrainConfig that builds its model."""
    from maou_nb.pipeline import notebook_parameters
    from maou_nb.train import TrainConfig, build_train_model
    declared = notebook_parameters(STAGES / "train.ipynb")
    config = TrainConfig.from_dict({**declared, **(yaml.safe_load(path.read_text()).get("train") or {})},
                                   check_files=False)
    assert build_train_model(config).arch == config.model


def test_shipped_params_cover_the_documented_runs():
    assert {"quickstart", "maou-default", "resnet", "vit", "mlp-mixer", "gpu-example", "tiny"} <= {p.stem for p in PARAMS}
