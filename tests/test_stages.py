"""The stage notebooks: their shape (one parameters cell, validated, names from the library), and what each
writes when the tiny pipeline runs them with papermill, checked with cshogi and the library's readers."""
import inspect
import json
import re
from pathlib import Path

import cshogi
import cshogi.CSA
import nbformat
import numpy as np
import pytest
import yaml

from maou_nb.arena import find_engine
from maou_nb.encoding import legal_moves_label
from maou_nb.export import load_onnx, load_policy
from maou_nb.pipeline import STAGE_MARK, STEPS, notebook_parameters, read_json
from maou_nb.selfplay import search_scores
from maou_nb.storage import (game_id, load_array, load_checkpoint, load_game_ids, load_hcpe,
                             manifest_shards, read_manifest)
from tiny_run import STAGES, TINY, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def tiny_params():
    return yaml.safe_load(TINY.read_text())


def done(run, step) -> dict:
    return read_json(STEPS[step].done_file(run))


# ---- the notebooks themselves -------------------------------------------------------------------------------

@pytest.mark.parametrize("step", list(STEPS))
def test_notebook_shape(step):
    """Title and prose, one `# Stage parameters` cell tagged `parameters`, validated in the next cell, `mark_done` last."""
    nb = nbformat.read(STAGES / STEPS[step].notebook, as_version=4)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ") and len(cells[0].source) > 200
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, tagged
    i = tagged[0]
    assert cells[i].source.startswith(STAGE_MARK)
    assert "params = stage_params(globals())" in cells[i + 1].source
    code = [c for c in cells if c.cell_type == "code"]
    assert code[-1].source.startswith(f'mark_done(out_dir, "{step}"') and '"plots"' in code[-1].source
    assert all(not c.get("outputs") for c in code), "commit the notebooks clean (nbdev-clean)"


@pytest.mark.parametrize("step", list(STEPS))
def test_notebook_declares_its_wiring(step):
    """Every parameter the pipeline passes (the wiring, out_dir, resume_from for train) is declared."""
    declared = notebook_parameters(STAGES / STEPS[step].notebook)
    given = set(STEPS[step].wire(Path("/run"))) | {"out_dir"} | ({"resume_from"} if step == "train" else set())
    assert given <= set(declared), given - set(declared)


@pytest.mark.parametrize("step", list(STEPS))
def test_papermill_reads_every_parameter(step):
    """Papermill parses each declared parameter (a stray `=` in a comment would make it warn "unknown parameter")."""
    from papermill.inspection import inspect_notebook
    path = STAGES / STEPS[step].notebook
    assert set(inspect_notebook(str(path))) == set(notebook_parameters(path))


WIRED_TRAIN = ["stage1_data", "stage2_data", "stage2_val_data", "stage3_data", "stage3_val_data", "out_dir", "device",
               "resume_from"]


def test_train_notebook_restates_no_default():
    """The train notebook declares only what the pipeline wires in (each a TrainConfig field) and one `config` dict:
    every other default is TrainConfig's, so a train section means the same through the pipeline and through train()."""
    import dataclasses
    from maou_nb.config import TrainConfig
    declared = notebook_parameters(STAGES / "train.ipynb")
    assert list(declared) == WIRED_TRAIN + ["config"] and declared["config"] == {}
    assert set(WIRED_TRAIN) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert STEPS["train"].rest == "config"
    wired = {k: v for k, v in declared.items() if k != "config"}
    TrainConfig.from_dict(wired, check_files=False)  # the wired defaults over TrainConfig's are a valid config


@pytest.mark.parametrize("path", sorted((TINY.parent).glob("*.yaml")), ids=lambda p: p.stem)
def test_train_section_reaches_the_notebook_whole(path):
    """Each params file's train section is split into the notebook's wired names and `config`, and the notebook's
    recombination gives the TrainConfig that train() builds from the section itself."""
    from maou_nb.config import TrainConfig
    section = yaml.safe_load(path.read_text()).get("train") or {}
    declared = notebook_parameters(STAGES / "train.ipynb")
    values = {**STEPS["train"].wire(Path("/run")), **section, "out_dir": "/run"}
    given = STEPS["train"].notebook_values(values, declared)
    assert set(given) <= set(declared) and set(given["config"]) == set(values) - set(declared)
    nb_params = {**{k: v for k, v in declared.items() if k != "config"}, **given}
    overrides = nb_params.pop("config")
    through_notebook = TrainConfig.from_dict({**nb_params, **overrides}, check_files=False)
    direct = TrainConfig.from_dict({k: v for k, v in {**declared, **values}.items() if k != "config"}, check_files=False)
    assert through_notebook == direct


