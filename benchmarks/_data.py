"""Shared benchmark data: HCPE shards of seeded random cshogi games (real positions, random results)."""
from pathlib import Path

import cshogi
import numpy as np

from maou_nb.storage import HCPE_DTYPE, save_hcpe, write_manifest


def random_games_hcpe(n_rows: int, seed: int = 0, max_plies: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """About `n_rows` HCPE rows (and game ids) of seeded uniformly random games."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n_rows, HCPE_DTYPE)
    ids = np.zeros(n_rows, np.int64)
    i, game = 0, 0
    while i < n_rows:
        board, first = cshogi.Board(), i
        for _ in range(int(rng.integers(10, max_plies))):
            moves = list(board.legal_moves)
            if not moves or i >= n_rows:
                break
            move = moves[int(rng.integers(len(moves)))]
            board.to_hcp(out["hcp"][i])
            out["bestMove16"][i] = np.uint16(cshogi.move16(move)).view(np.int16)
            ids[i] = game
            board.push(move)
            i += 1
        out["gameResult"][first:i] = int(rng.integers(3))
        game += 1
    return out, ids


def write_hcpe_folder(folder: Path, n_rows: int, n_shards: int = 4, seed: int = 0) -> Path:
    """An HCPE data folder (kind "hcpe") of `n_rows` random-game rows in `n_shards` shards."""
    hcpe, ids = random_games_hcpe(n_rows, seed)
    paths = [save_hcpe(folder / f"games-{s:02d}.npy", part, part_ids)
             for s, (part, part_ids) in enumerate(zip(np.array_split(hcpe, n_shards), np.array_split(ids, n_shards)))]
    write_manifest(folder, "hcpe", paths, rows=n_rows)
    return folder
