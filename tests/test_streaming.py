"""Training over remote data larger than the local cache (maou_nb.datasets.StreamedShards), the cache modes, and
train() with gs:// / s3:// data paths, against real servers on 127.0.0.1 (the `servers` fixture of cloud_servers.py) and
real HCPE shards from random cshogi games; the local memory-mapped dataset is the oracle for what a batch holds."""
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from maou_nb import cloud
from maou_nb.cloud import ShardCache, upload_folder
from maou_nb.datasets import HcpeDataset, StreamedShards, available_memory, make_loader, open_data, stage_datasets
from maou_nb.preprocess import preprocess
from maou_nb.records import random_games
from maou_nb.storage import HCPE_DTYPE, load_checkpoint, save_hcpe, write_manifest
from maou_nb.train import train

from cloud_servers import servers  # noqa: F401 (a fixture)

_names = itertools.count()
SHARDS, ROWS = 8, 48          # 8 HCPE shards of 48 positions: 384 rows


def new_bucket(scheme: str) -> str:
    name = f"st{next(_names):03d}-{os.getpid()}"
    b = cloud.backend(scheme)
    b.client.create_bucket(name) if scheme == "gs" else b.client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def hcpe(tmp_path_factory) -> Path:
    """A folder of SHARDS HCPE shards (with game-id sidecars) and its manifest, from random games."""
    folder = tmp_path_factory.mktemp("hcpe")
    rows, ids = random_games(16, seed=3, min_plies=24, max_plies=25)
    rows, ids = rows[:SHARDS * ROWS], ids[:SHARDS * ROWS]
    assert len(rows) == SHARDS * ROWS
    for i in range(SHARDS):
        save_hcpe(folder / f"part{i}.npy", rows[i * ROWS:(i + 1) * ROWS], ids[i * ROWS:(i + 1) * ROWS])
    write_manifest(folder, "hcpe", sorted(folder.glob("part?.npy")), rows=len(rows))
    return folder


@pytest.fixture(scope="module")
def uploaded(servers, hcpe) -> dict:
    """{scheme: uri} of the HCPE folder uploaded to a fresh bucket on each server."""
    out = {}
    for scheme in ("gs", "s3"):
        out[scheme] = f"{scheme}://{new_bucket(scheme)}/hcpe/v1"
        upload_folder(hcpe, out[scheme])
    return out


def shard_bytes(hcpe: Path) -> int:
    """Bytes of one shard (HCPE training reads no sidecar)."""
    return (hcpe / "part0.npy").stat().st_size


