"""The USI engine driven as a GUI drives it: through cshogi's own USI client and match runner."""
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import cshogi
import cshogi.CSA
import cshogi.cli
import pytest
from cshogi.usi import Engine


def write_wrapper(folder: Path, name: str, *flags: str) -> Path:
    "An executable that starts the engine (cshogi starts engines as one executable with no arguments)."
    path = folder / name
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m maou_nb.usi {' '.join(flags)}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    "An untrained small ResNet checkpoint."
    torch = pytest.importorskip("torch")
    from maou_nb.model import build_model
    from maou_nb.storage import save_checkpoint
    torch.manual_seed(0)
    model = build_model("resnet", preset="small")
    path = tmp_path_factory.mktemp("usi_model") / "small.pt"
    save_checkpoint(path, {"arch": model.arch, "model_config": model.config, "model": model.state_dict()})
    return path


def assert_starts(wrapper: Path) -> None:
    "The engine answers usi/isready (checked with a timeout: cshogi's client would wait forever on a dead engine)."
    run = subprocess.run([str(wrapper)], input="usi\nisready\nquit\n", capture_output=True, text=True, timeout=60)
    assert "usiok" in run.stdout and "readyok" in run.stdout, run.stdout + run.stderr[-2000:]


@pytest.fixture
def engine(tmp_path, small_model):
    "A running engine process behind cshogi's client, with the small model."
    wrapper = write_wrapper(tmp_path, "maou-usi", "--model", str(small_model))
    assert_starts(wrapper)
    eng = Engine(str(wrapper))
    yield eng
    if eng.proc is not None:
        eng.quit()


def positions(records_dir: Path) -> list[cshogi.Board]:
    "Start, a real mid-game position with pieces in hand, and a position in check."
    out = [cshogi.Board()]
    game = cshogi.CSA.Parser.parse_file(str(records_dir / "floodgate2025_toryo.csa"))[0]
    board = cshogi.Board(game.sfen)
    for i, m in enumerate(game.moves):
        board.push(m)
        if i in (30, 60) or (i > 40 and board.is_check() and len(out) < 5):
            out.append(board.copy())
    return out


def send_position(eng: Engine, board: cshogi.Board) -> None:
    "Send a board the way a GUI does: its SFEN with the 'sfen ' prefix (cshogi sends it verbatim)."
    eng.position(sfen="sfen " + board.sfen())


def test_engine_answers_legal_moves_with_info(engine, records_dir):
    assert engine.name == "maou_nb"
    engine.setoption("Threads", 1)
    ready = []
    engine.isready(listener=ready.append)
    assert not [l for l in ready if "error" in l], ready  # the model loaded: the network plays, not a fallback
    engine.usinewgame()
    boards = positions(records_dir)
    assert len(boards) >= 4 and any(b.is_check() for b in boards)
    for board in boards:
        send_position(engine, board)
        lines = []
        bestmove, _ = engine.go(btime=10000, wtime=10000, byoyomi=1000, listener=lines.append)
        assert bestmove in {cshogi.move_to_usi(m) for m in board.legal_moves}, (board.sfen(), bestmove)
        info = [l for l in lines if l.startswith("info depth")]
        assert info and " score cp " in info[-1] and info[-1].endswith("pv " + bestmove)
    # startpos with moves, as cshogi.cli sends it
    engine.position(moves=["7g7f", "3c3d", "8h2b+"])
    bestmove, _ = engine.go(byoyomi=500)
    board = cshogi.Board()
    for u in ("7g7f", "3c3d", "8h2b+"):
        board.push_usi(u)
    assert bestmove in {cshogi.move_to_usi(m) for m in board.legal_moves}


