"""Storage layer: atomic writes, refusals that name the file, split by game, checkpoints."""
import json
import multiprocessing as mp
import os
from pathlib import Path

import cshogi
import numpy as np
import pytest
import torch

from maou_nb import storage as st


def _random_game_hcpe(seed: int, plies: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    board = cshogi.Board()
    rows = np.zeros(plies, st.HCPE_DTYPE)
    n = 0
    for _ in range(plies):
        moves = list(board.legal_moves)
        if not moves:
            break
        move = moves[rng.integers(len(moves))]
        board.to_hcp(rows[n : n + 1]["hcp"])
        rows[n]["bestMove16"] = cshogi.move16(move)
        board.push(move)
        n += 1
    return rows[:n]


def test_hcpe_round_trip_replays_with_cshogi(tmp_path):
    rows = _random_game_hcpe(1)
    st.save_hcpe(tmp_path / "s.npy", rows, game_ids=np.full(len(rows), st.game_id("s#0")))
    back = st.load_hcpe(tmp_path / "s.npy")
    board = cshogi.Board()
    for k in range(len(back) - 1):
        board.set_hcp(np.asarray(back[k]["hcp"]))
        board.push_move16(int(back[k]["bestMove16"]))
        nxt = np.zeros(1, cshogi.HuffmanCodedPos)
        board.to_hcp(nxt)
        assert bytes(nxt["hcp"][0]) == bytes(back[k + 1]["hcp"])


def test_wrong_dtype_truncated_and_pickled_files_are_refused_by_name(tmp_path):
    st.save_array(tmp_path / "ints.npy", np.arange(5))
    with pytest.raises(st.ShardError, match="ints.npy.*expected"):
        st.load_hcpe(tmp_path / "ints.npy")
    good = st.save_hcpe(tmp_path / "h.npy", _random_game_hcpe(2))
    (tmp_path / "trunc.npy").write_bytes(good.read_bytes()[:-7])
    with pytest.raises(st.ShardError, match="trunc.npy"):
        np.asarray(st.load_hcpe(tmp_path / "trunc.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(st.ShardError, match="obj.npy"):
        st.load_array(tmp_path / "obj.npy")


def _write_then_die(path):
    with st.atomic_path(path) as tmp:
        tmp.write_bytes(b"x" * 1000)
        os._exit(3)  # the process is killed mid-write: no rename happens


def test_killed_writer_leaves_old_file_and_no_shard(tmp_path):
    target = tmp_path / "out.npy"
    st.save_array(target, np.arange(3))
    proc = mp.get_context("fork").Process(target=_write_then_die, args=(target,))
    proc.start(); proc.join()
    assert proc.exitcode == 3
    np.testing.assert_array_equal(st.load_array(target), np.arange(3))
    assert st.list_shards(tmp_path) == [target]  # the stray temporary is not taken for a shard


def test_split_by_game_keeps_games_whole_and_is_reproducible(tmp_path):
    ids = np.concatenate([np.full(n, st.game_id(f"g#{i}")) for i, n in enumerate(range(5, 305))])
    val = st.split_by_game(ids, 0.25, seed=7)
    for g in np.unique(ids):
        assert len(np.unique(val[ids == g])) == 1
    assert 0.15 < val[np.unique(ids, return_index=True)[1]].mean() < 0.35
    np.testing.assert_array_equal(val, st.split_by_game(ids, 0.25, seed=7))
    with pytest.raises(ValueError, match="test_ratio"):
        st.split_by_game(ids, 1.5)


def test_manifest_kind_and_missing_shards(tmp_path):
    st.save_hcpe(tmp_path / "a.npy", _random_game_hcpe(3))
    st.write_manifest(tmp_path, "hcpe", [tmp_path / "a.npy"], rows=1)
    assert st.read_manifest(tmp_path, "hcpe")["shards"] == ["a.npy"]
    with pytest.raises(st.ShardError, match="'stage1'"):
        st.read_manifest(tmp_path, "stage1")
    (tmp_path / "a.npy").unlink()
    with pytest.raises(st.ShardError, match="missing shard"):
        st.read_manifest(tmp_path)


def test_checkpoint_hash_and_weights_only(tmp_path):
    path = st.save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(2), "epoch": 3})
    assert st.load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]      # the digest travels inside the one file

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(st.ShardError, match="evil.pt"):
        st.load_checkpoint(tmp_path / "evil.pt")
