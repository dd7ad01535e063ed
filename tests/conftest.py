"""Shared test setup. Fixtures that build things (data, trained runs, exported models, servers)
live in tests/fixtures/, one module per concern, and are generated once per session."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# Quiet TensorFlow and make Keras pick the same backend in every test process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.training",
    "tests.fixtures.exported",
    "tests.fixtures.tfserving",
    "tests.fixtures.gateway",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CIFAR_SAMPLE_DIR = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-sample"


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def cifar_sample() -> list[tuple[Path, str]]:
    """The 200 real CIFAR-10 photos beside the project, as (path, label) pairs."""
    labels = CIFAR_SAMPLE_DIR / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"real CIFAR-10 sample photos not found at {CIFAR_SAMPLE_DIR} (shared/ is absent)")
    with labels.open(newline="") as f:
        rows = [row for row in csv.reader(f) if len(row) == 2 and row[0] != "file"]  # header optional
    return [(CIFAR_SAMPLE_DIR / name, label) for name, label in rows]
