"""Viz: overlays land on the right squares of cshogi's SVG over many real positions, explorers driven headless. (The
model viewer's checks are examples in nbs/21_viz.ipynb, the training curves' in nbs/24_plots.ipynb.)"""
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cshogi
import cshogi.CSA
import numpy as np
import pytest

from maou_nb.encoding import encode_position, legal_moves_label, move_label, reachable_squares_label
from maou_nb.viz import board_from_arrays, board_svg, destination_weights, explore, game_positions, save_svg, square_corner

SVG = "{http://www.w3.org/2000/svg}"


def layer(svg: str, cls: str) -> list[ET.Element]:
    """The elements of one overlay layer of a board SVG."""
    root = ET.fromstring(svg)
    return [e for g in root.iter() if g.get("class") == cls for e in g]


def squares(elements) -> set[str]:
    return {e.get("data-square") for e in elements}


@pytest.fixture(scope="module")
def game_file(records_dir) -> Path:
    return records_dir / "floodgate2025_timeup.csa"


@pytest.fixture(scope="module")
def game_boards(game_file) -> list[cshogi.Board]:
    return [p.board() for p in game_positions(game_file)]


def test_overlays_sit_on_cshogis_squares(game_boards):
    rng = np.random.default_rng(0)
    for board in game_boards[::9]:
        moves = list(board.legal_moves)
        picked = [moves[i] for i in rng.choice(len(moves), size=min(4, len(moves)), replace=False)]
        probs = dict(zip(picked, rng.dirichlet(np.ones(len(picked)))))
        svg = board_svg(board, probs=probs, reachable=True, legal=True, lastmove=board.peek() or None)
        root = ET.fromstring(svg)
        piece_corners = {(float(u.get("x")), float(u.get("y"))) for u in root.iter() if u.tag.endswith("use")}
        assert piece_corners == {square_corner(sq) for sq in range(81) if board.piece(sq)}
        heat = layer(svg, "maou-heat")
        want = destination_weights(probs)
        assert squares(heat) == {cshogi.SQUARE_NAMES[sq] for sq in np.flatnonzero(want)}
        for rect in heat:
            sq = cshogi.SQUARE_NAMES.index(rect.get("data-square"))
            assert (float(rect.get("x")), float(rect.get("y"))) == square_corner(sq)
            assert abs(float(rect.get("data-weight")) - want[sq]) < 1e-5
        marks = layer(svg, "maou-marks")
        dest = {cshogi.SQUARE_NAMES[cshogi.move_to(m)] for m in moves}
        assert squares(e for e in marks if e.get("class") == "reachable") == dest
        assert sum(int(e.text) for e in marks if e.get("class") == "legal") == len(moves)
        # encoding's Stage 1 label, turned back from the mover's frame, marks the same squares
        grid_svg = board_svg(board, reachable=reachable_squares_label(board))
        assert squares(layer(grid_svg, "maou-marks")) == dest


def test_label_vectors_and_captions(game_boards, tmp_path):
    board = game_boards[41]
    moves = list(board.legal_moves)[:5]
    labels = np.zeros(1496)
    for i, m in enumerate(moves):
        labels[move_label(board, m)] = i + 1.0
    from_labels = layer(board_svg(board, probs=labels), "maou-heat")
    from_moves = layer(board_svg(board, probs={m: i + 1.0 for i, m in enumerate(moves)}), "maou-heat")
    assert [r.attrib for r in from_labels] == [r.attrib for r in from_moves]
    svg = board_svg(board, legal=legal_moves_label(board), caption="a <caption> & more")
    assert ET.fromstring(svg).get("viewBox") == "0 0 230 206"
    path = save_svg(svg, tmp_path / "board.svg")
    assert path.read_text() == str(svg) and svg._repr_svg_() == str(svg)


def test_board_from_arrays_round_trips_real_positions(game_boards):
    for board in game_boards[::3]:
        rebuilt = board_from_arrays(*encode_position(board))
        np.testing.assert_array_equal(encode_position(rebuilt)[0], encode_position(board)[0])
        np.testing.assert_array_equal(encode_position(rebuilt)[1], encode_position(board)[1])
        np.testing.assert_array_equal(legal_moves_label(rebuilt), legal_moves_label(board))


def test_explorer_steps_through_a_game(game_file):
    game = cshogi.CSA.Parser.parse_file(str(game_file))[0]
    ex = explore(game_file)
    assert ex.slider.max == len(game.moves)
    for ply in (0, 17, 40):
        ex.slider.value = ply
        assert squares(layer(ex.svg, "maou-heat")) == {cshogi.SQUARE_NAMES[cshogi.move_to(game.moves[ply])]}
        assert f"ply {ply}" in ex.info.value
    ex.next.click()
    assert ex.slider.value == 41 and ex.positions[41].lastmove == game.moves[40]
    ex.legal.value = True
    board = ex.positions[41].board()
    assert sum(int(e.text) for e in layer(ex.svg, "maou-marks")) == len(board.legal_moves)
    ex.slider.value = ex.slider.max
    ex.next.click()
    assert ex.slider.value == ex.slider.max and "maou-heat" not in ex.board_view.value  # last position: no move


def test_explorer_over_an_hcpe_shard(game_file, tmp_path):
    from maou_nb.records import convert_records
    from maou_nb.storage import list_shards
    convert_records([game_file], tmp_path / "hcpe", progress=False)
    shard = list_shards(tmp_path / "hcpe")[0]
    hcpe = np.load(shard)
    ex = explore(shard, rows=range(len(hcpe)))
    board = cshogi.Board()
    for row in (0, 10, len(hcpe) - 1):
        ex.slider.value = row
        board.set_hcp(hcpe[row]["hcp"])
        move = board.move_from_move16(int(hcpe[row]["bestMove16"]))
        assert ex.positions[row].sfen == board.sfen()
        assert squares(layer(ex.svg, "maou-heat")) == {cshogi.SQUARE_NAMES[cshogi.move_to(move)]}
        assert ex.positions[row].value in (0.0, 0.5, 1.0)


