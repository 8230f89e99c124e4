"""Tests of maou_nb.encoding: Maou's published label table, and labels/encodings on positions from play.

cshogi is the rules oracle (legal moves, HCP decoding); positions come from seeded random play and real
game records. Nothing here hard-codes a result that maou_nb computes.
"""
from pathlib import Path

import cshogi
import cshogi.CSA
import numpy as np
import pytest

from maou_nb.encoding import (
    MOVE_LABELS_NUM, encode_hcps, encode_position, hcp_turns, label_move, legal_moves_label,
    legal_moves_labels, move16_labels, move_label, reachable_squares_label, reachable_squares_labels,
)
from maou_nb.records import random_positions

N_POSITIONS = 10000


# ---------------------------------------------------------------- helpers

def read_label_table(path: Path) -> dict[int, int]:
    """Maou's label table as {move16 in the mover's frame: label}, -1 entries included."""
    table = {}
    lines = path.read_text().split("\n")
    assert lines[0].split() == ["labels_num", str(MOVE_LABELS_NUM)]
    for line in lines[1:]:
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "m":
            from_sq, promote, labels = int(fields[1]), int(fields[2]), fields[3:]
            key = lambda to_sq: to_sq | from_sq << 7 | promote << 14
        else:
            assert fields[0] == "d", line[:20]
            drop, labels = int(fields[1]), fields[2:]
            key = lambda to_sq: to_sq | (81 + drop) << 7
        assert len(labels) == 81
        for to_sq, label in enumerate(labels):
            table[key(to_sq)] = int(label)
    return table


def sfen_cells(placement: str) -> list[list[str]]:
    """The 9x9 cells of an SFEN placement, row by row from rank 1, file 9 first ("1" marks an empty cell)."""
    rows = []
    for row in placement.split("/"):
        cells, promoted = [], ""
        for ch in row:
            if ch.isdigit():
                cells += ["1"] * int(ch)
            elif ch == "+":
                promoted = "+"
            else:
                cells.append(promoted + ch)
                promoted = ""
        assert len(cells) == 9, placement
        rows.append(cells)
    return rows


def sfen_placement(rows: list[list[str]]) -> str:
    """`sfen_cells` back into an SFEN placement."""
    text_rows = []
    for cells in rows:
        text, empty = "", 0
        for cell in cells:
            if cell == "1":
                empty += 1
            else:
                text += (str(empty) if empty else "") + cell
                empty = 0
        text_rows.append(text + (str(empty) if empty else ""))
    return "/".join(text_rows)


def rotated_sfen(sfen: str) -> str:
    """The same position turned 180° with colours, hands and side to move swapped."""
    placement, turn, hands, ply = sfen.split()
    rows = [[cell.swapcase() for cell in cells[::-1]] for cells in sfen_cells(placement)[::-1]]
    new_hands = "-" if hands == "-" else hands.swapcase()
    return f"{sfen_placement(rows)} {'w' if turn == 'b' else 'b'} {new_hands} {ply}"


def rotated_usi(usi: str) -> str:
    """A USI move turned 180° (5e -> 5e, 7g -> 3c); drops keep their piece."""
    turn_square = lambda s: f"{10 - int(s[0])}{chr(ord('a') + ord('i') - ord(s[1]))}"
    if usi[1] == "*":
        return usi[:2] + turn_square(usi[2:4])
    return turn_square(usi[0:2]) + turn_square(usi[2:4]) + usi[4:]


def mover_frame_move16(move: int, turn: int) -> int:
    """cshogi move16 of `move` in the mover's frame (written independently of maou_nb)."""
    m16 = cshogi.move16(move)
    if turn == cshogi.BLACK:
        return m16
    to_sq, from_sq, promote = m16 & 0x7F, (m16 >> 7) & 0x7F, m16 >> 14
    return (80 - to_sq) | (80 - from_sq if from_sq < 81 else from_sq) << 7 | promote << 14


@pytest.fixture(scope="module")
def label_table(shared_dir) -> dict[int, int]:
    return read_label_table(shared_dir / "reference" / "label_table.txt")


@pytest.fixture(scope="module")
def hcps() -> np.ndarray:
    """`N_POSITIONS` positions of long seeded random games (`maou_nb.records.random_positions`)."""
    out = np.empty(N_POSITIONS, cshogi.HuffmanCodedPos)
    out["hcp"] = random_positions(N_POSITIONS, seed=2024)[0]["hcp"]
    return out


@pytest.fixture(scope="module")
def boards(hcps) -> list[cshogi.Board]:
    out = []
    for hcp in hcps:
        board = cshogi.Board()
        board.set_hcp(np.asarray(hcp))
        out.append(board)
    return out


# ---------------------------------------------------------------- the published table

