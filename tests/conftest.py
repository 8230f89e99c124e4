"""Shared pytest fixtures: the repository's own game records, the optional reference folder `../shared`, and the GCS and
S3 servers on loopback that the cloud tests (test_cloud, test_streaming) read through."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDS_DIR = ROOT / "tests" / "data" / "records"
SHARED_DIR = ROOT.parent / "shared"
# CI sets this where ../shared is known to be beside the checkout, so a test that needs it fails there instead of skipping.
REQUIRE_SHARED = os.environ.get("MAOU_NB_REQUIRE_SHARED", "") not in ("", "0")


@pytest.fixture(scope="session")
def records_dir() -> Path:
    """Real game records to test on (floodgate games and Maou's converter fixtures; see tests/data/records/README.md)."""
    assert RECORDS_DIR.is_dir(), f"{RECORDS_DIR} is missing: it is part of the repository; restore it with git checkout"
    return RECORDS_DIR


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `../shared` reference folder (Maou's full label table and larger data): beside the checkout for developers
    and CI, absent in a fresh clone, where the tests that cross-check against it skip."""
    if not SHARED_DIR.is_dir():
        reason = (f"reference folder {SHARED_DIR} is absent (a fresh clone has none); this cross-check against Maou's "
                  "published data runs where ../shared sits beside the checkout (developers, CI)")
        if REQUIRE_SHARED:
            pytest.fail(f"MAOU_NB_REQUIRE_SHARED is set but the {reason}")
        pytest.skip(reason)
    return SHARED_DIR


def pytest_collection_modifyitems(items):
    """Mark `shared` every test that reads ../shared (itself or through a fixture), so CI can run those alone beside it."""
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


@pytest.fixture(scope="module")
def servers():
    """GCS (gcp-storage-emulator) and S3 (moto) servers on 127.0.0.1, started here and stopped by their handles, the
    clients' endpoint variables pointing at them; yields {scheme: endpoint}."""
    import socket
    from gcp_storage_emulator.server import create_server
    from moto.server import ThreadedMotoServer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
