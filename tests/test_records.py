"""CSA/KIF -> HCPE conversion on the real records in tests/data/records, with cshogi as the rules oracle: every record
against its own text, worker processes (crashes, worker counts), filters and atomic failures. The unit examples
(reading games, bad records raise or skip, refusals) are in nbs/02_records.ipynb."""
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cshogi
import numpy as np
import pytest

from maou_nb import storage
from maou_nb.records import RecordError, convert_records, find_record_files, read_games

MOVE_LINE = re.compile(r"^[+-]\d{4}[A-Z]{2}$")


def convert(inputs, out, **kw):
    """convert_records, quiet."""
    return convert_records(inputs, out, progress=False, **kw)


def rows_by_game(shards):
    """{game id: HCPE rows of that game, in order} over the shards, checking rows of a game are contiguous."""
    hcpe = np.concatenate([storage.load_hcpe(p, mmap=False) for p in shards])
    ids = np.concatenate([storage.load_game_ids(p, None) for p in shards])
    out, order = {}, []
    for gid in ids:
        if not order or order[-1] != gid:
            assert gid not in out, "rows of one game are split"
            order.append(gid)
            out[gid] = None
    return {int(g): hcpe[ids == g] for g in order}


def csa_sections(path):
    """The '/'-separated game texts of a CSA file."""
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    return [s for s in text.split("\n/\n") if s.strip()]


def move_lines(section):
    """The move lines of one CSA game, read from the text."""
    return [l for l in section.split("\n") if MOVE_LINE.match(l)]


@pytest.fixture(scope="module")
def converted(records_dir, tmp_path_factory):
    """All shared records converted once, in small shards, with 2 workers."""
    out = tmp_path_factory.mktemp("hcpe")
    return convert(records_dir, out, rows_per_shard=300, workers=2), out


def test_one_row_per_move_per_game(records_dir, converted):
    shards, _ = converted
    by_game = rows_by_game(shards)
    expected = {}
    for path, key in find_record_files(records_dir):
        if path.suffix == ".csa":
            for i, section in enumerate(csa_sections(path)):
                expected[storage.game_id(f"{key}#{i}")] = len(move_lines(section))
        else:
            expected[storage.game_id(f"{key}#0")] = len(read_games(path)[0].moves)
    nonempty = {g: n for g, n in expected.items() if n}
    assert {g: len(r) for g, r in by_game.items()} == nonempty
    assert shards.stats["games"] == len(expected) and shards.stats["rows"] == sum(expected.values())
    assert all(len(storage.load_hcpe(p)) <= 300 for p in shards)


def test_replaying_best_move_gives_next_position(converted):
    shards, _ = converted
    board, nxt = cshogi.Board(), np.empty(1, cshogi.HuffmanCodedPos)
    for rows in rows_by_game(shards).values():
        for row, following in zip(rows[:-1], rows[1:]):
            board.set_hcp(row["hcp"])
            move = board.move_from_move16(int(row["bestMove16"]))
            assert move in board.legal_moves
            board.push(move)
            board.to_hcp(nxt)
            assert nxt["hcp"][0].tobytes() == following["hcp"].tobytes()


def winner_from_text(path):
    """cshogi-convention result from the floodgate summary line, or None when the file has none."""
    m = re.search(r"^'summary:[^:]+:(\S+) (\w+):(\S+) (\w+)$", Path(path).read_text(encoding="utf-8"), re.M)
    if not m:
        return None
    return {"win": cshogi.BLACK_WIN, "lose": cshogi.WHITE_WIN, "draw": cshogi.DRAW}[m.group(2)]


def test_game_result_matches_the_record(records_dir, tmp_path):
    checked = 0
    for path in sorted(records_dir.glob("*.csa")):
        expected = winner_from_text(path)
        if expected is None or not move_lines(csa_sections(path)[0]):
            continue
        out = convert(path, tmp_path / path.stem)
        results = np.concatenate([storage.load_hcpe(p)["gameResult"] for p in out])
        assert set(results.tolist()) == {expected}, path.name
        checked += 1
    assert checked >= 5
    # KIF: 'まで4手で千日手' is a draw; the Shift_JIS game is test_data_1.csa, which Black won
    for name, expected in (("test_data_no_date.kifu", cshogi.DRAW),
                           ("test_data_sjis.kif", winner_from_text(records_dir / "test_data_1.csa"))):
        out = convert(records_dir / name, tmp_path / name)
        assert set(storage.load_hcpe(out[0])["gameResult"].tolist()) == {expected}


