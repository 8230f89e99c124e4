"""Seeded random cshogi games as HCPE, shared by the preprocessing and dataset tests."""
import cshogi
import numpy as np

from maou_nb.storage import HCPE_DTYPE


def random_games(n_games: int, seed: int, branching: int = 3, max_plies: int = 60):
    """HCPE rows and game ids of seeded random cshogi games; few choices per ply, so positions repeat."""
    rng = np.random.default_rng(seed)
    rows, ids = [], []
    for g in range(n_games):
        board, start = cshogi.Board(), len(rows)
        for _ in range(int(rng.integers(2, max_plies))):
            moves = sorted(board.legal_moves)
            if not moves:
                break
            move = moves[int(rng.integers(min(branching, len(moves))))]
            row = np.zeros((), HCPE_DTYPE)
            board.to_hcp(row["hcp"])
            row["bestMove16"] = np.uint16(cshogi.move16(move)).view(np.int16)
            rows.append(row)
            board.push(move)
        result = int(rng.integers(3))
        for row in rows[start:]:
            row["gameResult"] = result
        ids += [g] * (len(rows) - start)
    return np.array(rows, HCPE_DTYPE), np.array(ids, np.int64)
