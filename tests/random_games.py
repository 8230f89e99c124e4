"""The seeded random games of the tests: `maou_nb.records.random_games`, kept importable under this name for the
test modules that still import it from here (tests/test_datasets.py)."""
from maou_nb.records import random_games  # noqa: F401