def streamed(uri: str, root: Path, cap: int) -> StreamedShards:
    data = open_data("3", uri, cache=ShardCache(root, max_workers=2, max_cached_bytes=cap), input_format="hcpe")
    assert isinstance(data, StreamedShards), data          # the corpus exceeds the cap: streamed, not copied
    return data


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_each_row_once_an_epoch_and_the_cache_stays_under_its_cap(scheme, uploaded, hcpe, tmp_path):
    one = shard_bytes(hcpe)
    cap = 3 * one                                          # the corpus is 8 shards
    data = streamed(uploaded[scheme], tmp_path / "cache", cap)
    local = HcpeDataset(hcpe)
    loader, sampler = make_loader(data, 20, seed=5)
    assert [s.rows for s in data.shards] == [ROWS] * SHARDS and len(data) == len(local)
    held, orders = [], []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        rows = []
        for batch in loader:
            held.append(sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.npy")))
            rows.append(batch["_rows"])
            expected = local[batch["_rows"].numpy()]       # the memory-mapped local copy: the same positions
            assert all(torch.equal(batch[k], expected[k]) for k in expected)
        rows = torch.cat(rows).tolist()
        assert sorted(rows) == list(range(len(local)))     # every row exactly once
        orders.append(rows)
    assert orders[0] != orders[1]                          # shuffled anew each epoch
    assert orders[0][:ROWS] != sorted(orders[0][:ROWS])    # rows shuffled within the window
    assert max(held) <= cap + one and max(held) > 0
    assert list((tmp_path / "cache").rglob("*.npy")) == []   # every shard deleted once used


def test_disjoint_shards_across_two_workers_and_two_ranks(uploaded, hcpe, tmp_path):
    data = streamed(uploaded["gs"], tmp_path / "cache", 4 * shard_bytes(hcpe))
    shard_of = lambda rows: set((np.searchsorted(data.offsets, rows, side="right") - 1).tolist())
    # two DataLoader workers: the batches arrive in the order the sampler plans, each from its worker's shards
    loader, sampler = make_loader(data, 20, seed=1, workers=2)
    sampler.set_epoch(1)
    batches = [b["_rows"].numpy() for b in loader]
    assert len(batches) == len(loader)
    real = [b for i, b in enumerate(batches) if sampler.weight(i) > 0]
    assert sorted(np.concatenate(real).tolist()) == list(range(len(data)))
    mine = sampler.readers(1)[0]
    assert not set(mine[0]) & set(mine[1]) and sorted(mine[0] + mine[1]) == list(range(SHARDS))
    for (worker, _), rows in zip(sampler.sequence(1, 0), real):
        assert shard_of(rows) <= set(mine[worker])
    # two ranks (simulated: one sampler each), the global batch split between them
    ranks = [make_loader(data, 20, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader, sampler in ranks:
        sampler.set_epoch(0)
        seen.append([b["_rows"].numpy() for b in loader])
    assert len(seen[0]) == len(seen[1]) == len(ranks[0][0])      # the same number of steps on every rank
    rows = [np.concatenate([b for i, b in enumerate(s) if ranks[r][1].weight(i) > 0]) for r, s in enumerate(seen)]
    assert not shard_of(rows[0]) & shard_of(rows[1])
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(data)))
    for b in range(len(seen[0])):                              # the ranks' weights make the global batch's mean
        assert ranks[0][1].weight(b) + ranks[1][1].weight(b) == pytest.approx(2.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reads_the_remaining_rows(workers, uploaded, hcpe, tmp_path):
    data = streamed(uploaded["s3"], tmp_path / "cache", 4 * shard_bytes(hcpe))
    loader, sampler = make_loader(data, 16, seed=2, workers=workers)
    sampler.set_epoch(1)
    straight = [b["_rows"] for b in loader]
    state = sampler.state_dict(batches_done=7)
    again, resumed = make_loader(data, 16, seed=2, workers=workers)   # a fresh process's loader
    resumed.load_state_dict(state)
    rest = [b["_rows"] for b in again]
    assert len(rest) == len(straight) - 7
    assert all(torch.equal(a, b) for a, b in zip(rest, straight[7:]))


def test_memory_mode_copies_or_refuses_and_mmap_warns(hcpe, tmp_path):
    train_ds, _ = stage_datasets("3", hcpe, input_format="hcpe", cache_mode="memory", cache_transforms=False)
    assert train_ds.dataset.in_memory and type(train_ds.dataset.arrays[0]) is np.ndarray
    big = tmp_path / "big"
    big.mkdir()
    rows = 2 * available_memory() // HCPE_DTYPE.itemsize + 1     # a sparse shard larger than the RAM left
    with open(big / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(HCPE_DTYPE),
                                                 "fortran_order": False, "shape": (rows,)})
        f.truncate(f.tell() + rows * HCPE_DTYPE.itemsize)
    write_manifest(big, "hcpe", [big / "huge.npy"], rows=rows)
    with pytest.raises(MemoryError) as e:
        stage_datasets("3", big, input_format="hcpe", cache_mode="memory")
    assert "GiB of RAM but" in str(e.value) and "input_cache_mode='file'" in str(e.value)
    with pytest.warns(DeprecationWarning, match="input_cache_mode='mmap' is deprecated"):
        stage_datasets("3", hcpe, input_format="hcpe", cache_mode="mmap", cache_transforms=False)
    preprocess(hcpe, tmp_path / "pre", progress=False)
    with pytest.raises(ValueError, match="cache_transforms=True: Stage3Dataset has nothing to encode"):
        stage_datasets("3", tmp_path / "pre", cache_transforms=True)


def test_cache_transforms_keeps_hcpe_features_and_gives_the_same_batches(hcpe):
    plain, _ = stage_datasets("3", hcpe, input_format="hcpe", cache_transforms=False)
    cached, _ = stage_datasets("3", hcpe, input_format="hcpe")            # default: on for HCPE
    assert plain.dataset._encoded is None and cached.dataset._encoded is not None
    rows = np.array([0, 5, 100, 383])
    a, b = plain.dataset[rows], cached.dataset[rows]
    assert all(torch.equal(a[k], b[k]) for k in a)


TINY = {"device": "cpu", "model": "resnet", "preset": "small", "model_config": {"resnet_widths": [8, 8, 8, 8]},
        "stage": "3", "input_format": "hcpe", "batch_size": 32, "epoch": 1, "log_every": 1, "input_max_workers": 2}


def test_train_reads_a_gs_path_streamed_and_resumes_mid_epoch(uploaded, hcpe, tmp_path):
    """train() from Python on a gs:// corpus larger than the cache: streamed; a run stopped after 3 steps and
    resumed takes the uninterrupted run's remaining batches (same losses) and ends with the same weights."""
    config = {**TINY, "stage3_data": uploaded["gs"], "input_local_cache_dir": str(tmp_path / "cache"),
              "input_max_cached_bytes": 4 * shard_bytes(hcpe)}
    straight = []
    a = train({**config, "out_dir": str(tmp_path / "a")}, progress=False, callback=lambda i: straight.append(i["loss"]))
    stopped = train({**config, "out_dir": str(tmp_path / "b"), "max_steps": 3}, progress=False)
    assert stopped.stopped == "max_steps" and load_checkpoint(stopped.last_checkpoint)["sampler"]["start_batch"] == 3
    rest = []
    b = train({**config, "out_dir": str(tmp_path / "b"), "resume_from": str(tmp_path / "b")}, progress=False,
              callback=lambda i: rest.append(i["loss"]))
    assert len(straight) == 11 and rest == straight[3:]       # 7 of 8 shards train (one validates): 336 rows
    wa, wb = load_checkpoint(a.last_checkpoint)["model"], load_checkpoint(b.last_checkpoint)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert list((tmp_path / "cache").rglob("*.npy")) == []
    [local] = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None).materialise(uploaded["gs"])
    fits = open_data("3", uploaded["gs"], cache=ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=None),
                     input_format="hcpe")
    assert isinstance(fits, HcpeDataset) and fits.paths[0].parent == local   # fits: copied whole, memory-mapped


def test_pipeline_leaves_a_corpus_over_the_cap_to_the_engines_shard_window(uploaded, hcpe, tmp_path):
    """The pipeline copies a train step's remote data that fits, and hands one that exceeds the cap to the engine
    (URI kept, the same cache folder), which then streams it: nothing is downloaded before the step."""
    from maou_nb.pipeline import materialise_inputs
    uri, echo = uploaded["gs"], []
    big = ShardCache(tmp_path / "cache", max_workers=2, max_cached_bytes=3 * shard_bytes(hcpe))
    values = materialise_inputs("train", {"stage3_data": uri, "input_format": "hcpe"}, big, echo.append)
    assert values["stage3_data"] == uri and values["input_local_cache_dir"] == str(big.root)
    assert big.downloaded == 0 and "streamed" in echo[0]
    fits = ShardCache(tmp_path / "cache2", max_workers=2, max_cached_bytes=None)
    values = materialise_inputs("train", {"stage3_data": uri, "input_format": "hcpe"}, fits, echo.append)
    assert Path(values["stage3_data"]).is_dir() and "input_local_cache_dir" not in values and fits.downloaded > 0
