"""BigQuery tables as data paths (maou_nb.bigquery) against bqemulator on 127.0.0.1, started in this process and
stopped by its handle: the writer and the Storage Read reader, the cache's reuse of a read, a whole pipeline run
reading a bucket and a table, and the example params file."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maou_nb.bigquery import bq_backend, read_table, write_hcpe_table, write_preprocessed_table
from maou_nb.cloud import CloudError, ShardCache, check_uri, list_uri, upload_folder
from maou_nb.storage import load_array, load_checkpoint, load_game_ids, load_hcpe, manifest_shards

from cloud_servers import bigquery, hcpe, new_bucket, servers  # noqa: F401 (fixtures)


TRAIN = {"stage": "3", "preset": "small", "model_config": {"resnet_widths": [8, 8, 8, 8]}, "batch_size": 16,
         "epoch": 1, "log_every": 1, "device": "cpu", "input_max_workers": 2}


def test_bigquery_writer_and_reader_round_trip(bigquery, hcpe, tmp_path):
    """HCPE shards -> a partitioned table -> the Storage Read API -> the same rows and game ids as local shards."""
    uri = f"bq://{bigquery}.maou.roundtrip"
    rows = write_hcpe_table(hcpe, uri, partition_date="2026-01-01", clustering_key="gameId")
    write_hcpe_table(hcpe, uri, partition_date="2026-01-02")
    assert check_uri(uri) == 2 * rows
    shards = sorted(p for p in hcpe.glob("*.npy") if "." not in p.stem)
    original = {(bytes(h["hcp"]), int(h["bestMove16"]), int(g)) for p in shards
                for h, g in zip(load_hcpe(p), load_game_ids(p))}
    cache = ShardCache(tmp_path / "cache", max_workers=1, max_cached_bytes=None, batch_size=40, partition_date="2026-01-01")
    [local] = cache.materialise(uri)
    read = manifest_shards(local, "hcpe")
    assert len(read) == -(-rows // 40) and all(len(load_hcpe(p)) <= 40 for p in read)
    assert {(bytes(h["hcp"]), int(h["bestMove16"]), int(g)) for p in read
            for h, g in zip(load_hcpe(p), load_game_ids(p))} == original
    assert cache.materialise(uri) == [local] and cache.downloaded == 1          # unchanged table: reused
    write_hcpe_table(shards[:1], uri, partition_date="2026-01-01")              # the table changed: read again
    cache.materialise(uri)
    assert cache.downloaded == 2 and sum(len(load_hcpe(p)) for p in manifest_shards(local, "hcpe")) > rows
    with pytest.raises(CloudError, match="no rows in partition 2030-01-01"):
        read_table(uri, tmp_path / "empty", partition_date="2030-01-01")
    with pytest.raises(CloudError, match=r"train.stage3_data: .*table not found"):
        check_uri(f"bq://{bigquery}.maou.nothing", "train.stage3_data")



def test_clustering_key_reads_cluster_by_cluster_and_never_splits_one(bigquery, hcpe, tmp_path):
    """input_clustering_key=gameId: a session per game, shards closed only between games, the same rows as one read;
    a key that is not a column is refused naming the columns; the cache reads again when the key changes."""
    uri = f"bq://{bigquery}.maou.clustered"
    rows = write_hcpe_table(hcpe, uri, partition_date="2026-01-01", clustering_key="gameId")
    def read(key, folder):
        shards = manifest_shards(read_table(uri, tmp_path / folder, batch_size=40, clustering_key=key), "hcpe")
        return [(load_hcpe(p), load_game_ids(p)) for p in shards]
    plain, clustered = read(None, "plain"), read("gameId", "clustered")
    def rows_of(shards):
        return sorted((bytes(h["hcp"]), int(h["bestMove16"]), int(g)) for a, ids in shards for h, g in zip(a, ids))
    assert rows_of(clustered) == rows_of(plain) and len(rows_of(plain)) == rows
    games = [set(ids.tolist()) for _, ids in clustered]
    assert len(games) > 1 and all(not (a & b) for i, a in enumerate(games) for b in games[i + 1:])  # no game split
    assert any(len(set(ids.tolist()) & set(other.tolist())) for (_, ids), (_, other) in zip(plain, plain[1:]))
    with pytest.raises(CloudError, match=r"input_clustering_key='gameid' is not a column .*gameId"):
        read_table(uri, tmp_path / "bad", clustering_key="gameid")
    cache = ShardCache(tmp_path / "cache", max_workers=1, max_cached_bytes=None, batch_size=40)
    cache.materialise(uri)
    cache.clustering_key = "gameId"
    cache.materialise(uri)
    assert cache.downloaded == 2

def _objects(uri: str) -> set[str]:
    r, objects, _ = list_uri(uri)
    return {o.key[len(r.key) + 1:] for o in objects}


def test_pipeline_reads_buckets_mirrors_and_resumes_from_the_mirror(servers, bigquery, hcpe, tmp_path, monkeypatch):
    from maou_nb.pipeline import load_params, run_pipeline
    from maou_nb.selfplay import play_games
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MAOU_NB_DATA_ROOT", str(tmp_path / "data-root"))
    gs_in, gs_out = f"gs://{new_bucket('gs')}/hcpe", f"gs://{new_bucket('gs')}/runs"
    upload_folder(hcpe, gs_in)
    bq_in = f"bq://{bigquery}.maou.more_games"                                   # two other games, from a table
    write_hcpe_table(play_games(2, tmp_path / "more", seed=7, max_moves=60, workers=1)[0].parent, bq_in)
    first = {"name": "cloud-first", "steps": ["preprocess", "train"], "output_uri": gs_out,
             "preprocess": {"hcpe_inputs": [gs_in, bq_in], "test_ratio": 0.5}, "train": {**TRAIN, "max_steps": 2}}
    assert load_params(first)["preprocess"]["hcpe_inputs"] == [gs_in, bq_in]   # a URI stays a URI
    lines: list[str] = []
    run1 = run_pipeline(first, run_id="first", runs_root=str(tmp_path / "machine1"), echo=lines.append)
    assert any("remote input(s)" in line for line in lines) and any("mirror complete" in line for line in lines)
    mirrored = _objects(f"{gs_out}/first")
    assert {"checkpoints/last.pt", "checkpoints/latest.json", "notebooks/preprocess.ipynb", "notebooks/train.ipynb",
            "stats.json", "metrics.jsonl", "summary.md", "params.yaml", "run.json"} <= mirrored
    assert any(k.startswith("logs/") and "tfevents" in k for k in mirrored) and not any(k.startswith("data/") for k in mirrored)
    split = sum(json.loads((run1 / "data" / "split" / side / "manifest.json").read_text())["rows"] for side in ("train", "val"))
    assert split == sum(len(load_hcpe(p)) for p in hcpe.glob("*.npy") if "." not in p.stem) + sum(
        len(load_hcpe(p)) for p in (tmp_path / "more" / "hcpe").glob("*.npy") if "." not in p.stem)
    stopped = load_checkpoint(run1 / "checkpoints" / "last.pt")
    assert stopped["global_step"] == 2

    # a fresh machine: training data from S3, the run to resume from in the GCS mirror, outputs mirrored to S3
    s3_data, s3_out = f"s3://{new_bucket('s3')}/preprocessed", f"s3://{new_bucket('s3')}/runs"
    upload_folder(run1 / "data" / "preprocessed", s3_data)
    second = {"name": "cloud-second", "steps": ["train", "export"], "output_uri": s3_out,
              "train": {**TRAIN, "stage3_data": f"{s3_data}/train", "stage3_val_data": f"{s3_data}/val",
                        "resume_from": f"{gs_out}/first"},
              "export": {"positions_data": f"{s3_data}/val", "verify_positions": 8, "fp16": False}}
    run2 = run_pipeline(second, run_id="second", runs_root=str(tmp_path / "machine2"), echo=lines.append)
    resumed = load_checkpoint(run2 / "checkpoints" / "last.pt")
    assert resumed["global_step"] > 2 and resumed["completed_stages"] == ["3"]
    assert {"checkpoints/last.pt", "checkpoints/latest.json", "models/model.onnx", "summary.md",
            "notebooks/export.ipynb"} <= _objects(f"{s3_out}/second")


def test_bigquery_params_file_is_valid_against_the_emulator(bigquery, hcpe):
    from maou_nb.pipeline import find_params, load_params
    with pytest.raises(CloudError, match=r"preprocess.hcpe_inputs: .*not found"):
        load_params(find_params("cloud/bigquery"))
    bq_backend("my-project").client.create_dataset("shogi", exists_ok=True)
    write_hcpe_table(hcpe, "bq://my-project.shogi.hcpe", partition_date="2026-01-01")
    params = load_params(find_params("cloud/bigquery"))
    assert params["preprocess"]["hcpe_inputs"] == ["bq://my-project.shogi.hcpe"]
    assert params["train"]["input_partitioning_key_date"] == "2026-01-01"


def test_preprocessed_rows_round_trip_into_stage3_data(bigquery, hcpe, tmp_path):
    """Preprocessed shards -> a table of one position a row -> the cache -> Stage 3 reads the same targets; a table of
    other columns is refused by the up-front check, naming the columns the kit reads."""
    from maou_nb.datasets import Stage3Dataset
    from maou_nb.pipeline import input_cache, load_params, materialise_inputs
    from maou_nb.preprocess import preprocess
    pre = preprocess(hcpe, tmp_path / "pre", rows_per_shard=50)[0].parent
    uri = f"bq://{bigquery}.maou.positions"
    rows = write_preprocessed_table(pre, uri, partition_date="2026-01-01")
    assert rows == json.loads((pre / "manifest.json").read_text())["rows"] and check_uri(uri) == rows
    train = {"stage": "3", "stage3_data": uri, "stage3_val_data": uri, "input_batch_size": 64,
             "input_local_cache_dir": str(tmp_path / "cache")}
    params = load_params({"steps": ["train"], "train": train})        # listed, and of a kind the kit reads
    local = materialise_inputs("train", params["train"], input_cache(params), echo=lambda line: None)["stage3_data"]
    assert json.loads((Path(local) / "manifest.json").read_text())["kind"] == "preprocessed"
    assert all(len(load_array(p)) <= 64 for p in manifest_shards(local))
    mine, theirs = Stage3Dataset(pre), Stage3Dataset(local)
    assert len(theirs) == len(mine) == rows
    a, b = mine.batch(np.arange(rows)), theirs.batch(np.arange(rows))
    order_a, order_b = (np.lexsort(np.hstack([x["board"].reshape(rows, -1), x["hand"]]).T) for x in (a, b))
    for key in a:
        assert np.array_equal(np.asarray(a[key])[order_a], np.asarray(b[key])[order_b]), key
    bq_backend(bigquery).client.query("CREATE TABLE maou.wide (id INT64, hcp BYTES, moveLabel ARRAY<FLOAT64>)").result()
    with pytest.raises(CloudError, match=r"train.stage3_data: .*neither HCPE rows .*preprocessed rows \(hcp, count, value, "
                                         r"moveLabel, moveCount, moveWins\)"):
        load_params({"steps": ["train"], "train": {**train, "stage3_data": f"bq://{bigquery}.maou.wide"}})


def test_cloud_does_not_import_the_bigquery_clients():
    """maou_nb.cloud reaches bq:// through its table-source registry: importing it loads no BigQuery module."""
    code = "import sys, maou_nb.cloud; print(sorted(m for m in sys.modules if 'bigquery' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
