"""Self-play: real games of the baseline engine, checked move by move with cshogi as the rules oracle."""
from collections import Counter
from pathlib import Path

import cshogi
import numpy as np
import pytest

from maou_nb.selfplay import MATE, BaselineEngine, game_name, play_game, play_games, write_csa
from maou_nb.storage import game_id, load_game_ids, load_hcpe, read_manifest

GAMES, SEED, MAX_MOVES = 6, 11, 200


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One small self-play run (two worker processes)."""
    out = tmp_path_factory.mktemp("selfplay")
    play_games(GAMES, out, seed=SEED, max_moves=MAX_MOVES, workers=2, progress=False)
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_games_any_worker_count(run, tmp_path):
    play_games(GAMES, tmp_path / "one", seed=SEED, max_moves=MAX_MOVES, workers=1, progress=False)
    expected = {k: v for k, v in files(run).items() if k != "hcpe/manifest.json"}
    got = {k: v for k, v in files(tmp_path / "one").items() if k != "hcpe/manifest.json"}
    assert got == expected
    assert read_manifest(tmp_path / "one" / "hcpe")["rows"] == read_manifest(run / "hcpe")["rows"]


def test_different_seeds_differ(run, tmp_path):
    play_games(GAMES, tmp_path / "other", seed=SEED + 1, max_moves=MAX_MOVES, workers=1, progress=False)
    ours = [cshogi.Parser.parse_file(str(run / "csa" / f"{game_name(SEED, i)}.csa"))[0].moves for i in range(GAMES)]
    theirs = [cshogi.Parser.parse_file(str(tmp_path / "other" / "csa" / f"{game_name(SEED + 1, i)}.csa"))[0].moves
              for i in range(GAMES)]
    assert all(list(a) != list(b) for a, b in zip(ours, theirs))
    assert len({tuple(m) for m in ours}) == GAMES        # games within one run differ too


def rows_by_game(run: Path) -> dict[int, np.ndarray]:
    manifest = read_manifest(run / "hcpe", expect_kind="hcpe")
    hcpe, ids = [], []
    for name in manifest["shards"]:
        shard = load_hcpe(run / "hcpe" / name)
        hcpe.append(np.asarray(shard)); ids.append(load_game_ids(run / "hcpe" / name, len(shard)))
    hcpe, ids = np.concatenate(hcpe), np.concatenate(ids)
    assert manifest["rows"] == len(hcpe) and manifest["games"] == GAMES
    return {i: hcpe[ids == game_id(game_name(SEED, i))] for i in range(GAMES)}


def test_records_replay_legally_and_match_hcpe(run):
    rows = rows_by_game(run)
    assert sum(len(r) for r in rows.values()) == read_manifest(run / "hcpe")["rows"]   # every row belongs to a game
    for i in range(GAMES):
        record = cshogi.Parser.parse_file(str(run / "csa" / f"{game_name(SEED, i)}.csa"))[0]
        game = rows[i]
        assert 0 < len(record.moves) == len(game) <= MAX_MOVES
        board, hcp = cshogi.Board(), np.zeros(32, np.uint8)
        for k, (move, row) in enumerate(zip(record.moves, game)):
            assert move != 0 and board.is_legal(move), f"game {i} move {k} illegal"
            board.to_hcp(hcp)
            assert np.array_equal(hcp, row["hcp"]), f"game {i} row {k} is not the position before move {k}"
            # the row's own position and bestMove16 lead to the next row's position
            replay = cshogi.Board()
            replay.set_hcp(row["hcp"])
            replay.push_move16(int(row["bestMove16"]) & 0xFFFF)
            if k + 1 < len(game):
                replay.to_hcp(hcp)
                assert np.array_equal(hcp, game[k + 1]["hcp"])
            assert board.move_from_move16(int(row["bestMove16"]) & 0xFFFF) == move
            board.push(move)
        assert len(set(game["gameResult"].tolist())) == 1
        check_result(board, record, int(game["gameResult"][0]), len(game))


def check_result(final: cshogi.Board, record, result: int, plies: int):
    """The recorded result agrees with what cshogi says about the final position."""
    assert record.win == result
    ending = record.endgame
    if ending == "%TORYO":                      # the side to move is mated: it lost
        assert final.is_game_over() and final.is_check()
        assert result == (cshogi.WHITE_WIN if final.turn == cshogi.BLACK else cshogi.BLACK_WIN)
    elif ending == "%SENNICHITE":
        replay, keys = cshogi.Board(), Counter()
        keys[replay.zobrist_hash()] += 1
        for move in record.moves:
            replay.push(move); keys[replay.zobrist_hash()] += 1
        assert keys[final.zobrist_hash()] == 4 and result == cshogi.DRAW
    elif ending == "%JISHOGI":
        assert plies == MAX_MOVES and result == cshogi.DRAW
    elif ending == "%KACHI":
        assert final.is_nyugyoku() and result == (cshogi.BLACK_WIN if final.turn == cshogi.BLACK else cshogi.WHITE_WIN)
    else:
        assert ending in ("%+ILLEGAL_ACTION", "%-ILLEGAL_ACTION")
        assert result == (cshogi.WHITE_WIN if ending[1] == "+" else cshogi.BLACK_WIN)


def test_evals_are_from_the_movers_view(run):
    mated = 0
    for i, game in rows_by_game(run).items():
        record = cshogi.Parser.parse_file(str(run / "csa" / f"{game_name(SEED, i)}.csa"))[0]
        assert abs(int(game["eval"][0])) < 300                   # the start position is about equal
        if record.endgame == "%TORYO":                           # the last mover mated: it saw the mate in one
            assert int(game["eval"][-1]) == MATE - 1
            mated += 1
    assert mated > 0, "expected at least one game to end in mate"


def test_records_converter_reads_our_csa(run, tmp_path):
    records = pytest.importorskip("maou_nb.records")
    shards = records.convert_records([run / "csa"], tmp_path / "converted", workers=1)
    converted = np.concatenate([np.asarray(load_hcpe(p)) for p in shards])
    ours = np.concatenate(list(rows_by_game(run).values()))
    assert len(converted) == len(ours)
    key = lambda h: sorted((bytes(r["hcp"]), int(r["bestMove16"]), int(r["gameResult"])) for r in h)
    assert key(converted) == key(ours)


class RandomPlayer:
    """Uniformly random legal moves (seeded)."""
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def choose(self, board: cshogi.Board) -> int:
        moves = list(board.legal_moves)
        return moves[self.rng.integers(len(moves))]


def test_engine_takes_mates_and_parries_mate_threats():
    """Over real games: a greedy engine always plays a mate in one, and never allows one when it can be avoided."""
    engine, mates, threats = BaselineEngine(temperature=0), 0, 0
    games = [play_game(BaselineEngine(seed=g), BaselineEngine(seed=50 + g), max_moves=256) for g in range(4)]
    games += [play_game(RandomPlayer(seed=g), BaselineEngine(seed=g), max_moves=256) for g in range(2)]
    for game in games:
        board = cshogi.Board()
        for move in game.moves:
            choice = engine.choose(board)
            if board.mate_move_in_1ply():
                assert _after(board, choice, lambda b: b.is_game_over()), f"missed mate in one in {board.sfen()}"
                mates += 1
            allows = [_after(board, m, lambda b: bool(b.mate_move_in_1ply())) for m in board.legal_moves]
            if any(allows) and not all(allows):
                assert not _after(board, choice, lambda b: bool(b.mate_move_in_1ply())), board.sfen()
                threats += 1
            board.push(move)
    assert mates > 0 and threats > 0, (mates, threats)


def _after(board: cshogi.Board, move: int, test) -> bool:
    board.push(move)
    try:
        return test(board)
    finally:
        board.pop()


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(n=-1), ValueError, "n=-1"),
    (dict(n=1.5), ValueError, "n=1.5"),
    (dict(n=2, temperature=-1.0), ValueError, "temperature"),
    (dict(n=2, temperature=float("nan")), ValueError, "temperature"),
    (dict(n=2, temperature="hot"), ValueError, "temperature"),
    (dict(n=2, depth=3), ValueError, "depth"),
    (dict(n=2, workers=0), ValueError, "workers"),
    (dict(n=2, max_moves=0), ValueError, "max_moves"),
    (dict(n=2, seed=-3), ValueError, "seed"),
    (dict(n=2, gmaes=3), TypeError, "gmaes"),
])
def test_bad_parameters_raise_clear_errors(tmp_path, kwargs, error, text):
    with pytest.raises(error, match=text):
        play_games(out_dir=tmp_path / "bad", progress=False, **kwargs)
    assert not (tmp_path / "bad" / "hcpe" / "manifest.json").exists()


def test_the_move_cap_is_a_draw():
    "(The fourth repetition's draw is test_play's test_repetition_is_a_draw_on_the_fourth_occurrence.)"
    short = play_game(BaselineEngine(seed=1), BaselineEngine(seed=2), max_moves=10)
    assert (len(short.moves), short.csa_ending(), short.result) == (10, "%JISHOGI", cshogi.DRAW)
    assert (short.to_hcpe()["gameResult"] == cshogi.DRAW).all()


def test_one_record_gives_the_csa_and_the_hcpe_of_a_game(tmp_path):
    from maou_nb.records import convert_records
    from maou_nb.selfplay import game_end
    game = play_game(BaselineEngine(seed=8), BaselineEngine(seed=9), max_moves=120)
    hcpe = game.to_hcpe()
    assert len(hcpe) == len(game.moves) == len(game.evals) and (hcpe["gameResult"] == game.result).all()
    assert hcpe["eval"].tolist() == game.evals
    # the CSA text goes through the records converter to the same rows (evaluations aside: CSA has none here)
    write_csa(game, tmp_path / "csa" / "game.csa")
    converted = np.asarray(load_hcpe(convert_records([tmp_path / "csa"], tmp_path / "hcpe", workers=1)[0]))
    for field in ("hcp", "bestMove16", "gameResult"):
        assert np.array_equal(converted[field], hcpe[field])
    # the one rule ends the game where cshogi says it ends, and not before
    board, seen = cshogi.Board(), Counter([cshogi.Board().zobrist_hash()])
    for move in game.moves:
        assert game_end(board, seen, 120) is None
        board.push(move); seen[board.zobrist_hash()] += 1
    assert game_end(board, seen, 120) == (game.winner, game.reason)
