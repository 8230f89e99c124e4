"""The pipeline end to end on params/tiny.yaml: layout, rerun skips finished steps, bad parameters fail early."""
import re
import shutil
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml

from maou_nb.cli import main
from maou_nb.pipeline import STEPS, load_params, run_pipeline
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
    ({"train": {"batch_size": 1.5}}, "train.batch_size=1.5: wrong type float; expected int"),
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
def test_shipped_params_files_are_valid(path, request):
    """Every params file in params/ passes the checks against the stage notebooks (real-hcpe reads ../shared)."""
    if path.stem == "real-hcpe":
        request.getfixturevalue("shared_dir")   # its input is the developers' reference file: skips without it
    params = load_params(path)
    assert params["steps"] and all(params.get(s) is None or isinstance(params[s], dict) for s in params["steps"])


@pytest.mark.parametrize("path", PARAMS, ids=[p.stem for p in PARAMS])
def test_shipped_train_sections_are_valid_configs(path):
    """Each params file's train section, over the notebook's wired defaults, is a valid TrainConfig that builds its model."""
    from maou_nb.pipeline import notebook_parameters
    from maou_nb.model import build_train_model
    from maou_nb.config import TrainConfig
    declared = notebook_parameters(STAGES / "train.ipynb")
    declared.pop("config")
    config = TrainConfig.from_dict({**declared, **(yaml.safe_load(path.read_text()).get("train") or {})},
                                   check_files=False)
    assert build_train_model(config.model, config.stages(), config.model_config, config.preset).arch == config.model


def test_shipped_params_cover_the_documented_runs():
    assert {"quickstart", "maou-default", "resnet", "vit", "mlp-mixer", "gpu-example", "tiny"} <= {p.stem for p in PARAMS}


# ---- every bad parameter is refused before any step runs (issue 11) ---------------------------------------------

def _params_file(tmp_path, params: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"train": {"batch_size": -5}}, "train.batch_size=-5: allowed an int >= 1"),
    ({"train": {"stage1_threshold": 1.5}}, "train.stage1_threshold=1.5: allowed a number > 0 and <= 1"),
    ({"train": {"model": "transformer"}}, "train.model='transformer': allowed one of ['resnet', 'vit', 'mlp-mixer']"),
    ({"train": {"seed": -1}}, "train.seed=-1: allowed an int >= 0"),
    ({"train": {"start_epoch": 3, "epoch": 2}}, "train.start_epoch=3: must be < epoch=2"),
    ({"selfplay": {"games": -5}}, "selfplay.games=-5: allowed an int >= 1. Set selfplay.games to such a value"),
    ({"selfplay": {"depth": 3}}, "selfplay.depth=3: allowed one of [1, 2]"),
    ({"selfplay": {"temperature": -1.0}}, "selfplay.temperature=-1.0: allowed a number >= 0"),
    ({"preprocess": {"test_ratio": 1.5}}, "preprocess.test_ratio=1.5: allowed a number > 0 and < 1"),
    ({"stage_data": {"memory_bytes": 0}}, "stage_data.memory_bytes=0: allowed an int >= 1048576"),
    ({"export": {"verify_positions": 0}}, "export.verify_positions=0: allowed an int >= 1"),
    ({"export": {"tolerance": {"atol": 1e-3}}}, "export.tolerance={'atol': 0.001}: give exactly atol and rtol"),
    ({"evaluate": {"games": 0}}, "evaluate.games=0: allowed an int >= 1"),
    ({"evaluate": {"opponents": ["radnom"]}}, "evaluate.opponents: 'radnom': unknown kind 'radnom'"),
    ({"evaluate": {"opponents": ["usi:/no/such/engine"]}}, "'usi:/no/such/engine': /no/such/engine does not exist"),
    ({"evaluate": {"opponents": ["baseline:depth=5"]}}, "'baseline:depth=5': depth=5"),
    ({"selfplay": {"games": 2}, "preprocess": {"test_ratio": 0.1}},
     "selfplay.games=2 split by preprocess.test_ratio=0.1 (preprocess.seed=0) puts 2 game(s) in training and 0 in "
     "validation, leaving validation empty. Set selfplay.games to at least 5"),
])
def test_out_of_range_values_fail_before_any_step(changes, message, tmp_path):
    """Ranges, choices and cross-field rules of every step, checked by the step's own checker in load_params."""
    runs = tmp_path / "runs"
    with pytest.raises(ValueError) as err:
        run_pipeline(_bad(tmp_path, **changes), runs_root=str(runs), echo=lambda _: None)
    assert message in str(err.value) and str(tmp_path / "bad.yaml") in str(err.value)
    assert not runs.exists()