def test_every_label_table_entry_is_reproduced(label_table):
    keys = np.array(list(label_table), np.int64)
    expected = np.array(list(label_table.values()), np.int64)
    assert len(keys) == (81 * 2 + 7) * 81
    np.testing.assert_array_equal(move16_labels(keys, np.zeros_like(keys)), expected)
    labels = expected[expected >= 0]
    assert sorted(set(labels.tolist())) == list(range(MOVE_LABELS_NUM))


def test_white_moves_are_labelled_in_the_mover_frame(label_table):
    keys = np.array(list(label_table), np.int64)
    to_sq, from_sq, promote = keys & 0x7F, (keys >> 7) & 0x7F, keys >> 14
    white_keys = (80 - to_sq) | np.where(from_sq < 81, 80 - from_sq, from_sq) << 7 | promote << 14
    np.testing.assert_array_equal(move16_labels(white_keys, np.ones_like(keys)),
                                  np.array(list(label_table.values())))


def test_moves_outside_the_table_have_no_label(label_table):
    every = np.arange(1 << 16)
    labels = move16_labels(every, np.zeros_like(every))
    known = np.zeros(1 << 16, bool)
    known[list(label_table)] = True
    assert (labels[~known] == -1).all()


# ---------------------------------------------------------------- positions from play

def test_random_play_covers_white_hands_drops_and_promotions(boards):
    assert sum(b.turn == cshogi.WHITE for b in boards) > N_POSITIONS // 3
    assert sum(any(any(h) for h in b.pieces_in_hand) for b in boards) > N_POSITIONS // 3
    moves = [m for b in boards[::10] for m in b.legal_moves]
    assert any(cshogi.move_is_drop(m) for m in moves) and any(cshogi.move_is_promotion(m) for m in moves)


def test_legal_moves_get_distinct_labels_from_the_table(boards, label_table):
    for board in boards:
        moves = list(board.legal_moves)
        labels = [move_label(board, m) for m in moves]
        assert all(0 <= label < MOVE_LABELS_NUM for label in labels)
        assert len(set(labels)) == len(moves), board.sfen()
        assert labels == [label_table[mover_frame_move16(m, board.turn)] for m in moves], board.sfen()
        vector = legal_moves_label(board)
        assert vector.dtype == bool and vector.shape == (MOVE_LABELS_NUM,)
        assert vector.sum() == len(moves)
        assert vector[labels].all()


def test_labels_invert_via_label_move(boards):
    for board in boards:
        for move in board.legal_moves:
            assert label_move(board, move_label(board, move)) == move


