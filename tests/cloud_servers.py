"""Loopback servers for the cloud tests (gcp-storage-emulator, moto's S3 server, bqemulator), started in this process
and stopped by their handles, and the small data they upload. Imported by test_cloud.py and test_bigquery.py."""
import itertools
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from maou_nb import cloud
from maou_nb.storage import save_array, write_manifest

_names = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers():
    """Both servers on loopback, the endpoint variables pointing at them; yields {scheme: endpoint}."""
    from gcp_storage_emulator.server import create_server
    from moto.server import ThreadedMotoServer
    port = free_port()
    gcs = create_server("127.0.0.1", port, in_memory=True)
    gcs.start()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
           "AWS_ENDPOINT_URL_S3": "http://%s:%d" % s3.get_host_and_port(),
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield {"gs": env["STORAGE_EMULATOR_HOST"], "s3": env["AWS_ENDPOINT_URL_S3"]}
    gcs.stop()
    s3.stop()


@pytest.fixture(scope="module")
def bigquery(servers):
    """bqemulator on loopback (REST and gRPC), in this process; yields the project with a dataset `maou`.
    Its engine loads DuckDB's spatial extension at start, which needs a download: skipped (no GEOGRAPHY here)."""
    from bqemulator.config import PersistenceMode, Settings
    from bqemulator.storage.engine import DuckDBEngine
    from bqemulator.testing._thread_runner import ThreadedEmulator
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DuckDBEngine, "_load_spatial", lambda self: None)
        mp.setenv("BQEMU_ENABLE_FORMAT_EXTENSIONS", "false")
        mp.setenv("BQEMU_WRITE_API_MAX_REQUEST_BYTES", str(256 << 20))
        server = ThreadedEmulator(Settings(persistence_mode=PersistenceMode.EPHEMERAL, rest_host="127.0.0.1",
                                           rest_port=0, grpc_host="127.0.0.1", grpc_port=0))
        server.start()
        try:
            mp.setenv("BIGQUERY_EMULATOR_HOST", server.server.rest_url)
            mp.setenv("BIGQUERY_STORAGE_EMULATOR_HOST", server.server.grpc_endpoint)
            __import__("maou_nb.bigquery").bigquery.bq_backend("test-project").client.create_dataset("maou")
            yield "test-project"
        finally:
            server.stop()


def new_bucket(scheme: str) -> str:
    """A fresh bucket on the server of `scheme`."""
    name = f"b{next(_names):03d}-{os.getpid()}"
    b = cloud.backend(scheme)
    b.client.create_bucket(name) if scheme == "gs" else b.client.create_bucket(Bucket=name)
    return name


def corpus(folder: Path, n: int = 3, rows: int = 1000) -> Path:
    """A data folder like the kit's: n .npy shards and a manifest."""
    for i in range(n):
        save_array(folder / f"part{i}.npy", np.arange(rows * i, rows * (i + 1), dtype=np.int64))
    write_manifest(folder, "hcpe", sorted(folder.glob("*.npy")), rows=n * rows)
    return folder


@pytest.fixture(scope="module")
def hcpe(tmp_path_factory):
    """Real HCPE shards from the kit's own self-play (4 short games)."""
    from maou_nb.selfplay import play_games
    out = tmp_path_factory.mktemp("selfplay")
    play_games(4, out, max_moves=60, workers=1)
    return out / "hcpe"
