"""Players, the match runner and its statistics, with cshogi as the rules oracle."""
import json
import shutil
from collections import Counter
from pathlib import Path

import cshogi
import cshogi.CSA
import numpy as np
import pytest

from maou_nb.arena import (BLACK, WHITE, evaluate, format_table, place_on_ladder, play_match,
                           plot_evaluation, random_openings, record_openings, verdict, wilson_interval)
from maou_nb.players import ILLEGAL, RESIGN, NetworkPlayer, Player, RandomPlayer, _terminal_value, mate_in_one, mate_in_one_or
from maou_nb.records import random_boards
from maou_nb.selfplay import play_pairs

FAIRY = shutil.which("fairy-stockfish") or ("/usr/games/fairy-stockfish" if Path("/usr/games/fairy-stockfish").is_file() else None)


def position_key(board: cshogi.Board) -> str:
    "The position without its move number (what repetition compares)."
    return " ".join(board.sfen().split(" ")[:3])


def replay(game) -> tuple[cshogi.Board, Counter]:
    "Replay a game record through cshogi, checking each move; the final board and position counts."
    board = cshogi.Board(game.start_sfen)
    counts = Counter([position_key(board)])
    for m in game.moves:
        assert board.is_legal(m), (game.start_sfen, cshogi.move_to_usi(m))
        board.push(m)
        counts[position_key(board)] += 1
    return board, counts


def check_ending(game, max_moves):
    "The recorded end reason and winner agree with the final position, judged independently."
    board, counts = replay(game)
    if game.reason == "checkmate":
        assert not list(board.legal_moves) and game.winner == 1 - board.turn
    elif game.reason in ("repetition", "perpetual_check"):
        assert counts[position_key(board)] == 4
        if game.reason == "repetition":
            assert game.winner is None
    elif game.reason == "max_moves":
        assert board.move_number == max_moves + 1 and game.winner is None
    elif game.reason == "declaration":
        assert board.is_nyugyoku() and game.winner == board.turn
    else:
        raise AssertionError(f"unexpected end {game.reason}")
    # no earlier position ended the game
    if game.reason != "max_moves":
        assert board.move_number <= max_moves + 1


def test_random_games_are_legal_and_end_by_the_rules():
    result = play_match("random", RandomPlayer(), games=30, max_moves=300, seed=11)
    assert len(result.games) == 30
    for g in result.games:
        check_ending(g, 300)
    reasons = Counter(g.reason for g in result.games)
    assert reasons["checkmate"] + reasons["max_moves"] >= 1
    s = result.summary()
    assert s["wins"] + s["draws"] + s["losses"] == 30
    assert s["as_black"]["wins"] + s["as_white"]["wins"] == s["wins"]
    assert s["avg_plies"] == pytest.approx(np.mean([g.plies for g in result.games]), abs=0.05)


