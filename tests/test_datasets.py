"""maou_nb.datasets: batches equal items, targets equal a brute-force recomputation from the raw HCPE rows,
the epoch sampler is deterministic and resumable, the loader passes its options through, bad data is refused."""
import json
import pickle
import shutil
from pathlib import Path

import cshogi
import numpy as np
import pytest
import torch

from maou_nb import datasets as dsm
from maou_nb.encoding import encode_position, legal_moves_label, move_label, reachable_squares_label
from maou_nb.preprocess import make_stage1_data, make_stage2_data, preprocess, stage1_sfens
from maou_nb.storage import HCPE_DTYPE, ShardError, list_shards, load_hcpe, save_hcpe, sidecar_path, write_manifest
from maou_nb.records import random_games


@pytest.fixture(scope="module")
def data(tmp_path_factory, records_dir) -> Path:
    """Random games + the shared records as HCPE, preprocessed (several shards), Stage 1 and Stage 2 folders."""
    from maou_nb.records import convert_records
    root = tmp_path_factory.mktemp("data")
    hcpe, ids = random_games(50, seed=3, max_plies=50)
    paths = [save_hcpe(root / "hcpe" / "a.npy", hcpe[:600], ids[:600]),
             save_hcpe(root / "hcpe" / "b.npy", hcpe[600:], ids[600:])]
    paths += convert_records(records_dir, root / "records", workers=1)
    for p in paths[2:]:
        shutil.copy(p, root / "hcpe" / p.name)
        shutil.copy(sidecar_path(p), sidecar_path(root / "hcpe" / p.name))
    shards = list_shards(root / "hcpe")
    write_manifest(root / "hcpe", "hcpe", shards, rows=sum(len(load_hcpe(p)) for p in shards))
    preprocess(root / "hcpe", root / "pre", rows_per_shard=300, progress=False)
    make_stage2_data(root / "hcpe", root / "stage2", rows_per_shard=300, progress=False)
    make_stage1_data(root / "stage1")
    return root


def raw_rows(root: Path) -> np.ndarray:
    return np.concatenate([np.asarray(load_hcpe(p)) for p in list_shards(root / "hcpe")])


def mover_result(board: cshogi.Board, game_result: int) -> float:
    return {0: 0.5, 1: float(board.turn == cshogi.BLACK), 2: float(board.turn == cshogi.WHITE)}[game_result]


def test_batches_equal_items(data):
    rng = np.random.default_rng(0)
    for ds in (dsm.Stage1Dataset(data / "stage1"), dsm.Stage2Dataset(data / "stage2"),
               dsm.Stage3Dataset(data / "pre", policy_target="both"), dsm.HcpeDataset(data / "hcpe")):
        rows = rng.integers(len(ds), size=17)
        rows[:2] = [0, len(ds) - 1]
        batch = ds[rows]
        assert batch["board"].dtype == torch.uint8 and batch["board"].shape == (17, 9, 9)
        assert batch["hand"].dtype == torch.float32 and batch["hand"].shape == (17, 14)
        for i, r in enumerate(rows):
            item = ds[int(r)]
            assert item.keys() == batch.keys()
            for k in batch:
                assert torch.equal(batch[k][i], item[k]), (type(ds).__name__, k, r)
        assert ds[torch.tensor(rows)].keys() == batch.keys()
        assert all(torch.equal(ds[torch.tensor(rows[1])][k], batch[k][1]) for k in batch)
        assert all(torch.equal(ds[np.int64(rows[2])][k], batch[k][2]) for k in batch)
        assert ds.sources(rows[:3]) == [str(ds.paths[np.searchsorted(ds.offsets, r, side="right") - 1])
                                        for r in rows[:3]]
        with pytest.raises(IndexError):
            ds[np.array([len(ds)])]


