"""Throughput of the local shard cache (maou_nb.cloud) from each emulator, started here on 127.0.0.1.

Synthetic input: `--shards` .npy shards of `--mb` MB each, uploaded to gcp-storage-emulator (GCS) and moto's
S3 server. Prints JSON per backend: shards/s and MB/s into an empty cache (cold, `--workers` parallel downloads,
each verified by size and MD5 and renamed into place), the seconds a second `materialise` takes when everything is
cached (warm: one listing, nothing downloaded), and for comparison the MB/s of reading the cached shards back
against reading the same shards from a local folder (best of 5, interleaved; the cached copy is a plain local file, so training on a
warm cache reads exactly what it reads locally), and the same cold fill with bundling on (`--bundle-mb`: shards packed
into local bundles of that size).

`--bq-rows N` adds bqemulator (BigQuery): rows/s read through the Storage Read API against REST (`list_rows`) for HCPE
rows, preprocessed rows and Maou-style wide rows (a 1496-float `moveLabel` array each, `--wide-rows` of them), and
rows/s of `maou_nb.bigquery.read_table` end to end into local shards.

Then training samples/s (`--train-rounds` > 0): the same `train()` run (Stage 3, a small ResNet, `--train-steps`
steps of `--batch` on preprocessed shards of `--games` random cshogi games) on a local folder, on a gs:// copy read
through a cold cache (a fresh cache folder each round: listing, download, then training), through a warm cache
(everything cached: one listing, nothing downloaded) and streamed (`input_max_cached_bytes` half the data: the
shard window), in alternating order each round. `samples_per_s`: steps x batch / the run's wall time, start-up
(listing, downloads, model) included; `loop_samples_per_s`: the rate between the first and the last optimiser step
(the data path inside the loop). Best of the rounds (the machine is shared and noisy); `warm_vs_local` is the ratio
of the two best wall-time rates (the issue's target: >= 0.95).
"""
import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_all(folder: Path) -> float:
    t0 = time.perf_counter()
    for p in sorted(folder.glob("*.npy")):
        np.load(p, allow_pickle=False).sum()
    return time.perf_counter() - t0


def _bigquery_emulator():
    """bqemulator on 127.0.0.1 in this process (its spatial extension, which needs a download, skipped); the endpoint
    variables set; returns its handle."""
    os.environ.update(BQEMU_ENABLE_FORMAT_EXTENSIONS="false", BQEMU_WRITE_API_MAX_REQUEST_BYTES=str(256 << 20))
    from bqemulator.config import LogLevel, PersistenceMode, Settings
    from bqemulator.storage.engine import DuckDBEngine
    from bqemulator.testing._thread_runner import ThreadedEmulator
    DuckDBEngine._load_spatial = lambda self: None
    server = ThreadedEmulator(Settings(persistence_mode=PersistenceMode.EPHEMERAL, rest_host="127.0.0.1", rest_port=0,
                                       grpc_host="127.0.0.1", grpc_port=0, log_level=LogLevel.ERROR))
    server.start()
    os.environ.update(BIGQUERY_EMULATOR_HOST=server.server.rest_url, BIGQUERY_STORAGE_EMULATOR_HOST=server.server.grpc_endpoint)
    return server


def _storage_rows(b, uri: str, fields: list[str]) -> int:
    """Rows of `uri` read through the Storage Read API as Arrow batches (nothing else done with them)."""
    import pyarrow as pa
    from google.cloud import bigquery_storage_v1 as bqs
    from maou_nb.bigquery import parse_table
    project, dataset, table = parse_table(uri)
    request = bqs.types.ReadSession(table=f"projects/{project}/datasets/{dataset}/tables/{table}", data_format=bqs.types.DataFormat.ARROW,
                                    read_options=bqs.types.ReadSession.TableReadOptions(selected_fields=fields))
    session = b.read.create_read_session(parent=f"projects/{project}", read_session=request, max_stream_count=1)
    schema, n = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema)), 0
    for stream in session.streams:
        for response in b.read.read_rows(stream.name):
            n += pa.ipc.read_record_batch(pa.py_buffer(response.arrow_record_batch.serialized_record_batch), schema).num_rows
    return n


