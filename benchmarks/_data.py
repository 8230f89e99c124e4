"""Shared benchmark data: HCPE shards of seeded random cshogi games (real positions, random results)."""
from pathlib import Path

import numpy as np

from maou_nb.records import random_positions
from maou_nb.storage import save_hcpe, write_manifest


def write_hcpe_folder(folder: Path, n_rows: int, n_shards: int = 4, seed: int = 0) -> Path:
    """An HCPE data folder (kind "hcpe") of `n_rows` random-game rows in `n_shards` shards."""
    hcpe, ids = random_positions(n_rows, seed, min_plies=10, max_plies=120)
    paths = [save_hcpe(folder / f"games-{s:02d}.npy", part, part_ids)
             for s, (part, part_ids) in enumerate(zip(np.array_split(hcpe, n_shards), np.array_split(ids, n_shards)))]
    write_manifest(folder, "hcpe", paths, rows=n_rows)
    return folder