def test_label_move_refuses_labels_that_are_no_legal_move(boards):
    board = boards[123]
    unused = np.flatnonzero(~legal_moves_label(board))
    for label in unused[:: max(1, len(unused) // 20)]:
        with pytest.raises(ValueError, match="no legal move"):
            label_move(board, int(label))
    for label in (-1, MOVE_LABELS_NUM):
        with pytest.raises(ValueError, match="out of range"):
            label_move(board, label)
    with pytest.raises(ValueError):
        move_label(board, 0)


def test_reachable_squares_are_the_legal_destinations(boards):
    for board in boards:
        expected = np.zeros((9, 9), bool)
        for move in board.legal_moves:
            to_sq = cshogi.move_to(move)
            to_sq = to_sq if board.turn == cshogi.BLACK else 80 - to_sq
            expected[to_sq % 9, to_sq // 9] = True
        np.testing.assert_array_equal(reachable_squares_label(board), expected)


def test_encode_position_maps_every_piece_and_hand(boards):
    names = ["PAWN", "LANCE", "KNIGHT", "SILVER", "GOLD", "BISHOP", "ROOK", "KING", "PROM_PAWN",
             "PROM_LANCE", "PROM_KNIGHT", "PROM_SILVER", "PROM_BISHOP", "PROM_ROOK"]
    for board in boards:
        cells, hand = encode_position(board)
        assert cells.dtype == np.uint8 and cells.shape == (9, 9) and hand.dtype == np.uint8 and hand.shape == (14,)
        mine, theirs = ("B", "W") if board.turn == cshogi.BLACK else ("W", "B")
        for sq in range(81):
            seen = sq if board.turn == cshogi.BLACK else 80 - sq
            piece = board.piece(sq)
            expected = 0
            for i, name in enumerate(names, start=1):
                if piece == getattr(cshogi, mine + name):
                    expected = i
                elif piece == getattr(cshogi, theirs + name):
                    expected = i + 14
            assert cells[seen % 9, seen // 9] == expected
        hands = board.pieces_in_hand
        assert hand.tolist() == list(hands[board.turn]) + list(hands[1 - board.turn])


def test_white_to_move_equals_its_rotated_twin(boards):
    whites = [b for b in boards if b.turn == cshogi.WHITE]
    assert len(whites) > N_POSITIONS // 3
    for board in whites:
        twin = cshogi.Board(rotated_sfen(board.sfen()))
        assert twin.turn == cshogi.BLACK
        # cshogi.rotate_sfen agrees on the board (its hands drop counts of 10 or more, so compare boards only)
        assert twin.sfen().split()[:2] == cshogi.Board(cshogi.rotate_sfen(board.sfen())).sfen().split()[:2]
        for a, b in zip(encode_position(board), encode_position(twin)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(legal_moves_label(board), legal_moves_label(twin))
        np.testing.assert_array_equal(reachable_squares_label(board), reachable_squares_label(twin))
        for move in board.legal_moves:
            twin_move = twin.move_from_usi(rotated_usi(cshogi.move_to_usi(move)))
            assert twin.is_legal(twin_move)
            assert move_label(board, move) == move_label(twin, twin_move)


# ---------------------------------------------------------------- batches

def test_batches_equal_single_boards(boards, hcps):
    cells, hands = encode_hcps(hcps)
    legal, reach = legal_moves_labels(hcps), reachable_squares_labels(hcps)
    turns = hcp_turns(hcps)
    assert cells.shape == (len(boards), 9, 9) and cells.dtype == np.uint8
    assert hands.shape == (len(boards), 14) and hands.dtype == np.uint8
    assert legal.shape == (len(boards), MOVE_LABELS_NUM) and legal.dtype == bool
    assert reach.shape == (len(boards), 9, 9) and reach.dtype == bool
    for i, board in enumerate(boards):
        assert turns[i] == board.turn
        single_cells, single_hand = encode_position(board)
        np.testing.assert_array_equal(cells[i], single_cells)
        np.testing.assert_array_equal(hands[i], single_hand)
        np.testing.assert_array_equal(legal[i], legal_moves_label(board))
        np.testing.assert_array_equal(reach[i], reachable_squares_label(board))


def test_move16_labels_matches_move_label(boards):
    m16s, turns, expected = [], [], []
    for board in boards[::5]:
        for move in board.legal_moves:
            m16s.append(cshogi.move16(move))
            turns.append(board.turn)
            expected.append(move_label(board, move))
    labels = move16_labels(np.array(m16s, np.int16), np.array(turns, np.uint8))
    assert labels.dtype == np.int16
    np.testing.assert_array_equal(labels, expected)
    with pytest.raises(ValueError, match="turns"):
        move16_labels([0], [2])


def test_real_games_best_moves_are_labelled(records_dir):
    """HCPE-style (hcp, bestMove16) pairs from real CSA games: labels agree and are legal."""
    rows, best, turns = [], [], []
    hcp = np.empty(1, cshogi.HuffmanCodedPos)
    for path in sorted(records_dir.glob("floodgate*.csa")):
        for game in cshogi.CSA.Parser.parse_file(str(path)):
            board = cshogi.Board(game.sfen)
            for move in game.moves:
                if not board.is_legal(move):
                    break
                board.to_hcp(hcp)
                rows.append(hcp.copy())
                best.append(cshogi.move16(move))
                turns.append(board.turn)
                board.push(move)
    assert len(rows) > 100
    hcps = np.concatenate(rows)
    labels = move16_labels(np.array(best, np.int16), hcp_turns(hcps))
    np.testing.assert_array_equal(hcp_turns(hcps), turns)
    legal = legal_moves_labels(hcps)
    assert (labels >= 0).all()
    assert legal[np.arange(len(labels)), labels].all()


def test_garbage_rows_raise_instead_of_crashing():
    """Random bytes: off-board king squares are refused up front (cshogi would corrupt memory on them)."""
    rows = np.random.default_rng(7).integers(0, 256, (3000, 32)).astype(np.uint8)
    off_board = (rows[:, 0] >> 1 >= 81) | (rows[:, 1] & 0x7F >= 81)
    assert off_board.any() and not off_board.all()
    with pytest.raises(ValueError, match="king squares"):
        legal_moves_labels(rows)
    outcomes = {"decoded": 0, "refused": 0}
    for row in rows[:500]:
        try:
            legal_moves_labels(row[None])
            outcomes["decoded"] += 1
        except ValueError as error:
            assert "HuffmanCodedPos" in str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


# ---------------------------------------------------------------- labels as planes, mirror

def mirrored_sfen(sfen: str) -> str:
    """The same position mirrored left-right (files 1 <-> 9), colours, hands and side to move kept."""
    placement, turn, hands, ply = sfen.split()
    return " ".join([sfen_placement([cells[::-1] for cells in sfen_cells(placement)]), turn, hands, ply])


def test_label_planes_are_move_type_and_destination(boards):
    """Every legal move's place in the 27 planes: the plane of its block (direction, promotion or dropped piece)
    and the [rank][file] cell of its destination in the mover's frame, as cshogi says."""
    from maou_nb.encoding import BLOCKS, LABEL_PLANE, MOVE_CATEGORIES, move_category
    drop_names = {cshogi.HPAWN: "FU", cshogi.HLANCE: "KY", cshogi.HKNIGHT: "KE", cshogi.HSILVER: "GI",
                  cshogi.HGOLD: "KI", cshogi.HBISHOP: "KA", cshogi.HROOK: "HI"}    # cshogi's hand-piece order
    assert len(set(LABEL_PLANE.tolist())) == MOVE_LABELS_NUM
    for board in boards[:2000]:
        turn = board.turn
        for move in board.legal_moves:
            to = cshogi.move_to(move) if turn == cshogi.BLACK else 80 - cshogi.move_to(move)
            if cshogi.move_is_drop(move):
                block = ("drop " + drop_names[cshogi.move_drop_hand_piece(move)], False)
            else:
                frm = cshogi.move_from(move) if turn == cshogi.BLACK else 80 - cshogi.move_from(move)
                block = (MOVE_CATEGORIES[move_category(frm, to)], bool(cshogi.move_is_promotion(move)))
            plane, cell = divmod(int(LABEL_PLANE[move_label(board, move)]), 81)
            assert (BLOCKS[plane], cell) == (block, (to % 9) * 9 + to // 9), (board.sfen(), cshogi.move_to_usi(move))


def test_mirror_labels_match_cshogi_on_mirrored_positions(boards):
    """A position mirrored left-right (SFEN files reversed) has as legal moves exactly the mirrored labels, its
    encoding is the board flipped along the files with the same hands, and each move maps to its mirror image."""
    from maou_nb.encoding import MIRROR_LABEL
    mirrored = cshogi.Board()
    for board in boards[:1500]:
        mirrored.set_sfen(mirrored_sfen(board.sfen()))
        np.testing.assert_array_equal(legal_moves_label(mirrored), legal_moves_label(board)[MIRROR_LABEL])
        cells, hand = encode_position(board)
        m_cells, m_hand = encode_position(mirrored)
        np.testing.assert_array_equal(m_cells, cells[:, ::-1])
        np.testing.assert_array_equal(m_hand, hand)
        for move in list(board.legal_moves)[:5]:
            usi = cshogi.move_to_usi(move)
            flip = lambda sq: str(10 - int(sq[0])) + sq[1]
            m_usi = (usi[:2] + flip(usi[2:4]) if usi[1] == "*" else flip(usi[:2]) + flip(usi[2:4])) + usi[4:]
            assert move_label(mirrored, mirrored.move_from_usi(m_usi)) == MIRROR_LABEL[move_label(board, move)]


def test_mirror_augmentation_gives_the_mirrored_position_and_move(boards):
    """`train.mirror_rows` (the `mirror` knob) turns the encoding of a real position and its one-hot move into the
    encoding of the position mirrored by cshogi (SFEN files reversed) and the label of the mirrored move."""
    import torch
    from maou_nb.train import mirror_rows
    rows, mirrored_rows, mirrored = [], [], cshogi.Board()
    for board in boards[:300]:
        moves = list(board.legal_moves)
        if not moves:
            continue
        move = moves[len(moves) // 2]
        usi = cshogi.move_to_usi(move)
        flip = lambda sq: str(10 - int(sq[0])) + sq[1]
        m_usi = (usi[:2] + flip(usi[2:4]) if usi[1] == "*" else flip(usi[:2]) + flip(usi[2:4])) + usi[4:]
        mirrored.set_sfen(mirrored_sfen(board.sfen()))
        rows.append((*encode_position(board), move_label(board, move)))
        mirrored_rows.append((*encode_position(mirrored), move_label(mirrored, mirrored.move_from_usi(m_usi))))
    def batch(items):
        return {"board": torch.from_numpy(np.stack([b for b, _, _ in items])), "hand": torch.from_numpy(np.stack([h for _, h, _ in items])),
                "policy": torch.eye(MOVE_LABELS_NUM)[[label for _, _, label in items]], "value": torch.rand(len(items))}
    given, want = batch(rows), batch(mirrored_rows)
    out = mirror_rows(given, 1.0)
    assert torch.equal(out["board"], want["board"]) and torch.equal(out["hand"], want["hand"])
    assert torch.equal(out["policy"], want["policy"]) and torch.equal(out["value"], given["value"])
    assert torch.equal(mirror_rows(given, 0.0)["board"], given["board"])