class Scripted(Player):
    "Plays a cycle of moves (USI strings) by ply parity."

    def __init__(self, usis, name):
        self.usis, self.name = usis, name
        super().__init__()

    def choose(self, board):
        return board.move_from_usi(self.usis[(board.move_number - 1) // 2 % len(self.usis)])


def test_repetition_is_a_draw_on_the_fourth_occurrence():
    a = Scripted(["5i4i", "4i5i"], "a")
    b = Scripted(["5a4a", "4a5a"], "b")
    (g,) = play_pairs([(a, b)], ["4k4/9/9/9/9/9/9/9/4K4 b G 1"])
    board, counts = replay(g)
    assert (g.winner, g.reason) == (None, "repetition")
    assert counts[position_key(board)] == 4 and max(counts.values()) == 4
    assert g.plies == 12
    assert cshogi.CSA.Parser.parse_str(g.to_csa())[0].endgame == "%SENNICHITE"


def test_resign_and_illegal_answers_lose():
    class Resigner(Player):
        name = "resigner"
        def choose(self, board): return RESIGN

    class Cheat(Player):
        name = "cheat"
        def choose(self, board): return ILLEGAL

    g1, g2 = play_pairs([(Resigner(), RandomPlayer()), (RandomPlayer(), Cheat())], [cshogi.STARTING_SFEN] * 2)
    assert (g1.winner, g1.reason, g1.plies) == (WHITE, "resign", 0)
    assert (g2.winner, g2.reason, g2.plies) == (BLACK, "illegal", 1)
    assert cshogi.CSA.Parser.parse_str(g2.to_csa())[0].win == cshogi.BLACK_WIN


def test_summary_statistics_follow_the_counts():
    result = play_match("random", "random", games=12, max_moves=120, seed=5)
    s = result.summary()
    n = s["games"]
    score = (s["wins"] + 0.5 * s["draws"]) / n
    lo, hi = wilson_interval(score, n)
    assert s["score"] == pytest.approx(score, abs=1e-4)
    assert (s["score_low"], s["score_high"]) == pytest.approx((lo, hi), abs=1e-4)
    assert s["verdict"] == verdict(lo, hi)
    assert verdict(0.4, 0.6) == "not significant" and verdict(0.51, 0.7) == "stronger" and verdict(0.2, 0.49) == "weaker"


def test_colours_alternate_over_each_opening():
    openings = random_openings(3, plies=4, seed=1)
    assert len(set(openings)) == 3
    result = play_match("random", "random", games=6, openings=openings, max_moves=60, seed=0)
    assert [g.start_sfen for g in result.games] == [o for o in openings for _ in range(2)]
    assert result.a_is_black == [True, False] * 3
    assert [g.black for g in result.games[:2]] == [result.a, result.b]


def test_csa_files_reparse_to_the_same_games(tmp_path):
    result = play_match("random", "random", games=6, max_moves=150, seed=2, out_dir=tmp_path,
                        openings=random_openings(3, seed=4))
    files = sorted(tmp_path.glob("*.csa"))
    assert len(files) == 6
    for path, g in zip(files, result.games):
        parsed = cshogi.CSA.Parser.parse_file(str(path))[0]
        assert parsed.moves == g.moves
        assert parsed.sfen.split(" ")[:3] == g.start_sfen.split(" ")[:3]
        assert parsed.names == [g.black, g.white]
        assert parsed.win == {None: cshogi.DRAW, BLACK: cshogi.BLACK_WIN, WHITE: cshogi.WHITE_WIN}[g.winner]
    summary = json.loads((tmp_path / "match.json").read_text())
    assert summary["games"] == 6 and len(summary["files"]) == 6


def test_record_openings_follow_the_real_records(records_dir):
    paths = sorted(records_dir.glob("*.csa"))
    sfens = record_openings(paths, plies=10)
    parsed = [p for path in paths for p in cshogi.CSA.Parser.parse_file(str(path)) if len(p.moves) >= 10]
    assert len(sfens) == len(parsed) > 0
    for sfen, p in zip(sfens, parsed):
        board = cshogi.Board(p.sfen)
        for m in p.moves[:10]:
            board.push(m)
        assert sfen == board.sfen()


def test_baseline_beats_random():
    result = play_match("baseline", "random", games=20, max_moves=256, seed=0,
                        openings=random_openings(10, plies=2, seed=0))
    assert result.score >= 0.9, str(result)


# --- the network player ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    "An untrained small ResNet saved as a checkpoint the way training saves one."
    torch = pytest.importorskip("torch")
    from maou_nb.model import build_model
    from maou_nb.storage import save_checkpoint
    torch.set_num_threads(1)  # small batches: more threads only spin, badly so on a busy 2-core runner
    torch.manual_seed(0)
    model = build_model("resnet", preset="small")
    path = tmp_path_factory.mktemp("model") / "small.pt"
    save_checkpoint(path, {"arch": model.arch, "model_config": model.config, "model": model.state_dict()})
    return path


def test_network_player_never_plays_an_illegal_move(small_checkpoint):
    boards = random_boards(300, playable=True)
    assert sum(b.is_check() for b in boards) > 0 and sum(any(b.pieces_in_hand[b.turn]) for b in boards) > 30
    for temperature, mate_in_one in ((0.0, False), (1.0, False), (3.0, False), (0.0, True)):
        player = NetworkPlayer(small_checkpoint, temperature=temperature, seed=0, mate_in_one=mate_in_one)
        moves = player.choose_many(boards)
        for b, m in zip(boards, moves):
            assert m in set(b.legal_moves), (b.sfen(), m)
        assert player.last_values.shape == (len(boards),)
        assert ((player.last_values > 0) & (player.last_values < 1)).all()
    probs, values = player.evaluator.policy_value(boards[:20])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-4)


def test_network_player_is_deterministic_and_matches_one_by_one(small_checkpoint):
    boards = random_boards(40, seed=3, playable=True)
    a, b = NetworkPlayer(small_checkpoint, temperature=1.0, seed=5), NetworkPlayer(small_checkpoint, temperature=1.0, seed=5)
    assert a.choose_many(boards) == b.choose_many(boards)
    greedy = NetworkPlayer(small_checkpoint)
    assert greedy.choose_many(boards) == [greedy.choose(x) for x in boards]


def test_network_player_from_onnx_agrees_with_torch(small_checkpoint, tmp_path):
    from maou_nb.export import export_onnx
    path = tmp_path / "small.onnx"
    export_onnx(small_checkpoint, path, fp16=False, n_default_positions=8)
    boards = random_boards(50, seed=9, playable=True)
    assert NetworkPlayer(path).choose_many(boards) == NetworkPlayer(small_checkpoint).choose_many(boards)


def test_puct_search_plays_legal_moves(small_checkpoint):
    boards = random_boards(6, seed=4, playable=True)
    player = NetworkPlayer(small_checkpoint, simulations=8, seed=0)
    moves = player.choose_many(boards)
    assert all(m in set(b.legal_moves) for b, m in zip(boards, moves))
    board = cshogi.Board("8k/9/7GP/9/9/9/9/9/K8 b - 1")  # ten legal moves, some of them mate
    mates = set()
    for m in board.legal_moves:
        board.push(m)
        if board.is_game_over():
            mates.add(m)
        board.pop()
    assert 0 < len(mates) < 10
    assert NetworkPlayer(small_checkpoint, simulations=30).choose(board) in mates


def gives_mate_in_one(board: cshogi.Board, move: int) -> bool:
    "Whether `move` lets the opponent mate at once (or mates nobody but is itself followed by no legal move)."
    board.push(move)
    try:
        return not board.is_game_over() and bool(mate_in_one(board))
    finally:
        board.pop()


def test_search_finds_every_mate_in_one(small_checkpoint):
    # an untrained network's priors know nothing of mates: the search's mate check has to find them
    boards = [b for b in random_boards(4000, seed=11, playable=True) if mate_in_one(b)]
    assert len(boards) >= 10
    player = NetworkPlayer(small_checkpoint, simulations=2, seed=0)
    for b, m in zip(boards, player.choose_many(boards)):
        b.push(m)
        assert b.is_game_over(), b.sfen()  # cshogi: the opponent has no legal move
    assert (player.last_values == 1.0).all()


def test_search_avoids_moves_that_allow_a_mate_in_one(small_checkpoint):
    boards = []
    for b in random_boards(1500, seed=12, playable=True):
        moves = list(b.legal_moves)
        bad = sum(gives_mate_in_one(b, m) for m in moves)
        if not mate_in_one(b) and 0 < bad < len(moves) // 2:
            boards.append(b)
    assert len(boards) >= 10
    policy = NetworkPlayer(small_checkpoint, seed=0).choose_many(boards)
    searched = NetworkPlayer(small_checkpoint, simulations=200, seed=0).choose_many(boards)
    assert sum(gives_mate_in_one(b, m) for b, m in zip(boards, searched)) == 0
    assert sum(gives_mate_in_one(b, m) for b, m in zip(boards, policy)) > 0  # the policy alone walks into some


def test_evaluate_writes_a_table_and_games(small_checkpoint, tmp_path):
    rows = evaluate(small_checkpoint, ["random"], games=4, out_dir=tmp_path, max_moves=60, progress=False)
    assert [r["opponent_spec"] for r in rows] == ["random"]
    assert rows[0]["games"] == 4
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["rows"] == rows
    assert len(list(tmp_path.rglob("*.csa"))) == 4
    assert "random" in format_table(rows)
    import matplotlib
    matplotlib.use("Agg")
    assert len(plot_evaluation(rows).patches) == 1


@pytest.mark.skipif(FAIRY is None, reason="fairy-stockfish not installed (apt-get install -y fairy-stockfish)")
def test_usi_opponent_fairy_stockfish_beats_random(tmp_path):
    result = play_match(f"usi:{FAIRY}", "random", games=2, max_moves=200, seed=0, out_dir=tmp_path)
    for g in result.games:
        replay(g)
    assert result.summary()["wins"] == 2, str(result)


# --- the strength ladder ------------------------------------------------------------

@pytest.mark.skipif(FAIRY is None, reason="fairy-stockfish not installed (apt-get install -y fairy-stockfish)")
def test_ladder_stops_at_the_first_level_not_beaten(tmp_path):
    ladder = place_on_ladder(RandomPlayer(), FAIRY, levels=(-20, -10), games=2, max_moves=200, out_dir=tmp_path)
    assert ladder["highest_beaten"] is None and [r["level"] for r in ladder["rows"]] == [-20]
    # a random mover never beats the engine; on a loaded machine a 200-move cap can end one game drawn
    assert ladder["rows"][0]["wins"] == 0 and ladder["rows"][0]["verdict"] != "stronger"
    assert len(list((tmp_path / "level_-20").glob("*.csa"))) == 2


def test_mate_in_one_plays_only_legal_mates():
    boards = random_boards(400, seed=6, playable=True)
    finder_illegal = mates = 0
    for b in boards:
        proposed = b.mate_move_in_1ply()
        finder_illegal += bool(proposed) and proposed not in set(b.legal_moves)
        m = mate_in_one_or(b, -5)
        if m != -5:
            assert m in set(b.legal_moves)
            b.push(m); assert b.is_game_over(); b.pop()
            mates += 1
        elif proposed and proposed in set(b.legal_moves) and not b.is_check():
            raise AssertionError(f"missed the mate {cshogi.move_to_usi(proposed)} in {b.sfen()}")
    assert mates > 0


def test_search_ends_lines_by_the_game_rules():
    # the side to move may declare an entering-king win: a won position for the search, as for a game
    declare = cshogi.Board("+R+B1G1GS+P+P/1GS+P3+P+P/1S1+P1+PK2/+P+P7/9/9/9/9/k8 b RBGSNLPnl2n2l3p 1")
    assert declare.is_nyugyoku()
    assert _terminal_value(declare) == 1.0
    mated = cshogi.Board("4k4/4G4/4G4/9/9/9/9/9/4K4 w - 1")
    assert _terminal_value(mated) == 0.0 and _terminal_value(cshogi.Board()) is None
    shuffle = cshogi.Board("4k4/9/9/9/9/9/9/9/4K4 b G 1")
    for usi in ["5i4i", "5a4a", "4i5i", "4a5a"]:
        shuffle.push_usi(usi)
    assert shuffle.is_draw(16) == cshogi.REPETITION_DRAW and _terminal_value(shuffle) == 0.5
