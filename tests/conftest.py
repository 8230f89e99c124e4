"""Shared pytest fixtures: the repository's own game records, and the optional reference folder `../shared`."""
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