@pytest.mark.parametrize("convert, message", [
    ({}, "convert.inputs=[]: no game records given. List record files or folders under convert.inputs"),
    ({"inputs": ["."], "min_moves": 50, "max_moves": 10}, "convert.min_moves=50 > convert.max_moves=10"),
    ({"inputs": ["."], "errors": "ignore"}, "convert.errors='ignore': allowed one of ['raise', 'skip']"),
    ({"inputs": ["."], "allowed_endgame_status": ["TORIO"]}, "unknown ending 'TORIO'"),
])
def test_bad_convert_params_fail_before_any_step(convert, message, tmp_path):
    params = {"steps": ["convert", "preprocess"], **({"convert": convert} if convert else {})}
    with pytest.raises(ValueError, match=re.escape(message)):
        load_params(_params_file(tmp_path, params))


def test_a_bad_last_step_stops_the_command_before_anything_runs(tmp_path, capsys):
    """The train section (the last step) is bad: no self-play, no run folder, one message naming key, value and fix."""
    params = yaml.safe_load(TINY.read_text())
    params["steps"] = ["selfplay", "preprocess", "stage_data", "train"]
    params["train"]["batch_size"] = -5
    runs = tmp_path / "runs"
    code = main(["run", str(_params_file(tmp_path, params)), "--runs-root", str(runs), "--run-id", "r"])
    err = capsys.readouterr().err
    assert code == 2 and "train.batch_size=-5: allowed an int >= 1" in err
    assert not runs.exists()


@pytest.mark.parametrize("text, kind", [("- selfplay\n- train\n", "list"), ("just some words\n", "str")])
def test_params_file_that_is_not_a_mapping(text, kind, tmp_path, capsys):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    code = main(["run", str(path), "--runs-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: the params file holds a YAML {kind}, not a mapping" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run_id", ["../escaped", "a/b", "..", "/abs/escaped"])
def test_run_id_cannot_leave_the_runs_root(run_id, tmp_path, capsys):
    runs = tmp_path / "deep" / "runs"
    code = main(["run", str(TINY), "--runs-root", str(runs), "--run-id", run_id, "--only", "selfplay"])
    err = capsys.readouterr().err
    assert code == 2 and f"run id {run_id!r}: use only letters, digits, '.', '_' and '-'" in err
    assert not (tmp_path / "deep").exists() and not Path("/abs/escaped").exists()


@pytest.mark.parametrize("only, message", [
    ("trian", "--only: unknown step(s) ['trian']; known steps: ['selfplay', 'convert',"),
    ("selfplay,convert", "--only: step(s) ['convert'] are not among this params file's steps"),
    ("export", "step 'export' needs checkpoints/best.pt (made by step 'train') for its parameter checkpoint"),
    ("stage_data", "step 'stage_data' needs data/split/train (made by step 'preprocess')"),
    ("preprocess", "needs data/selfplay/hcpe (made by step 'selfplay') or data/hcpe (made by step 'convert')"),
])
def test_only_is_checked_before_anything_is_created(only, message, tmp_path, capsys):
    """A typo in --only, or a step whose inputs no step makes, is refused before the run folder exists."""
    runs = tmp_path / "runs"
    code = main(["run", str(TINY), "--runs-root", str(runs), "--run-id", "r", "--only", only])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not runs.exists()


def test_step_inputs_come_from_earlier_steps_or_the_run(tiny):
    """`--only` on a finished run: what the skipped steps made is in the run, so the check passes."""
    from maou_nb.pipeline import check_inputs
    run, _ = tiny
    params = load_params(TINY)
    check_inputs(params, run, ["export", "evaluate"])
    with pytest.raises(FileNotFoundError, match="step 'export' needs checkpoints/best.pt"):
        check_inputs(params, run.parent / "fresh", ["export"])


def test_help_lists_every_subcommand(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith("    ") and l.split()}
    assert {"run", "usi"} <= set(lines) and all(len(lines[c].split()) > 3 for c in ("run", "usi"))


def test_a_failing_step_reports_the_exception_and_the_notebook(tmp_path, capsys):
    """Export of a file that is not a checkpoint, on a folder that is not data: the kernel's error, not papermill's name."""
    (tmp_path / "not-a-checkpoint.pt").write_text("hello")
    (tmp_path / "not-data").mkdir()
    params = {"name": "fails", "steps": ["export"],
              "export": {"checkpoint": str(tmp_path / "not-a-checkpoint.pt"), "positions_data": str(tmp_path / "not-data")}}
    runs = tmp_path / "runs"
    code = main(["run", str(_params_file(tmp_path, params)), "--runs-root", str(runs), "--run-id", "r"])
    err = capsys.readouterr().err
    notebook = runs / "r" / "notebooks" / "export.ipynb"
    assert code == 2 and "step 'export' failed: ShardError: " in err and "no manifest.json" in err
    assert f"executed notebook (with the failing cell): {notebook}" in err and notebook.is_file()
    assert "PapermillExecutionError" not in err and "--run-id r" in err