def test_unknown_train_key_is_refused_once_with_a_hint(tmp_path):
    """A misspelt train key is refused by TrainConfig's own checker, with the name it meant, before anything runs."""
    from maou_nb.pipeline import load_params
    params = yaml.safe_load(TINY.read_text())
    params["train"]["batchsize"] = 64
    with pytest.raises(ValueError, match=r"params: train: unknown training parameter\(s\): 'batchsize' "
                                         r"\(did you mean 'batch_size'\?\)"):
        load_params(params)


@pytest.mark.parametrize("step, function, extra", [
    ("selfplay", "maou_nb.selfplay.play_games", {"games"}),
    ("convert", "maou_nb.records.convert_records", set()),
    ("preprocess", "maou_nb.preprocess.preprocess maou_nb.preprocess.split_hcpe", set()),
    ("stage_data", "maou_nb.preprocess.make_labelled_data", {"hcpe_train", "hcpe_val", "check_children"}),
    ("export", "maou_nb.export.export_onnx", {"checkpoint", "positions_data", "verify_positions"}),
    ("evaluate", "maou_nb.arena.evaluate", {"ladder_levels", "policy_temperatures"}),
])
def test_parameter_names_are_the_library_names(step, function, extra):
    """A stage's parameters are its library function's argument names (plus the few listed here)."""
    import importlib
    names = set()
    for dotted in function.split():
        module, name = dotted.rsplit(".", 1)
        names |= set(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    declared = set(notebook_parameters(STAGES / STEPS[step].notebook))
    assert declared - {"out_dir"} - extra <= names, declared - {"out_dir"} - extra - names


# ---- what each stage wrote in the tiny run ---------------------------------------------------------------------

def test_every_notebook_ran_clean(run):
    """Each executed notebook is kept in the run, with its injected parameters and no error output."""
    for step in yaml.safe_load(TINY.read_text())["steps"]:
        nb = nbformat.read(run / "notebooks" / STEPS[step].notebook, as_version=4)
        assert any(c.source.startswith("# Parameters") for c in nb.cells), step
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"], step
        info = done(run, step)
        assert info["step"] == step and info["plots"], step
        for plot in info["plots"]:
            with open(plot, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", plot


def test_convert(records_dir, tmp_path):
    """The convert notebook (not in the tiny run) on the shared records: every row is a legal position and move."""
    import papermill as pm
    out = tmp_path / "hcpe"
    pm.execute_notebook(str(STAGES / "convert.ipynb"), str(tmp_path / "convert.ipynb"), kernel_name="python3",
                        parameters={"inputs": [str(records_dir)], "workers": 1, "out_dir": str(out)}, progress_bar=False)
    info = read_json(out / "convert.done.json")
    manifest = read_manifest(out, expect_kind="hcpe")
    assert info["positions"] == manifest["rows"] > 0 and info["games"] == manifest["stats"]["games_kept"] > 0
    hcpe = np.concatenate([load_hcpe(p) for p in manifest_shards(out)])
    board = cshogi.Board()
    for row in hcpe:
        board.set_hcp(row["hcp"])
        assert board.is_legal(board.move_from_move16(int(row["bestMove16"])))
    assert info["black_wins"] + info["white_wins"] + info["draws"] == len(np.unique(
        np.concatenate([load_game_ids(p) for p in manifest_shards(out)])))
    shown = [o.get("data", {}) for c in nbformat.read(tmp_path / "convert.ipynb", as_version=4).cells
             for o in c.get("outputs", [])]
    assert sum("image/png" in d for d in shown) == 1 and sum("image/svg+xml" in d for d in shown) == 1


def test_selfplay(run, tiny_params):
    """CSA files and HCPE rows agree game by game: each row is the position before the CSA's next move."""
    info = done(run, "selfplay")
    n = tiny_params["selfplay"]["games"]
    csa = sorted((run / "data/selfplay/csa").glob("*.csa"))
    manifest = read_manifest(run / "data/selfplay/hcpe", expect_kind="hcpe")
    assert info["games"] == len(csa) == manifest["games"] == n
    assert info["positions"] == manifest["rows"]
    assert info["black_wins"] + info["white_wins"] + info["draws"] == n
    shards = manifest_shards(run / "data/selfplay/hcpe", "hcpe")
    hcpe = np.concatenate([load_hcpe(p) for p in shards])
    ids = np.concatenate([load_game_ids(p) for p in shards])
    relabelled, best_labels = 0, tiny_params["selfplay"].get("move_labels") == "best"
    for path in csa:
        record = cshogi.CSA.Parser.parse_file(str(path))[0]
        rows = hcpe[ids == game_id(path.stem)]
        assert len(rows) == len(record.moves) > 0, path.name
        random_side = record.names.index("random") if "random" in record.names else None  # 0 Black, 1 White
        board = cshogi.Board(record.sfen)
        for row, move in zip(rows, record.moves):
            assert np.array_equal(row["hcp"], np.frombuffer(board_hcp(board), np.uint8))
            label = board.move_from_move16(int(row["bestMove16"]))
            if best_labels:                 # every row carries the engine's best-scored move there
                moves, scores = search_scores(board, tiny_params["selfplay"].get("depth", 1))
                assert label == moves[scores.argmax()], path.name
                relabelled += label != move
            elif board.turn == random_side:   # the random mover's rows carry the baseline's move, legal here
                assert board.is_legal(label), path.name
                relabelled += label != move
            else:
                assert label == move
            board.push(move)
    if tiny_params["selfplay"].get("random_opponent_share") or best_labels:
        assert relabelled > 0   # rows whose move is not the one played: the random mover's, or the engine's best


def board_hcp(board: cshogi.Board) -> bytes:
    hcp = np.zeros(1, cshogi.HuffmanCodedPos)
    board.to_hcp(hcp)
    return hcp.tobytes()


def test_preprocess(run):
    """The split keeps every row, puts each game on one side only, and merging keeps every occurrence."""
    selfplay_rows = read_manifest(run / "data/selfplay/hcpe")["rows"]
    side_ids = {}
    for side in ("train", "val"):
        shards = manifest_shards(run / "data/split" / side, "hcpe")
        side_ids[side] = set(np.concatenate([load_game_ids(p) for p in shards]).tolist())
    assert not side_ids["train"] & side_ids["val"] and side_ids["train"] and side_ids["val"]
    info = done(run, "preprocess")
    assert info["train_rows"] + info["val_rows"] == selfplay_rows
    for side in ("train", "val"):
        manifest = read_manifest(run / "data/preprocessed" / side, expect_kind="preprocessed")
        positions = np.concatenate([load_array(p) for p in manifest_shards(run / "data/preprocessed" / side)])
        assert manifest["rows"] == len(positions) == info[f"{side}_positions"]
        assert positions["count"].sum() == info[f"{side}_rows"]
        assert len({p.tobytes() for p in positions["hcp"]}) == len(positions)  # merged: no position twice
        board = cshogi.Board()
        for hcp in positions["hcp"][:20]:
            board.set_hcp(hcp)
            assert board.is_ok()


def test_stage_data(run):
    """Stage 1 is the fixed curriculum; Stage 2 holds the split's distinct positions with cshogi's legal moves."""
    from maou_nb.datasets import open_stage_data
    info = done(run, "stage_data")
    assert info["stage1_positions"] == read_manifest(run / "data/stage1", "stage1")["rows"] == 1105
    in_check = {}
    for side in ("train", "val"):
        stage2 = open_stage_data(2, run / "data/stage2" / side)
        games = read_manifest(run / "data/preprocessed" / side)["rows"]
        added = info["stage2_check_children"] if side == "train" else 0   # positions in check join training only
        assert len(stage2) == info[f"stage2_{side}_positions"] and games <= len(stage2) <= games + added
        records = np.concatenate(stage2.arrays)
        board = cshogi.Board()
        for i in range(0, len(records), max(1, len(records) // 10)):
            board.set_hcp(records["hcp"][i])
            legal = stage2[i]["legal"].numpy().astype(bool)
            assert legal.sum() == len(list(board.legal_moves))
            assert np.array_equal(legal, legal_moves_label(board))
        checks = [board.set_hcp(h) or board.is_check() for h in records["hcp"]]
        in_check[side] = float(np.mean(checks))
    if info["stage2_check_children"]:
        assert in_check["train"] > 2 * in_check["val"]   # the hard positions are no longer rare in training


def test_train(run, tiny_params):
    """Checkpoints of every stage load and verify, telemetry covers every stage, TensorBoard has events."""
    info = done(run, "train")
    stages = ["1", "2", "3"] if tiny_params["train"]["stage"] == "all" else [str(tiny_params["train"]["stage"])]
    assert sorted(info["stages"]) == stages and info["stopped"] is None
    for name in ["last", "best"] + [f"stage{s}" for s in stages]:
        payload = load_checkpoint(run / "checkpoints" / f"{name}.pt")
        assert payload["arch"] == "resnet" and payload["model"], name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records if r["kind"] == "val"} == set(stages)
    stats = read_json(run / "stats.json")
    assert stats["stage"] == stages[-1] and "elapsed_s" in stats
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == [f"stage{s}.png" for s in stages]


def test_export(run):
    """model.onnx reloads and gives the checkpoint's outputs on real positions from the validation data."""
    info = done(run, "export")
    onnx_model = load_onnx(run / "models" / "model.onnx")
    assert onnx_model.meta["checkpoint_sha256"] and (run / "models" / "model_fp16.onnx").is_file()
    positions = np.concatenate([load_array(p) for p in manifest_shards(run / "data/preprocessed/val")])["hcp"][:32]
    got = onnx_model.predict(positions)
    want = load_policy(run / "checkpoints" / "best.pt").predict(positions)
    assert np.abs(got[0] - want[0]).max() < 1e-4 and np.abs(got[1] - want[1]).max() < 1e-4
    assert info["max_abs_diff"]["fp32"] < 1e-4


def test_evaluate(run, tiny_params):
    """Each opponent played the asked number of games; every saved game replays legally in cshogi."""
    info = done(run, "evaluate")
    games = tiny_params["evaluate"]["games"]
    evaluation = read_json(run / "eval" / "evaluation.json")
    assert [r["opponent_spec"] for r in evaluation["rows"]] == ["random", "baseline"]
    for row in evaluation["rows"]:
        assert row["games"] == row["wins"] + row["draws"] + row["losses"] == games
    assert [r["opponent"] for r in info["results"]] == [r["opponent"] for r in evaluation["rows"]]
    # the tiny params search (2 simulations): the policy alone is also played against the first opponent
    assert info["simulations"] == tiny_params["evaluate"]["simulations"] > 0
    temperatures = tiny_params["evaluate"]["policy_temperatures"]    # one policy-alone match per temperature
    assert [(r["opponent"], r["temperature"]) for r in info["policy_only"]] == \
        [(evaluation["rows"][0]["opponent"], t) for t in temperatures]
    assert all(r["wins"] + r["draws"] + r["losses"] == games for r in info["policy_only"])
    if find_engine() is None:                                      # the ladder needs fairy-stockfish
        assert "ladder" not in info
    else:                                                          # one level asked; its games are kept apart
        assert [r["level"] for r in info["ladder"]] == tiny_params["evaluate"]["ladder_levels"]
        assert all(r["wins"] + r["draws"] + r["losses"] == games for r in info["ladder"])
        assert len(list((run / "eval" / "ladder").glob("level_*/*.csa"))) == games
    files = sorted((run / "eval").glob("*/*.csa"))
    assert len(files) == 2 * games
    policy_files = sorted((run / "eval" / "policy_alone").glob("t*/*/*.csa"))   # kept, so a lost game can be read
    assert sorted({f.parent.parent.name for f in policy_files}) == sorted(f"t{t:g}" for t in temperatures)
    assert len(policy_files) == games * len(temperatures)
    for path in files + policy_files:
        record = cshogi.CSA.Parser.parse_file(str(path))[0]
        board = cshogi.Board(record.sfen)
        for move in record.moves:
            assert board.is_legal(move), path.name
            board.push(move)


def test_summary(run):
    """summary.md has a section per step, with its plots linked relative to the run."""
    text = (run / "summary.md").read_text()
    for step in yaml.safe_load(TINY.read_text())["steps"]:
        assert f"## {step}" in text
        for plot in done(run, step)["plots"]:
            assert str((run / plot).relative_to(run)) in text or plot.replace(str(run) + "/", "") in text
    evaluation = text[text.index("## evaluate"):]
    assert "| opponent | wins | draws | losses | score |" in evaluation  # the results as a table
    for row in done(run, "evaluate")["results"]:
        assert f"| {row['opponent']} | {row['wins']} | {row['draws']} | {row['losses']} |" in evaluation
    for row in done(run, "evaluate").get("ladder", []):            # the ladder too, a level a line
        assert f"| {row['level']} | {row['wins']} | {row['draws']} | {row['losses']} |" in evaluation


# ---- what the executed notebooks show, and what a step prints ------------------------------------------------

def outputs(run, step) -> list[dict]:
    nb = nbformat.read(run / "notebooks" / STEPS[step].notebook, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def mime_count(run, step, mime) -> int:
    return sum(mime in o.get("data", {}) for o in outputs(run, step))


def stream_text(run, step) -> str:
    return "".join(o["text"] for o in outputs(run, step) if o.get("output_type") == "stream")


def test_executed_notebooks_show_their_figures(run, tiny_params):
    """Every figure a stage makes is a PNG output of its executed notebook (MPLBACKEND=Agg or not), every board an
    SVG one; no figure is left as `<Figure size ...>` text."""
    stages = 3 if tiny_params["train"]["stage"] == "all" else 1
    want_png = {"selfplay": 1, "preprocess": 1, "stage_data": 1, "train": stages, "export": 1, "evaluate": 1}
    want_svg = {"selfplay": 1, "preprocess": 1, "stage_data": 2, "export": 1, "evaluate": 1}
    for step in tiny_params["steps"]:
        assert mime_count(run, step, "image/png") == want_png[step], step
        assert mime_count(run, step, "image/svg+xml") == want_svg.get(step, 0), step
        texts = ["".join(o["data"].get("text/plain", "")) for o in outputs(run, step) if "data" in o]
        assert not [t for t in texts if t.startswith("<Figure")], step
    for o in outputs(run, "train"):
        if "image/png" in o.get("data", {}):
            import base64
            assert base64.b64decode(o["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_executed_notebooks_keep_a_readable_progress_record(run, tiny_params):
    """Batch progress is text lines with counts and rates (no frozen widget), and training logs its steps and its
    gate metric against the threshold at each validation."""
    games = tiny_params["selfplay"]["games"]
    assert f"self-play: {games}/{games} game (100%) in " in stream_text(run, "selfplay")
    train = stream_text(run, "train")
    assert re.search(r"^stage 1 epoch 0 step 1: loss [\d.]+, \d+ samples/s, ETA \d", train, re.M), train
    threshold = tiny_params["train"]["stage1_threshold"]
    assert re.search(rf"^stage 1 epoch 1 step \d+ validation: loss [\d.e-]+, .*gate [\d.]+ >= {threshold:g} \(reached\)",
                     train, re.M), train
    assert "stage 3 epoch 1 step" in train and "validation" in train
    evaluate = stream_text(run, "evaluate")
    assert f"games: {tiny_params['evaluate']['games']}/{tiny_params['evaluate']['games']} game (100%)" in evaluate
    for step in tiny_params["steps"]:
        assert mime_count(run, step, "application/vnd.jupyter.widget-view+json") == 0, step
        assert "0%|" not in stream_text(run, step), step


def test_tensorboard_names_the_run_by_its_id(run):
    """The train step's TensorBoard events sit in logs/<run id>, so `tensorboard --logdir <run>/logs` shows the id."""
    assert [p.parent.name for p in (run / "logs").rglob("events.out.tfevents.*")] == [run.name]


def test_a_step_streams_its_lines_and_the_kernel_is_quiet(tmp_path, capfd):
    """A stage notebook run as the pipeline runs it: its output lines reach the terminal as they are printed,
    prefixed with the step, and the kernel adds no transport warning or interrupt message."""
    from maou_nb.pipeline import _run_notebook
    _run_notebook(STAGES / "selfplay.ipynb", tmp_path / "selfplay.ipynb",
                  {"games": 2, "max_moves": 16, "workers": 1, "out_dir": str(tmp_path / "out")}, cwd=tmp_path)
    out, err = capfd.readouterr()
    assert "  selfplay | self-play: 2/2 game (100%) in " in out, out
    assert "without encryption" not in err and "KeyboardInterrupt" not in err, err
    assert (tmp_path / "out" / "selfplay.done.json").is_file()
    assert "self-play: 2/2 game" in "".join(o.get("text", "") for c in nbformat.read(tmp_path / "selfplay.ipynb", as_version=4).cells
                                            for o in c.get("outputs", []))


def test_progress_is_a_widget_only_for_a_notebook_session(monkeypatch):
    """In a kernel a Jupyter server started for a notebook (JPY_SESSION_NAME set) progress is a live widget; in a
    kernel run headless (nbclient, papermill) it is text lines that stay readable in the saved notebook."""
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from maou_nb.settings import progress\nfor _ in progress(range(3), desc='loop', unit='pos'): pass")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    monkeypatch.delenv("MAOU_NB_PROGRESS", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    headless = NotebookClient(nb, kernel_name="python3").execute().cells[0].outputs
    assert [o["text"].split(" in ")[0] for o in headless if o["output_type"] == "stream"] == ["loop: 3/3 pos (100%)"]
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/nbs/demo.ipynb")
    live = NotebookClient(nb, kernel_name="python3").execute().cells[0].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in live)
