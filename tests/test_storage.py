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


def _save_and_die_at_rename(path, payload, k, before):
    """save_checkpoint in a child that SIGKILLs itself just before / right after its k-th os.replace."""
    import signal
    real, seen = os.replace, [0]

    def replace(src, dst):
        seen[0] += 1
        if seen[0] == k and before:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    st.save_checkpoint(path, payload)
    os._exit(0)


def test_checkpoint_killed_at_any_write_boundary_loads_old_or_new(tmp_path):
    """Found broken: the new .sha256 was renamed in before the new .pt, so a kill between the two left a good
    checkpoint that every load refused as 'truncated or altered'."""
    path = tmp_path / "last.pt"
    old, new = {"w": torch.zeros(3), "step": 1}, {"w": torch.ones(3), "step": 2}
    outcomes = []
    for k in range(1, 4):
        for before in (True, False):
            st.save_checkpoint(path, old)
            proc = mp.get_context("fork").Process(target=_save_and_die_at_rename, args=(path, new, k, before))
            proc.start(); proc.join()
            step = st.load_checkpoint(path)["step"]                       # never refused
            assert torch.equal(st.load_checkpoint(path)["w"], (old if step == 1 else new)["w"])
            outcomes.append((k, before, proc.exitcode, step))
            for temporary in tmp_path.glob(".last.pt.*.tmp"):                # what a kill mid-write leaves
                temporary.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]          # no hash file to disagree with it
    assert (1, True, -9, 1) in outcomes and (1, False, -9, 2) in outcomes  # killed before / after the rename
    assert outcomes[-1][2:] == (0, 2)                                       # past the last rename: it finished


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    st.save_array(tmp_path / "a.npy", np.arange(3))
    stale = [tmp_path / ".a.npy.x1y2_z3w.tmp", tmp_path / "sub" / ".last.pt.abcdefgh.tmp"]
    for p in stale:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half")
    keep = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / ".x.running.ipynb"]
    for p in keep:
        p.write_text("mine")
    assert sorted(st.remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert st.remove_stale_temps(tmp_path / "nowhere") == []


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount rights; skipped with the reason otherwise)."""
    import subprocess
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up or make read-only here: {out.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_names_the_path_and_keeps_what_was_written(small_disk):
    ckpt = st.save_checkpoint(small_disk / "last.pt", {"w": torch.zeros(8)})
    st.write_json(small_disk / "stats.json", {"step": 1})
    before = ckpt.read_bytes()
    cases = [lambda: st.save_checkpoint(small_disk / "last.pt", {"w": torch.zeros(200_000)}),      # 800 kB
             lambda: st.save_array(small_disk / "big.npy", np.zeros(100_000)),
             lambda: st.write_json(small_disk / "stats.json", {"x": "y" * 400_000})]
    for write in cases:
        with pytest.raises(st.StorageError) as e:
            write()
        msg = str(e.value)
        assert "no space left on device" in msg and str(small_disk) in msg and "rerun" in msg, msg
        assert isinstance(e.value, RuntimeError) and e.value.errno == 28       # the CLI prints RuntimeErrors cleanly
    assert ckpt.read_bytes() == before and st.load_checkpoint(ckpt)["w"].shape == (8,)
    assert st.read_json(small_disk / "stats.json") == {"step": 1}
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt", "stats.json"]   # no temporaries left


def test_read_only_disk_names_the_path_and_the_cause(small_disk):
    import subprocess
    st.write_json(small_disk / "run" / "run.json", {"started": 1})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for write in (lambda: st.save_checkpoint(small_disk / "run" / "checkpoints" / "last.pt", {"w": torch.ones(2)}),
                  lambda: st.write_json(small_disk / "run" / "run.json", {"started": 2})):
        with pytest.raises(st.StorageError) as e:
            write()
        assert "read-only file system" in str(e.value) and str(small_disk / "run") in str(e.value), str(e.value)
    assert st.read_json(small_disk / "run" / "run.json") == {"started": 1}


def test_permission_denied_names_the_path():
    target = Path("/sys/kernel/maou_nb_test.json")            # sysfs refuses new files even to root
    if not target.parent.is_dir():
        pytest.skip("no /sys/kernel here (not Linux)")
    with pytest.raises(st.StorageError, match="maou_nb_test.json: cannot write: permission denied"):
        st.write_json(target, {"x": 1})


def test_checkpoints_of_the_older_format_still_load_and_their_hash_file_goes(tmp_path):
    """maou_nb 0.1 wrote a plain torch.save file with `<name>.sha256` beside it."""
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2), "step": 5}, path)
    hash_file = tmp_path / "old.pt.sha256"
    hash_file.write_text(f"{st.sha256_file(path)}  old.pt\n")
    assert st.load_checkpoint(path)["step"] == 5
    hash_file.write_text("0" * 64 + "  old.pt\n")                     # e.g. killed between its two writes
    with pytest.raises(st.ShardError, match=r"old.pt.sha256.*delete old.pt.sha256 and load it again"):
        st.load_checkpoint(path)
    st.save_checkpoint(path, {"w": torch.zeros(2), "step": 6})         # the new format: one file, no hash beside it
    assert st.load_checkpoint(path)["step"] == 6 and not hash_file.exists()