def test_eval_comes_from_comments_in_the_movers_view(records_dir, tmp_path):
    path = records_dir / "floodgate2025_toryo.csa"
    lines = path.read_text(encoding="utf-8").split("\n")
    scores = []  # Black's view, from the "'** <score> ..." line after each move
    for i, line in enumerate(lines):
        if MOVE_LINE.match(line):
            follow = [l for l in lines[i + 1:i + 3] if l.startswith("'** ")]
            scores.append(int(follow[0].split()[1]) if follow else 0)
    rows = storage.load_hcpe(convert(path, tmp_path)[0])
    movers_view = [s if i % 2 == 0 else -s for i, s in enumerate(scores)]
    assert rows["eval"].tolist() == [max(-32767, min(32767, s)) for s in movers_view]
    assert any(s != 0 for s in scores)


def test_kif_utf8_and_shift_jis_give_the_same_hcpe(records_dir, tmp_path):
    sjis = records_dir / "test_data_sjis.kif"
    raw = sjis.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # it really is Shift_JIS
    a = storage.load_hcpe(convert(sjis, tmp_path / "a")[0])
    b = storage.load_hcpe(convert(records_dir / "test_data_1.kifu", tmp_path / "b")[0])
    c = storage.load_hcpe(convert(records_dir / "test_data_1.csa", tmp_path / "c")[0])
    assert len(a) == 163 and a.tobytes() == b.tobytes()
    assert a["hcp"].tobytes() == c["hcp"].tobytes() and (a["bestMove16"] == c["bestMove16"]).all()


def test_multi_game_csa_gives_every_game(records_dir, tmp_path):
    path = records_dir / "csa_multi_game.csa"
    sections = csa_sections(path)
    out = convert(path, tmp_path)
    by_game = rows_by_game(out)
    want = {storage.game_id(f"csa_multi_game.csa#{i}"): len(move_lines(s)) for i, s in enumerate(sections)}
    assert len(sections) == 2 and {g: len(r) for g, r in by_game.items()} == want


def test_record_without_moves_is_not_an_error(records_dir, tmp_path):
    out = convert(records_dir / "test_data_no_moves.csa", tmp_path)
    assert list(out) == [] and out.problems == [] and out.stats["games"] == 1
    assert storage.read_manifest(tmp_path, expect_kind="hcpe")["rows"] == 0


def ratings_from_text(section):
    """(black, white) ratings from the 'black_rate / 'white_rate lines, None where absent."""
    found = [re.search(rf"^'{side}_rate:.*:([-\d.]+)$", section, re.M) for side in ("black", "white")]
    return tuple(float(m.group(1)) if m else None for m in found)


def endgame_from_text(section):
    return next((l.strip() for l in section.split("\n") if l.startswith("%")), "")


@pytest.mark.parametrize("kw", [dict(min_rating=3000), dict(min_moves=120), dict(max_moves=120),
                                dict(allowed_endgame_status=["TORYO", "%SENNICHITE"]),
                                dict(min_rating=2900, min_moves=100, allowed_endgame_status=["toryo"])])
def test_filters(records_dir, tmp_path, kw):
    csa = sorted(records_dir.glob("*.csa"))
    kept_rows = 0
    for path in csa:
        for section in csa_sections(path):
            n, rates, end = len(move_lines(section)), ratings_from_text(section), endgame_from_text(section)
            ok = (("min_rating" not in kw or all(r is not None and r >= kw["min_rating"] for r in rates))
                  and ("min_moves" not in kw or n >= kw["min_moves"])
                  and ("max_moves" not in kw or n <= kw["max_moves"])
                  and ("allowed_endgame_status" not in kw
                       or end in {"%" + s.lstrip("%").upper() for s in kw["allowed_endgame_status"]}))
            kept_rows += n if ok else 0
    out = convert(csa, tmp_path, **kw)
    assert out.stats["rows"] == kept_rows
    assert 0 < kept_rows < sum(len(move_lines(s)) for p in csa for s in csa_sections(p))


def test_min_rating_drops_games_with_a_missing_rating(records_dir, tmp_path):
    path = records_dir / "floodgate2025_toryo.csa"   # only White's rating is recorded
    assert ratings_from_text(csa_sections(path)[0])[0] is None
    out = convert(path, tmp_path, min_rating=1)
    assert out.stats["rows"] == 0 and out.stats["filtered"] == {"rating": 1}