def bigquery_benchmark(rows: int, wide_rows: int, tmp: Path) -> dict:
    """Rows/s from bqemulator: Storage Read API vs REST for HCPE, preprocessed and wide rows; read_table into shards."""
    import cshogi
    import pyarrow as pa
    from maou_nb.bigquery import (HCPE_COLUMNS, PREPROCESSED_COLUMNS, _append_rows, bq_backend, read_table, write_hcpe_table,
                                  write_preprocessed_table)
    from maou_nb.preprocess import MOVE_DTYPE, POSITION_DTYPE, ShardWriter
    from maou_nb.storage import HCPE_DTYPE, save_hcpe, write_manifest
    server, rng = _bigquery_emulator(), np.random.default_rng(0)
    try:
        b = bq_backend("bench-project")
        b.client.create_dataset("bench")
        hcpe = np.zeros(rows, HCPE_DTYPE)
        hcpe["hcp"], hcpe["eval"] = rng.integers(0, 256, (rows, 32)), rng.integers(-999, 999, rows)
        save_hcpe(tmp / "bq-hcpe" / "part.npy", hcpe, rng.integers(0, 1 << 40, rows))
        pos = np.zeros(rows, POSITION_DTYPE)
        start = np.zeros(1, cshogi.HuffmanCodedPos)
        cshogi.Board().to_hcp(start)                          # a real position (the reader re-encodes board and hand)
        pos["hcp"], pos["count"], pos["move_count"] = start["hcp"], 1, rng.integers(1, 5, rows)
        pos["move_start"] = np.cumsum(pos["move_count"]) - pos["move_count"]
        moves = np.zeros(int(pos["move_count"].sum()), MOVE_DTYPE)
        moves["label"], moves["count"] = rng.integers(0, 1496, len(moves)), 1
        writer = ShardWriter(tmp / "bq-pre", rows)
        writer.add(pos, moves)
        writer.flush()
        write_manifest(tmp / "bq-pre", "preprocessed", writer.shards, rows=rows)
        tables = {"hcpe": ("bq://bench-project.bench.hcpe", list(HCPE_COLUMNS)),
                  "preprocessed": ("bq://bench-project.bench.pre", list(PREPROCESSED_COLUMNS)),
                  "wide": ("bq://bench-project.bench.wide", ["hcp", "moveLabel"])}
        write_hcpe_table(tmp / "bq-hcpe", tables["hcpe"][0], partition_date="2026-01-01")
        write_preprocessed_table(tmp / "bq-pre", tables["preprocessed"][0], partition_date="2026-01-01")
        wide = pa.ListArray.from_arrays(pa.array(np.arange(0, 1497 * wide_rows, 1496, dtype=np.int32)),
                                        pa.array(rng.random(1496 * wide_rows)))
        _append_rows(tables["wide"][0], {"hcp": pa.array([bytes(32)] * wide_rows, pa.binary()), "moveLabel": wide}, "2026-01-01", None)
        out = {"rows": rows, "wide_rows": wide_rows}
        for name, (uri, fields) in tables.items():
            n = rows if name != "wide" else wide_rows
            storage = rest = float("inf")
            for _ in range(2):                                # best of 2, interleaved: the first pays the warm-up
                t0 = time.perf_counter()
                assert _storage_rows(b, uri, fields) == n
                storage = min(storage, time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert sum(1 for _ in b.client.list_rows(uri[5:], page_size=10_000)) == n
                rest = min(rest, time.perf_counter() - t0)
            out[name] = {"storage_rows_per_s": round(n / storage), "rest_rows_per_s": round(n / rest),
                         "storage_over_rest": round(rest / storage, 1)}
            if name != "wide":
                t0 = time.perf_counter()
                read_table(uri, tmp / f"read-{name}", batch_size=100_000)
                out[name]["read_table_rows_per_s"] = round(n / (time.perf_counter() - t0))
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--bundle-mb", type=float, default=16.0)
    parser.add_argument("--bq-rows", type=int, default=0)
    parser.add_argument("--wide-rows", type=int, default=500)
    parser.add_argument("--train-rounds", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--games", type=int, default=60)
    args = parser.parse_args()
    from gcp_storage_emulator.server import create_server
    from moto.server import ThreadedMotoServer
    port = _free_port()
    gcs = create_server("127.0.0.1", port, in_memory=True)
    gcs.start()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    os.environ.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}",
                      AWS_ENDPOINT_URL_S3="http://%s:%d" % s3.get_host_and_port(),
                      AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    from maou_nb.cloud import ShardCache, backend, upload_file, upload_folder
    from maou_nb.storage import save_array, write_manifest
    tmp = Path(tempfile.mkdtemp())
    rows = int(args.mb * 1e6 / 8)
    for i in range(args.shards):
        save_array(tmp / "local" / f"part{i:04d}.npy", np.random.default_rng(i).integers(0, 1 << 60, rows))
    mb = sum(p.stat().st_size for p in (tmp / "local").glob("*.npy")) / 1e6
    out = {"shards": args.shards, "mb": round(mb, 1), "workers": args.workers}
    for scheme in ("gs", "s3"):
        b = backend(scheme)
        b.client.create_bucket("bench") if scheme == "gs" else b.client.create_bucket(Bucket="bench")
        upload_folder(tmp / "local", f"{scheme}://bench/corpus")
        cache = ShardCache(tmp / f"cache-{scheme}", max_workers=args.workers, max_cached_bytes=None)
        t0 = time.perf_counter()
        [local] = cache.materialise(f"{scheme}://bench/corpus")
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.materialise(f"{scheme}://bench/corpus")
        warm = time.perf_counter() - t0
        times = [(_read_all(tmp / "local"), _read_all(local)) for _ in range(5)]   # interleaved, best of 5
        read_local, read_cached = min(t[0] for t in times), min(t[1] for t in times)
        write_manifest(tmp / "local", "hcpe", sorted((tmp / "local").glob("*.npy")), rows=rows * args.shards)
        upload_file(tmp / "local" / "manifest.json", f"{scheme}://bench/corpus/manifest.json")   # a data folder: bundled
        bundled = ShardCache(tmp / f"bundled-{scheme}", max_workers=args.workers, max_cached_bytes=None,
                             bundle_bytes=int(args.bundle_mb * 1e6))
        t0 = time.perf_counter()
        bundled.materialise(f"{scheme}://bench/corpus")
        cold_bundled = time.perf_counter() - t0
        out[scheme] = {"cold_shards_per_s": round(args.shards / cold, 1), "cold_mb_per_s": round(mb / cold, 1),
                       "warm_seconds": round(warm, 3), "read_local_mb_per_s": round(mb / read_local, 1),
                       "read_cached_mb_per_s": round(mb / read_cached, 1),
                       "cold_bundled_mb_per_s": round(mb / cold_bundled, 1)}
    if args.train_rounds:
        out["training"] = training(args, tmp)
    gcs.stop()
    s3.stop()
    if args.bq_rows:
        out["bigquery"] = bigquery_benchmark(args.bq_rows, args.wide_rows, tmp)
    print(json.dumps(out, indent=2))


def training(args, tmp: Path) -> dict:
    """Training samples/s on a local folder vs a gs:// copy through a cold cache, a warm cache and the shard window."""
    from maou_nb.cloud import upload_folder
    from maou_nb.preprocess import preprocess
    from maou_nb.records import random_games
    from maou_nb.storage import save_hcpe, write_manifest
    from maou_nb.train import train
    hcpe, ids = random_games(args.games, seed=0, min_plies=60, max_plies=120)
    save_hcpe(tmp / "hcpe" / "all.npy", hcpe, ids)
    write_manifest(tmp / "hcpe", "hcpe", [tmp / "hcpe" / "all.npy"], rows=len(hcpe))
    preprocess(tmp / "hcpe", tmp / "pre", rows_per_shard=max(1, len(hcpe) // 12), progress=False)
    upload_folder(tmp / "pre", "gs://bench/pre")
    size = sum(p.stat().st_size for p in (tmp / "pre").iterdir())
    base = {"stage": "3", "device": "cpu", "preset": "small", "model_config": {"resnet_widths": [16, 16, 16, 16]},
            "batch_size": args.batch, "epoch": 1, "max_steps": args.train_steps, "log_every": 10_000, "seed": 0,
            "input_max_workers": args.workers}
    modes = {"local": {"stage3_data": str(tmp / "pre")},
             "cold": {"stage3_data": "gs://bench/pre"},
             "warm": {"stage3_data": "gs://bench/pre", "input_local_cache_dir": str(tmp / "warm-cache")},
             "stream": {"stage3_data": "gs://bench/pre", "input_max_cached_bytes": size // 2}}
    train({**base, **modes["warm"], "out_dir": str(tmp / "prime"), "max_steps": 1}, progress=False)  # fills the warm cache
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    loop: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.train_rounds):
        names = list(modes)[r % len(modes):] + list(modes)[:r % len(modes)]   # alternate the order
        for m in names:
            extra = {"input_local_cache_dir": str(tmp / f"cache-{m}-{r}")} if m in ("cold", "stream") else {}
            stamps: list[float] = []
            t0 = time.perf_counter()
            train({**base, **modes[m], **extra, "out_dir": str(tmp / f"run-{m}-{r}")}, progress=False,
                  callback=lambda info: stamps.append(time.perf_counter()))
            seconds[m].append(time.perf_counter() - t0)
            loop[m].append((len(stamps) - 1) * args.batch / (stamps[-1] - stamps[0]))
    samples = args.train_steps * args.batch
    rate = {m: round(samples / min(t), 1) for m, t in seconds.items()}
    return {"rows": len(hcpe), "data_mb": round(size / 1e6, 2), "shards": len(list((tmp / "pre").glob("*[0-9].npy"))),
            "batch": args.batch, "steps": args.train_steps, "rounds": args.train_rounds,
            "samples_per_s": rate, "loop_samples_per_s": {m: round(max(v), 1) for m, v in loop.items()},
            "seconds": {m: [round(x, 2) for x in t] for m, t in seconds.items()},
            "warm_vs_local": round(rate["warm"] / rate["local"], 3), "cold_vs_local": round(rate["cold"] / rate["local"], 3),
            "stream_vs_local": round(rate["stream"] / rate["local"], 3)}


if __name__ == "__main__":
    main()
