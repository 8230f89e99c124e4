"""maou_nb.preprocess: dedup against a brute-force recomputation, external == in-memory merge, Stage 1/2 labels
against cshogi, the split by game, and refusal of bad input."""
import math
from pathlib import Path

import cshogi
import numpy as np
import pytest

from maou_nb import preprocess as pp
from maou_nb.encoding import encode_position, legal_moves_label, move_label, reachable_squares_label
from maou_nb.records import convert_records, random_games
from maou_nb.selfplay import play_games
from maou_nb.storage import (ShardError, list_shards, load_array, load_game_ids, load_hcpe, read_manifest,
                             save_hcpe, sidecar_path)


@pytest.fixture(scope="module")
def hcpe_dir(tmp_path_factory, records_dir) -> Path:
    """HCPE shards from three real sources: cshogi random games, the shared game records, baseline self-play."""
    root = tmp_path_factory.mktemp("hcpe")
    hcpe, ids = random_games(60, seed=7)
    save_hcpe(root / "in" / "random-a.npy", hcpe[:700], ids[:700])
    save_hcpe(root / "in" / "random-b.npy", hcpe[700:], ids[700:] + 10_000)
    convert_records(records_dir, root / "in" / "records", workers=1)
    play_games(6, root / "selfplay", seed=3, max_moves=60, progress=False, workers=1)
    for shard in (root / "selfplay" / "hcpe").glob("*.npy"):
        shard.rename(root / "in" / shard.name)
    return root / "in"


def all_rows(folder: Path) -> np.ndarray:
    """Every HCPE row under `folder`, in list_shards order."""
    return np.concatenate([np.asarray(load_hcpe(p)) for p in list_shards(folder)])


def read_preprocessed(folder: Path):
    """(positions, list of each position's move records) of a preprocessed folder."""
    manifest = read_manifest(folder, expect_kind="preprocessed")
    positions, moves = [], []
    for name in manifest["shards"]:
        p = load_array(folder / name, dtype=pp.POSITION_DTYPE)
        m = load_array(sidecar_path(folder / name, "moves"), dtype=pp.MOVE_DTYPE)
        positions.append(np.asarray(p))
        moves += [np.asarray(m[s:s + c]) for s, c in zip(p["move_start"], p["move_count"])]
    return np.concatenate(positions), moves


def brute_force(rows: np.ndarray) -> dict:
    """{hcp bytes: [count, summed mover result, {label: [count, wins]}]} by a plain Python loop with cshogi."""
    out, board = {}, cshogi.Board()
    for row in rows:
        board.set_hcp(row["hcp"])
        move = board.move_from_move16(int(np.uint16(row["bestMove16"])))
        result = {0: 0.5, 1: 1.0 if board.turn == cshogi.BLACK else 0.0,
                  2: 1.0 if board.turn == cshogi.WHITE else 0.0}[int(row["gameResult"])]
        entry = out.setdefault(row["hcp"].tobytes(), [0, 0.0, {}])
        entry[0] += 1
        entry[1] += result
        per_move = entry[2].setdefault(move_label(board, move), [0, 0.0])
        per_move[0] += 1
        per_move[1] += result
    return out


def test_dedup_matches_brute_force(hcpe_dir, tmp_path):
    rows = all_rows(hcpe_dir)
    pp.preprocess(hcpe_dir, tmp_path / "pre", progress=False)
    positions, moves = read_preprocessed(tmp_path / "pre")
    truth = brute_force(rows)
    assert positions["count"].sum() == len(rows)
    assert len(positions) == len(truth) < len(rows)  # some positions repeat (openings, duplicated records)
    assert ((positions["value"] >= 0) & (positions["value"] <= 1)).all()
    board = cshogi.Board()
    for p, m in zip(positions, moves):
        count, total, per_move = truth[p["hcp"].tobytes()]
        assert p["count"] == count and m["count"].sum() == count
        assert p["value"] == pytest.approx(total / count, abs=1e-6)
        assert {int(l): [int(c), float(w)] for l, c, w in zip(m["label"], m["count"], m["wins"])} == per_move
        board.set_hcp(p["hcp"])
        expected_board, expected_hand = encode_position(board)
        assert (p["board"] == expected_board).all() and (p["hand"] == expected_hand).all()
    manifest = read_manifest(tmp_path / "pre")
    assert manifest["rows"] == len(truth) and manifest["input_rows"] == len(rows)
    assert manifest["bytes_per_position"] <= 256