def test_stage3_targets_match_brute_force(data):
    rows = raw_rows(data)
    board = cshogi.Board()
    truth = {}
    for row in rows:
        board.set_hcp(row["hcp"])
        label = move_label(board, board.move_from_move16(int(np.uint16(row["bestMove16"]))))
        result = mover_result(board, int(row["gameResult"]))
        entry = truth.setdefault(row["hcp"].tobytes(), {"n": 0, "sum": 0.0, "moves": {}})
        entry["n"] += 1
        entry["sum"] += result
        move = entry["moves"].setdefault(label, [0, 0.0])
        move[0] += 1
        move[1] += result
    datasets = {t: dsm.Stage3Dataset(data / "pre", policy_target=t) for t in ("frequency", "win_rate", "both")}
    assert len(datasets["frequency"]) == len(truth) and len(datasets["frequency"].paths) > 1
    every = np.arange(len(truth))
    batches = {t: ds[every] for t, ds in datasets.items()}
    hcps = np.concatenate([np.asarray(np.load(p, mmap_mode="r")["hcp"]) for p in datasets["frequency"].paths])
    seen_twice = 0
    for i, hcp in enumerate(hcps):
        entry = truth[hcp.tobytes()]
        board.set_hcp(hcp)
        expected_board, expected_hand = encode_position(board)
        assert (batches["frequency"]["board"][i].numpy() == expected_board).all()
        assert (batches["frequency"]["hand"][i].numpy() == expected_hand).all()
        assert batches["frequency"]["value"][i].item() == pytest.approx(entry["sum"] / entry["n"], abs=1e-6)
        freq = np.zeros(1496)
        rate = np.zeros(1496)
        for label, (n, wins) in entry["moves"].items():
            freq[label] = n / entry["n"]
            rate[label] = (wins + 5) / (n + 10)
        rate = rate / rate.sum() if entry["n"] >= 2 else freq
        seen_twice += entry["n"] >= 2 and len(entry["moves"]) > 1
        for target, expected in (("frequency", freq), ("win_rate", rate), ("both", (freq + rate) / 2)):
            np.testing.assert_allclose(batches[target]["policy"][i].numpy(), expected, atol=1e-6)
    assert seen_twice > 0  # the win-rate target was really exercised
    for batch in batches.values():
        np.testing.assert_allclose(batch["policy"].sum(1).numpy(), 1, atol=1e-5)
        assert ((batch["value"] >= 0) & (batch["value"] <= 1)).all()


def test_hcpe_dataset_targets(data):
    rows = raw_rows(data)
    ds = dsm.HcpeDataset(data / "hcpe")
    assert len(ds) == len(rows)
    batch = ds[np.arange(len(ds))]
    board = cshogi.Board()
    for i in range(0, len(rows), 7):
        board.set_hcp(rows["hcp"][i])
        label = move_label(board, board.move_from_move16(int(np.uint16(rows["bestMove16"][i]))))
        assert batch["policy"][i].nonzero().flatten().tolist() == [label]
        assert batch["value"][i].item() == mover_result(board, int(rows["gameResult"][i]))


def test_stage1_and_stage2_labels(data):
    s1 = dsm.Stage1Dataset(data / "stage1")
    batch = s1[np.arange(len(s1))]
    board = cshogi.Board()
    for i, sfen in enumerate(stage1_sfens()):
        board.set_sfen(sfen)
        assert (batch["reachable"][i].numpy().reshape(9, 9).astype(bool) == reachable_squares_label(board)).all()
    s2 = dsm.Stage2Dataset(data / "stage2")
    batch = s2[np.arange(len(s2))]
    hcps = np.concatenate([np.asarray(np.load(p, mmap_mode="r")["hcp"]) for p in s2.paths])
    for i, hcp in enumerate(hcps):
        board.set_hcp(hcp)
        assert (batch["legal"][i].numpy().astype(bool) == legal_moves_label(board)).all()


def test_sampler_deterministic_and_resumable():
    sampler = dsm.EpochBatchSampler(103, 10, seed=4)
    assert len(sampler) == 11 and len(dsm.EpochBatchSampler(103, 10, drop_last=True)) == 10
    epoch0 = [b.copy() for b in sampler]
    assert sorted(np.concatenate(epoch0)) == list(range(103))
    assert all((a == b).all() for a, b in zip(epoch0, dsm.EpochBatchSampler(103, 10, seed=4)))
    sampler.set_epoch(1)
    epoch1 = [b.copy() for b in sampler]
    assert not all((a == b).all() for a, b in zip(epoch0, epoch1))
    assert not (np.concatenate(epoch0) == dsm.EpochBatchSampler(103, 10, seed=5).order(0)).all()
    # stop after 4 batches of epoch 1, save, and resume in a fresh sampler
    sampler.set_epoch(1)
    it = iter(sampler)
    [next(it) for _ in range(4)]
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["epoch"] == 1 and state["start_batch"] == 4
    assert sampler.state_dict(batches_done=2)["start_batch"] == 2
    resumed = dsm.EpochBatchSampler(103, 10, seed=4)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 7 and all((a == b).all() for a, b in zip(rest, epoch1[4:]))
    assert len(list(resumed)) == 11  # the resume position applies to one pass only
    with pytest.raises(ValueError, match="batch_size"):
        dsm.EpochBatchSampler(103, 20).load_state_dict(state)
    unshuffled = dsm.EpochBatchSampler(25, 10, shuffle=False)
    assert np.concatenate(list(unshuffled)).tolist() == list(range(25))


