"""Shared pytest fixtures: the reference folder `../shared` beside the project root."""
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `../shared` reference folder (records, label table); present for developers and CI."""
    assert SHARED_DIR.is_dir(), f"expected the shared reference folder at {SHARED_DIR}"
    return SHARED_DIR


@pytest.fixture(scope="session")
def records_dir(shared_dir) -> Path:
    """Real game records to test on."""
    return shared_dir / "data" / "records"