def test_external_merge_equals_in_memory(hcpe_dir, tmp_path):
    memory = pp.preprocess(hcpe_dir, tmp_path / "mem", progress=False)
    external = pp.preprocess(hcpe_dir, tmp_path / "ext", memory_bytes=30_000, rows_per_shard=97, progress=False)
    n_rows = len(all_rows(hcpe_dir))
    assert pp.n_buckets_for(n_rows, 30_000) > 10 and len(external) > len(memory)
    mem_positions, mem_moves = read_preprocessed(tmp_path / "mem")
    ext_positions, ext_moves = read_preprocessed(tmp_path / "ext")
    fields = ["hcp", "board", "hand", "count", "value", "move_count"]
    assert (mem_positions[fields] == ext_positions[fields]).all()
    assert all((a == b).all() for a, b in zip(mem_moves, ext_moves))
    pp.preprocess(hcpe_dir, tmp_path / "par", memory_bytes=300_000, workers=2, progress=False)
    par_positions, par_moves = read_preprocessed(tmp_path / "par")
    assert (mem_positions == par_positions).all()  # same shards too: rows_per_shard is the default here
    assert all((a == b).all() for a, b in zip(mem_moves, par_moves))
    assert not [p for p in (tmp_path / "ext").iterdir() if p.name.startswith(".")]  # buckets and temps removed