def test_loader_batches_and_workers(data):
    ds = dsm.Stage3Dataset(data / "pre")
    loader, sampler = dsm.make_loader(ds, 64, seed=2)
    assert loader.batch_size is None and loader.sampler is sampler and len(loader) == len(sampler)
    batches = list(loader)
    assert sum(len(b["value"]) for b in batches) == len(ds)
    order = sampler.order(0)
    assert torch.equal(batches[1]["policy"], ds[order[64:128]]["policy"])
    workers_loader, _ = dsm.make_loader(ds, 64, seed=2, workers=2, prefetch_factor=2, pin_memory=False)
    assert workers_loader.num_workers == 2 and workers_loader.prefetch_factor == 2
    for a, b in zip(batches, workers_loader):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(pickle.dumps(ds)) < 10_000  # workers reopen the memory maps instead of receiving copies


def test_bad_data_is_refused_by_name(data, tmp_path):
    with pytest.raises(ShardError, match="'stage1' data but 'stage2'"):
        dsm.open_stage_data(2, data / "stage1")
    with pytest.raises(ShardError, match="Stage 3 reads"):
        dsm.open_stage_data(3, data / "stage2")
    with pytest.raises(ShardError, match="'stage2' data but 'preprocessed'"):
        dsm.open_stage_data(3, data / "stage2", input_format="preprocessed")
    assert isinstance(dsm.open_stage_data(3, data / "pre", policy_target="winrate"), dsm.Stage3Dataset)
    assert isinstance(dsm.open_stage_data(3, data / "hcpe"), dsm.HcpeDataset)
    with pytest.raises(ValueError, match="policy_target"):
        dsm.open_stage_data(3, data / "pre", policy_target="greedy")
    folder = tmp_path / "pre"
    shutil.copytree(data / "pre", folder)
    shard = folder / json.loads((folder / "manifest.json").read_text())["shards"][1]
    original = shard.read_bytes()
    np.save(shard, np.zeros(5, np.float32))  # wrong dtype
    with pytest.raises(ShardError, match=str(shard)):
        dsm.Stage3Dataset(folder)
    shard.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(ShardError, match=str(shard)):
        dsm.Stage3Dataset(folder)
    shard.write_bytes(original)
    moves = sidecar_path(shard, "moves")
    moves.unlink()
    with pytest.raises(ShardError, match=str(moves)):
        dsm.Stage3Dataset(folder)[np.arange(len(dsm.Stage3Dataset(folder)))]
    corrupt = raw_rows(data)[:40].copy()
    corrupt["hcp"][33] = 255
    save_hcpe(tmp_path / "raw" / "corrupt.npy", corrupt)
    with pytest.raises(ShardError, match="corrupt.npy: row 33"):
        dsm.HcpeDataset(tmp_path / "raw")[np.array([0, 33])]
    (folder / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        dsm.open_stage_data(3, folder, input_format="preprocessed")


def test_raw_hcpe_file_and_folder_as_stage3_data(data, tmp_path):
    """A raw cshogi .hcpe file (and a folder without a manifest holding it) serves the same batches as its .npy shard."""
    rows = raw_rows(data)
    (tmp_path / "raw").mkdir()
    rows.tofile(tmp_path / "raw" / "all.hcpe")
    npy = dsm.HcpeDataset(data / "hcpe")
    for source in (tmp_path / "raw" / "all.hcpe", tmp_path / "raw"):
        ds = dsm.open_stage_data(3, source)
        assert isinstance(ds, dsm.HcpeDataset) and len(ds) == len(npy)
        idx = np.arange(0, len(ds), 7)
        for key, value in npy[idx].items():
            assert torch.equal(ds[idx][key], value), key