def test_engine_survives_bad_commands(engine):
    engine.isready()
    lines = []
    for bad in ["bogus", "position sfen xyz b - 1", "position startpos moves 7g7f 7g7f", "go btime never",
                "setoption name Simulations value lots", "setoption name Player value telepathy", "position", "go mate"]:
        engine.proc.stdin.write(bad.encode() + b"\n")
    engine.proc.stdin.flush()
    engine.isready(listener=lines.append)  # still alive and answering
    errors = [l for l in lines if l.startswith("info string error")]
    assert len(errors) >= 7, lines
    engine.position(moves=["2g2f"])
    bestmove, _ = engine.go(byoyomi=300)
    board = cshogi.Board(); board.push_usi("2g2f")
    assert bestmove in {cshogi.move_to_usi(m) for m in board.legal_moves}


def test_engine_declares_and_resigns(engine):
    engine.isready()
    mated = cshogi.Board("4k4/4G4/4P4/9/9/9/9/9/4K4 w - 1")
    assert not list(mated.legal_moves)
    send_position(engine, mated)
    assert engine.go(byoyomi=100)[0] == "resign"
    entered = cshogi.Board("K8/RRBB5/PPPPPPPPP/9/9/9/9/9/8k b - 1")  # king in camp, 13 pieces, 29 points
    assert entered.is_nyugyoku()
    send_position(engine, entered)
    assert engine.go(byoyomi=100)[0] == "win"


def test_go_infinite_waits_for_stop(engine):
    engine.isready()
    engine.position()
    engine.proc.stdin.write(b"go infinite\n"); engine.proc.stdin.flush()
    time.sleep(0.5)
    engine.stop()
    line = b""
    while not line.startswith(b"bestmove"):
        line = engine.proc.stdout.readline()
        assert line, "engine closed its output"
    assert line.split()[1].decode() in {cshogi.move_to_usi(m) for m in cshogi.Board().legal_moves}


def test_search_respects_the_clock(tmp_path, small_model):
    wrapper = write_wrapper(tmp_path, "maou-search", "--model", str(small_model), "--simulations", "100000")
    assert_starts(wrapper)
    eng = Engine(str(wrapper))
    try:
        eng.isready()
        eng.position()
        start = time.monotonic()
        lines = []
        bestmove, _ = eng.go(byoyomi=1000, listener=lines.append)
        elapsed = time.monotonic() - start
        assert bestmove in {cshogi.move_to_usi(m) for m in cshogi.Board().legal_moves}
        assert elapsed < 2.0, elapsed  # byoyomi 1 s: the search stopped on the clock, not on its 100000 simulations
        (info,) = [l for l in lines if l.startswith("info depth")]
        nodes = int(info.split(" nodes ")[1].split()[0])
        assert 1 <= nodes < 100000
    finally:
        eng.quit()


def test_full_games_between_two_instances(tmp_path, small_model):
    network = write_wrapper(tmp_path, "maou-net", "--model", str(small_model), "--temperature", "1.0")
    baseline = write_wrapper(tmp_path, "maou-base", "--player", "baseline")
    (tmp_path / "csa").mkdir()
    # cshogi's match runner in a child process, so that a stuck engine fails the test instead of hanging it
    script = ("import json, sys, cshogi.cli; r = cshogi.cli.main(sys.argv[1], sys.argv[2], games=2, byoyomi=200, "
              "draw=120, csa=sys.argv[3], print_summary=False); print(json.dumps(r))")
    run = subprocess.run([sys.executable, "-c", script, str(network), str(baseline), str(tmp_path / "csa")],
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["total"] == 2
    records = sorted((tmp_path / "csa").glob("*.csa"))
    assert len(records) == 2
    for path in records:
        game = cshogi.CSA.Parser.parse_file(str(path))[0]
        board = cshogi.Board(game.sfen)
        for m in game.moves:
            assert board.is_legal(m)
            board.push(m)
        assert game.endgame in ("%TORYO", "%SENNICHITE", "%JISHOGI", "%KACHI", "%+ILLEGAL_ACTION", "%-ILLEGAL_ACTION")
        assert game.endgame != "%ILLEGAL_MOVE"