@pytest.mark.parametrize("sfen", [
    "lnsgkg1nl/1r7/pp+Ppppspp/9/3N5/9/PP1PPP1PP/7+p1/L1SGKGSNL b BPrbp 15",    # promoted pieces, both hands
    "ln1g3+Rl/1ks1g4/1ppp1p2p/p3p1pp1/9/P1P1P1P2/1PSP1P2P/1KG2+b3/LN1G4L w RBSN3Psn2p 60",
])
def test_latin_pieces_are_the_board_in_sfen_letters(sfen):
    """Without kanji, each square cshogi draws a piece on shows that piece's SFEN letter (cshogi is the oracle),
    the ranks read a-i, each hand lists its pieces with counts, and no CJK character is left."""
    board = cshogi.Board(sfen)
    svg = board_svg(board, pieces="latin")
    assert not re.search(r"[\u3000-\u9fff]|&#(1[2-9]\d{3}|[2-9]\d{4});", svg)
    root = ET.fromstring(svg)
    letter = {g.get("id"): g.find(f"{SVG}text").text for g in root.iter(f"{SVG}g") if g.get("id")}
    shown = {(float(u.get("x")), float(u.get("y"))): letter[u.get("{http://www.w3.org/1999/xlink}href")[1:]]
             for u in root.iter(f"{SVG}use")}
    want = {}                                                        # the board part of cshogi's SFEN
    for rank, row in enumerate(board.sfen().split()[0].split("/")):
        col = 0
        for token in re.findall(r"\+?[A-Za-z]|\d", row):
            if token.isdigit():
                col += int(token)
                continue
            want[square_corner((8 - col) * 9 + rank)] = token
            col += 1
    assert shown == want and len(want) == sum(1 for sq in range(81) if board.piece(sq))
    ranks = [t.text for t in root.iter(f"{SVG}text") if t.get("font-size") == "9" and t.get("x") == "203.5"]
    assert ranks == list("abcdefghi")
    hands = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "hand"]
    expect = []
    for color, case in ((cshogi.BLACK, str.upper), (cshogi.WHITE, str.lower)):
        counts = board.pieces_in_hand[color]
        expect += [case(n) + (str(counts[i]) if counts[i] > 1 else "") for i, n in reversed(list(enumerate("PLNSGBR"))) if counts[i]]
    assert hands == expect


def test_pieces_setting_and_auto_choice(monkeypatch):
    """`pieces` argument > MAOU_NB_PIECES; auto draws kanji only where a Japanese font is installed; a bad value
    is refused naming the setting."""
    from maou_nb.viz import japanese_font_installed, piece_style
    board = cshogi.Board()
    kanji = "&#27497;" in str(board.to_svg())                       # cshogi's pawn, 歩
    assert kanji
    monkeypatch.setenv("MAOU_NB_PIECES", "kanji")
    assert piece_style() == "kanji" and "&#27497;" in board_svg(board)
    assert "&#27497;" not in board_svg(board, pieces="latin")
    monkeypatch.setenv("MAOU_NB_PIECES", "auto")
    assert piece_style() == ("kanji" if japanese_font_installed() else "latin")
    monkeypatch.setenv("MAOU_NB_PIECES", "letters")
    with pytest.raises(ValueError, match="MAOU_NB_PIECES"):
        board_svg(board)


def test_no_japanese_font_here_means_letters():
    """On a machine without a Japanese font (as matplotlib sees its fonts), `auto` draws letters; its fallback
    font, which has a box for every character, does not count."""
    import shutil
    import subprocess
    from maou_nb.viz import japanese_font_installed
    if shutil.which("fc-list") is None:
        pytest.skip("fc-list (fontconfig) is not installed: cannot tell independently whether a Japanese font is here")
    has_ja = bool(subprocess.run(["fc-list", ":lang=ja"], capture_output=True, text=True).stdout.strip())
    assert japanese_font_installed() == has_ja


def test_explorer_over_a_stage3_dataset(records_dir, tmp_path):
    from maou_nb.datasets import Stage3Dataset
    from maou_nb.preprocess import preprocess
    from maou_nb.records import convert_records
    convert_records(sorted(records_dir.glob("floodgate2025_*.csa")), tmp_path / "hcpe", progress=False)
    preprocess(tmp_path / "hcpe", tmp_path / "pre", progress=False)
    ds = Stage3Dataset(tmp_path / "pre")
    rows = list(range(0, len(ds), max(1, len(ds) // 12)))
    ex = explore(ds, rows=rows)
    batch = ds[np.array(rows)]
    for i in (0, len(rows) // 2, len(rows) - 1):
        ex.slider.value = i
        board = ex.positions[i].board()
        np.testing.assert_array_equal(encode_position(board)[0], np.asarray(batch["board"][i]))
        target = np.asarray(batch["policy"][i])
        want = {}
        for m in board.legal_moves:
            w = target[move_label(board, m)]
            if w > 0:
                want[cshogi.SQUARE_NAMES[cshogi.move_to(m)]] = want.get(cshogi.SQUARE_NAMES[cshogi.move_to(m)], 0) + w
        heat = {e.get("data-square"): float(e.get("data-weight")) for e in layer(ex.svg, "maou-heat")}
        assert heat.keys() == want.keys() and all(abs(heat[k] - want[k]) < 1e-5 for k in want)
        assert abs(sum(want.values()) - 1) < 1e-5      # every labelled move of a real position is legal there
        assert f"data value: {float(batch['value'][i]):.3f}" in ex.info.value
