"""Storage layer beyond the notebook's examples (nbs/04_storage.ipynb): writers killed mid-write, full and read-only
disks, checkpoints of the older format."""
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from maou_nb import storage as st


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