def test_stage1_curriculum_matches_cshogi(tmp_path):
    paths = pp.make_stage1_data(tmp_path / "s1")
    records = load_array(paths[0])
    assert len(records) == 1105 and read_manifest(tmp_path / "s1", expect_kind="stage1")["rows"] == 1105
    board = cshogi.Board()
    seen = set()
    sfens = pp.stage1_sfens()
    assert len(sfens) == 1105 and not records["hcp"].any()
    for r, sfen in zip(records, sfens):
        board.set_sfen(sfen)
        expected_board, expected_hand = encode_position(board)
        assert (r["board"] == expected_board).all() and (r["hand"] == expected_hand).all()
        pieces = [p for p in board.pieces if p]
        hand = sum(board.pieces_in_hand[0]) + sum(board.pieces_in_hand[1])
        assert len(pieces) + hand == 1 and board.turn == cshogi.BLACK
        expected = np.zeros((9, 9), bool)
        for move in board.legal_moves:
            expected[cshogi.move_to(move) % 9, cshogi.move_to(move) // 9] = True
        assert expected.any()
        assert (np.unpackbits(r["labels"])[:81].reshape(9, 9).astype(bool) == expected).all(), board.sfen()
        seen.add(board.sfen())
    assert len(seen) == 1105
    on_board = sum(1 for s in seen if s.split()[2] == "-")
    assert on_board == 1098
    # the same inputs give the same bytes
    assert (load_array(pp.make_stage1_data(tmp_path / "again")[0]) == records).all()


def test_stage1_and_stage2_from_hcpe_match_labels(hcpe_dir, tmp_path):
    rows = all_rows(hcpe_dir)
    pp.make_stage2_data(hcpe_dir, tmp_path / "s2", memory_bytes=50_000, progress=False)
    pp.make_stage1_data_from_hcpe(hcpe_dir, tmp_path / "s1", progress=False)
    unique = {r.tobytes() for r in rows["hcp"]}
    board = cshogi.Board()
    for kind, n, oracle in (("stage2", 1496, legal_moves_label),
                            ("stage1", 81, lambda b: reachable_squares_label(b).reshape(81))):
        folder = tmp_path / ("s2" if kind == "stage2" else "s1")
        manifest = read_manifest(folder, expect_kind=kind)
        records = np.concatenate([load_array(folder / s) for s in manifest["shards"]])
        assert len(records) == manifest["rows"] == len(unique)
        assert {r.tobytes() for r in records["hcp"]} == unique
        for r in records:
            board.set_hcp(r["hcp"])
            assert (np.unpackbits(r["labels"])[:n].astype(bool) == oracle(board)).all()


def test_output_folder_must_not_hold_inputs(hcpe_dir, tmp_path):
    with pytest.raises(ValueError, match="holds input"):
        pp.preprocess(hcpe_dir, hcpe_dir, progress=False)
    with pytest.raises(ValueError, match="holds input"):
        pp.make_stage2_data(hcpe_dir, hcpe_dir.parent, progress=False)
    assert len(all_rows(hcpe_dir)) > 0


def test_inputs_by_manifest(hcpe_dir, tmp_path):
    pp.preprocess(hcpe_dir, tmp_path / "pre", progress=False)
    with pytest.raises(ShardError, match="'preprocessed' data but 'hcpe'"):
        pp.make_stage2_data(tmp_path / "pre", tmp_path / "s2", progress=False)
    with pytest.raises(ShardError, match="positions-00000.npy: dtype"):
        pp.make_stage2_data(tmp_path / "pre" / "positions-00000.npy", tmp_path / "s2", progress=False)


def test_split_by_game(hcpe_dir, tmp_path):
    train, val = pp.split_hcpe(hcpe_dir, tmp_path / "a", test_ratio=0.3, seed=5)
    again_train, again_val = pp.split_hcpe(hcpe_dir, tmp_path / "b", test_ratio=0.3, seed=5)
    other_train, _ = pp.split_hcpe(hcpe_dir, tmp_path / "c", test_ratio=0.3, seed=6)

    def games(folder):
        read_manifest(folder, expect_kind="hcpe")
        return np.concatenate([load_game_ids(p) for p in list_shards(folder)])

    def content(folder):
        return np.concatenate([np.asarray(load_hcpe(p)) for p in list_shards(folder)]).tobytes()

    assert not set(games(train)) & set(games(val))
    assert len(games(train)) + len(games(val)) == len(all_rows(hcpe_dir))
    assert len(set(games(val))) > 0 and len(set(games(train))) > len(set(games(val)))
    assert content(train) == content(again_train) and content(val) == content(again_val)
    assert content(train) != content(other_train)
    # every row lands with its game on one side
    all_games = {g for p in list_shards(hcpe_dir) for g in load_game_ids(p)}
    assert set(games(train)) | set(games(val)) == all_games


def test_bad_inputs_are_refused_by_shard_and_row(hcpe_dir, tmp_path):
    rows, _ = random_games(3, seed=11)
    board = cshogi.Board()
    board.set_hcp(rows["hcp"][4])
    illegal = next(m for m in rows["bestMove16"] if not board.is_legal(board.move_from_move16(int(np.uint16(m)))))
    cases = {
        "illegal_move": ("bestMove16", 4, illegal, "row 4"),
        "no_move": ("bestMove16", 2, 0, "row 2"),
        "bad_result": ("gameResult", 3, 7, "row 3"),
    }
    for name, (field, row, value, message) in cases.items():
        bad = rows.copy()
        bad[field][row] = value
        save_hcpe(tmp_path / name / f"{name}.npy", bad)
        with pytest.raises(ShardError, match=f"{name}.npy: {message}"):
            pp.preprocess(tmp_path / name, tmp_path / f"out_{name}", progress=False)
        assert not (tmp_path / f"out_{name}" / "manifest.json").exists()
    for name, row, garbage in (("kings", 5, 255), ("pieces", 6, 0x55)):
        corrupt = rows.copy()
        corrupt["hcp"][row, 2 if name == "pieces" else 0:] = garbage  # bad king squares / bad piece codes
        save_hcpe(tmp_path / name / f"{name}.npy", corrupt)
        for make in (pp.preprocess, pp.make_stage2_data):
            with pytest.raises(ShardError, match=f"{name}.npy: row {row}: the position"):
                make(tmp_path / name, tmp_path / f"out_{name}", progress=False)
    (tmp_path / "wrong").mkdir()
    np.save(tmp_path / "wrong" / "floats.npy", np.zeros(4))
    with pytest.raises(ShardError, match="floats.npy"):
        pp.preprocess(tmp_path / "wrong", tmp_path / "out_wrong", progress=False)


def test_interrupted_write_leaves_no_partial_output(hcpe_dir, tmp_path, monkeypatch):
    out = tmp_path / "pre"
    pp.preprocess(hcpe_dir, out, rows_per_shard=500, progress=False)
    assert (out / "manifest.json").exists()
    calls = {"n": 0}
    real_save = np.save

    def failing_save(file, array, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            real_save(file, array[: len(array) // 2], *args, **kwargs)  # half written, then the disk "fails"
            raise OSError("disk full")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        pp.preprocess(hcpe_dir, out, rows_per_shard=500, memory_bytes=30_000, progress=False)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()  # the folder no longer claims to be complete
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files, no bucket folder
    for shard in out.glob("*.npy"):  # whatever shards exist are whole files
        load_array(shard, mmap=False)


def test_split_leaving_a_side_empty_is_refused_before_writing(tmp_path):
    """Two self-play games with test_ratio 0.1 both land in training: refused with the numbers, nothing written."""
    play_games(2, tmp_path / "selfplay", seed=0, max_moves=20, progress=False, workers=1)
    with pytest.raises(ValueError) as err:
        pp.split_hcpe(tmp_path / "selfplay" / "hcpe", tmp_path / "split", test_ratio=0.1, seed=0)
    assert ("puts 2 of 2 game(s) in training and 0 in validation, leaving validation empty" in str(err.value)
            and "change test_ratio" in str(err.value))
    assert not (tmp_path / "split").exists()
    train, val = pp.split_hcpe(tmp_path / "selfplay" / "hcpe", tmp_path / "split", test_ratio=0.5, seed=2)
    assert read_manifest(train)["rows"] > 0 and read_manifest(val)["rows"] > 0


def test_raw_hcpe_files_are_read_split_by_position_and_preprocessed(hcpe_dir, tmp_path):
    """Raw headerless cshogi .hcpe files (a file and a folder of them) give the same rows as the .npy shards; with
    no game ids the split goes by position (none on both sides, none empty) and says so; preprocess reads them."""
    rows = all_rows(hcpe_dir)
    (tmp_path / "raw" / "sub").mkdir(parents=True)
    rows[:500].tofile(tmp_path / "raw" / "a.hcpe")
    rows[500:].tofile(tmp_path / "raw" / "sub" / "b.hcpe")
    shards = pp.hcpe_shards(tmp_path / "raw")
    assert shards == [tmp_path / "raw" / "a.hcpe", tmp_path / "raw" / "sub" / "b.hcpe"]
    assert np.concatenate([np.asarray(load_hcpe(p)) for p in shards]).tobytes() == rows.tobytes()
    train, val = pp.split_hcpe(tmp_path / "raw", tmp_path / "split", test_ratio=0.2, seed=1)
    assert read_manifest(train)["split_by"] == read_manifest(val)["split_by"] == "position"
    sides = [np.concatenate([np.asarray(load_hcpe(p)) for p in list_shards(d)]) for d in (train, val)]
    assert len(sides[0]) + len(sides[1]) == len(rows) and 0.1 < len(sides[1]) / len(rows) < 0.3
    assert not {r.tobytes() for r in sides[0]["hcp"]} & {r.tobytes() for r in sides[1]["hcp"]}
    pp.preprocess(tmp_path / "raw" / "a.hcpe", tmp_path / "pre", progress=False)
    assert read_manifest(tmp_path / "pre", expect_kind="preprocessed")["input_rows"] == 500


def test_raw_hcpe_that_is_not_hcpe_is_refused_by_name(hcpe_dir, tmp_path):
    rows = all_rows(hcpe_dir)[:10]
    bad = tmp_path / "odd.hcpe"
    bad.write_bytes(rows.tobytes()[:-5])
    with pytest.raises(ShardError, match="odd.hcpe: 375 bytes is not a whole number of 38-byte HCPE records"):
        pp.preprocess(bad, tmp_path / "pre", progress=False)
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 380, dtype=np.uint8).tobytes())
    with pytest.raises(ShardError, match="odd.hcpe: row 0 is not a readable shogi position"):
        pp.split_hcpe(bad, tmp_path / "split")
    assert not (tmp_path / "pre").exists() and not (tmp_path / "split").exists()


def test_shared_raw_hcpe_reads_as_cshogi_does(shared_dir):
    """The real floodgate-class file in ../shared: every row is what cshogi reads from it, and its moves are legal."""
    path = shared_dir / "data" / "hcpe" / "val.hcpe"
    rows = load_hcpe(path)
    oracle = np.fromfile(path, dtype=cshogi.HuffmanCodedPosAndEval)
    assert len(rows) == 5998 and rows.tobytes() == oracle.tobytes()
    board = cshogi.Board()
    for row in oracle[:200]:
        board.set_hcp(row["hcp"])
        assert board.is_legal(board.move_from_move16(row["bestMove16"]))


# ---- the value target: game results blended with the engine's evaluation ---------------------------------------

def engine_blend_truth(rows: np.ndarray, w: float, scale: float) -> dict:
    """{hcp bytes: value} computed independently: each position's mean mover result (cshogi's side to move) and mean
    logistic 1 / (1 + exp(-eval / scale)), blended (1 - w) : w, by a plain Python loop."""
    groups, board = {}, cshogi.Board()
    for row in rows:
        board.set_hcp(row["hcp"])
        won = {0: None, 1: cshogi.BLACK, 2: cshogi.WHITE}[int(row["gameResult"])]
        result = 0.5 if won is None else float(board.turn == won)
        groups.setdefault(row["hcp"].tobytes(), []).append((result, 1 / (1 + math.exp(-int(row["eval"]) / scale))))
    return {k: (1 - w) * sum(r for r, _ in g) / len(g) + w * sum(e for _, e in g) / len(g) for k, g in groups.items()}


def test_value_blends_results_with_the_engine_eval(hcpe_dir, tmp_path):
    """On baseline self-play HCPE (whose rows carry the engine's evaluation): w = 0 is the old value bit for bit and
    the default; w = 1 and 0.5 give the blend computed from the rows by hand; per-move wins stay results; the
    manifest records w and the scale."""
    shard = hcpe_dir / "selfplay-3-00000.npy"
    rows = np.asarray(load_hcpe(shard))
    assert (rows["eval"] != 0).mean() > 0.5
    runs = {"default": {}, "w0": {"value_eval_weight": 0.0}, "w1": {"value_eval_weight": 1.0},
            "w05": {"value_eval_weight": 0.5, "eval_scale": 300.0}}
    for name, kw in runs.items():
        pp.preprocess(shard, tmp_path / name, progress=False, **kw)
    out = {name: read_preprocessed(tmp_path / name) for name in runs}
    def shard_bytes(name, suffix="npy"):
        return (tmp_path / name / f"positions-00000.{suffix}").read_bytes()
    assert shard_bytes("w0") == shard_bytes("default") != shard_bytes("w05")
    assert shard_bytes("w0", "moves.npy") == shard_bytes("w05", "moves.npy") == shard_bytes("default", "moves.npy")
    results = brute_force(rows)
    for p in out["w0"][0]:
        count, total, _ = results[p["hcp"].tobytes()]
        assert p["value"] == np.float32(total / count)              # exactly the mean result, as before
    for name, w, scale in (("w1", 1.0, 600.0), ("w05", 0.5, 300.0)):
        positions, moves = out[name]
        truth = engine_blend_truth(rows, w, scale)
        assert len(positions) == len(truth)
        assert np.allclose(positions["value"], [truth[h.tobytes()] for h in positions["hcp"]], atol=1e-6, rtol=0)
        assert all((a == b).all() for a, b in zip(moves, out["default"][1]))      # wins: results, whatever w
        assert (positions["value"] != out["w0"][0]["value"]).any()
        manifest = read_manifest(tmp_path / name)
        assert (manifest["value_eval_weight"], manifest["eval_scale"]) == (w, scale)
    default = read_manifest(tmp_path / "default")
    assert (default["value_eval_weight"], default["eval_scale"]) == (0.0, 600.0)


def test_eval_blend_refuses_inputs_without_evaluations_by_name(hcpe_dir, tmp_path):
    """Self-play rows with their eval zeroed (as a raw .hcpe file, like converted records) are refused for w > 0,
    naming the file, before anything is written; w = 0 reads them."""
    shard = hcpe_dir / "selfplay-3-00000.npy"
    rows = np.asarray(load_hcpe(shard)).copy()
    rows["eval"] = 0
    rows.tofile(tmp_path / "no-eval.hcpe")
    with pytest.raises(ValueError, match=rf"no-eval.hcpe: eval is 0 in all {len(rows)} rows: these rows carry no "
                                         "engine evaluation; set value_eval_weight: 0"):
        pp.preprocess([shard, tmp_path / "no-eval.hcpe"], tmp_path / "pre", value_eval_weight=0.5, progress=False)
    assert not (tmp_path / "pre").exists()
    pp.preprocess([shard, tmp_path / "no-eval.hcpe"], tmp_path / "pre", progress=False)
    assert read_manifest(tmp_path / "pre")["input_rows"] == 2 * len(rows)


def test_shared_real_games_carry_no_eval_and_are_refused_for_the_blend(shared_dir, tmp_path):
    path = shared_dir / "data" / "hcpe" / "val.hcpe"
    with pytest.raises(ValueError, match="val.hcpe: eval is 0 in all 5998 rows: these rows carry no engine evaluation"):
        pp.preprocess(path, tmp_path / "pre", value_eval_weight=0.25, progress=False)
    assert not (tmp_path / "pre").exists()


@pytest.mark.parametrize("key, value, allowed", [("value_eval_weight", 1.5, "a number >= 0 and <= 1"),
                                                 ("value_eval_weight", -0.1, "a number >= 0 and <= 1"),
                                                 ("eval_scale", 0.0, "a number > 0"),
                                                 ("eval_scale", -600, "a number > 0")])
def test_bad_value_target_is_refused_by_the_step_and_by_preprocess(hcpe_dir, tmp_path, key, value, allowed):
    from maou_nb.pipeline import load_params
    from maou_nb.storage import ParamError
    message = rf"preprocess.{key}={value!r}: allowed {allowed}. Set preprocess.{key} to such a value"
    with pytest.raises(ParamError, match=message):
        pp.check_preprocess_params({key: value})
    with pytest.raises(ParamError, match=message):
        pp.preprocess(hcpe_dir, tmp_path / "pre", progress=False, **{key: value})
    assert not (tmp_path / "pre").exists()
    params = {"steps": ["preprocess"], "preprocess": {"hcpe_inputs": [str(hcpe_dir)], key: value}}
    with pytest.raises(ValueError, match=message):
        load_params(params)
    params["preprocess"] = {"hcpe_inputs": [str(hcpe_dir)], "value_eval_weight": 0.5, "eval_scale": 300}
    assert load_params(params)["preprocess"]["value_eval_weight"] == 0.5   # the stage declares both knobs