def test_a_file_that_crashes_the_parser_costs_only_that_file(records_dir, tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    for name in ("test_data_1.csa", "test_data_2.csa", "test_data_3.csa"):
        shutil.copy(records_dir / name, folder / name)
    (folder / "truncated.csa").write_text("+\n")   # a real input on which cshogi's CSA parser segfaults
    with pytest.warns(UserWarning, match="truncated.csa"):
        out = convert(folder, tmp_path / "out", errors="skip", workers=2)
    assert [(Path(e.path).name, "crashed" in e.reason) for e in out.problems] == [("truncated.csa", True)]
    assert out.stats["rows"] == sum(len(move_lines(csa_sections(folder / n)[0]))
                                    for n in ("test_data_1.csa", "test_data_2.csa", "test_data_3.csa"))
    with pytest.raises(RecordError, match="truncated.csa.*crashed"):
        convert(folder, tmp_path / "out2", workers=2)
    assert list((tmp_path / "out2").iterdir()) == []


def test_output_does_not_depend_on_worker_count(records_dir, tmp_path):
    one = convert(records_dir, tmp_path / "one", workers=1, rows_per_shard=250)
    three = convert(records_dir, tmp_path / "three", workers=3, rows_per_shard=250)
    assert [p.name for p in one] == [p.name for p in three]
    for a, b in zip(one, three):
        assert storage.load_hcpe(a).tobytes() == storage.load_hcpe(b).tobytes()
        assert (storage.load_game_ids(a, None) == storage.load_game_ids(b, None)).all()


def test_refuses_to_mix_with_an_earlier_conversion(records_dir, tmp_path):
    convert(records_dir / "test_data_2.csa", tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert(records_dir / "test_data_3.csa", tmp_path)
    out = convert(records_dir / "test_data_3.csa", tmp_path, overwrite=True)
    assert storage.read_manifest(tmp_path)["rows"] == 256 == out.stats["rows"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hcpe_00000.games.npy", "hcpe_00000.npy", "manifest.json"]


@pytest.mark.parametrize("replacement, reason", [("   5 １五X(16)", "not readable"), ("   5 １四歩(16)", "illegal move")])
def test_bad_kif_move_is_reported_at_its_ply(records_dir, tmp_path, replacement, reason):
    text = (records_dir / "test_data_1.kifu").read_text(encoding="utf-8")
    assert "   5 １五歩(16)" in text
    (tmp_path / "bad.kifu").write_text(text.replace("   5 １五歩(16)", replacement), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"bad\.kifu game 0 ply 5"):
        out = convert(tmp_path / "bad.kifu", tmp_path / "out", errors="skip")
    assert [(e.ply, reason in e.reason) for e in out.problems] == [(5, True)]
    assert out.stats["rows"] == 0


def test_raise_on_the_first_of_many_files_leaves_nothing(records_dir, tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "a_truncated.csa").write_text("+\n")
    for i in range(20):
        shutil.copy(records_dir / "test_data_3.csa", folder / f"b_{i:02d}.csa")
    with pytest.raises(RecordError, match="a_truncated.csa"):
        convert(folder, tmp_path / "out", workers=1, rows_per_shard=256)
    assert list((tmp_path / "out").iterdir()) == []


def test_staging_left_by_a_killed_conversion_is_removed_by_the_next(records_dir, tmp_path):
    """A conversion SIGKILLed mid-way leaves its hidden staging folder; the next conversion there removes it."""
    out = tmp_path / "out"
    script = ("import os, signal, sys\n"
              "from maou_nb import records\n"
              "real = records._convert_into\n"
              "def killed(files, folder, *a):\n"
              "    result = real(files, folder, *a)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)  # shards written in staging, not yet moved\n"
              "records._convert_into = killed\n"
              "records.convert_records(sys.argv[1], sys.argv[2], workers=1)\n")
    run = subprocess.run([sys.executable, "-c", script, str(records_dir / "test_data_2.csa"), str(out)])
    assert run.returncode == -signal.SIGKILL
    assert [p.name for p in out.iterdir() if p.name.startswith(".converting-")], list(out.iterdir())
    convert(records_dir / "test_data_2.csa", out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())
    assert storage.read_manifest(out)["rows"] > 0


def test_failed_overwrite_keeps_the_earlier_conversion(records_dir, tmp_path):
    first = convert(records_dir / "test_data_2.csa", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "bad.csa").write_text("+\n")
    with pytest.raises(RecordError, match="bad.csa"):
        convert([records_dir / "test_data_3.csa", tmp_path / "bad.csa"], tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert storage.read_manifest(tmp_path / "out")["rows"] == first.stats["rows"]


def test_files_without_positions_are_counted_and_named(records_dir, tmp_path):
    """0-byte files and games without moves are not errors, but the summary (stats and manifest) names each one."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "zero.csa").write_bytes(b"")
    (folder / "zero.kif").write_bytes(b"")
    shutil.copy(records_dir / "test_data_no_moves.csa", folder)
    shutil.copy(records_dir / "test_data_1.csa", folder)
    out = convert(folder, tmp_path / "out")
    want = {"test_data_no_moves.csa": "no moves", "zero.csa": "0 bytes", "zero.kif": "0 bytes"}
    assert out.problems == [] and out.stats["empty_files"] == want
    assert out.stats["rows"] == len(move_lines(csa_sections(records_dir / "test_data_1.csa")[0]))
    assert storage.read_manifest(tmp_path / "out", expect_kind="hcpe")["stats"]["empty_files"] == want
