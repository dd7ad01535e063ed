"""The files of a run directory: where each lives, the ones that describe a run, and its dataset again.

Training writes config.json, dataset.json and environment.json before the first epoch (see
docs/architecture.md for the whole layout); evaluation rebuilds the dataset from config.json
(same seed, same split), so a run can be evaluated and resumed from its directory alone.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer import config as config_mod
from trainer.config import Config, write_json_atomic
from trainer.data import Dataset, load_dataset

CONFIG_FILE = "config.json"  # the resolved Config
DATASET_FILE = "dataset.json"  # Dataset.describe(): name, source, sizes, class names, statistics
ENVIRONMENT_FILE = "environment.json"  # backend, versions and devices of the latest session
RECIPE_FILE = "recipe.json"  # trainer/recipe.py: batch, lr and flip as resolved for this data, and why
HISTORY_FILE = "history.csv"  # one row per epoch
MODEL_FILE = "model.keras"  # the best epoch's model
METRICS_FILE = "metrics.json"  # test-split results
CHECKPOINTS_DIR = "checkpoints"  # per-epoch checkpoints and state.json (trainer/checkpoints.py)
REPORTS_DIR = "reports"  # figures and per_class.json
TENSORBOARD_DIR = "tensorboard"


def read_config(run_dir: Path) -> Config:
    """The run's own settings (config.json); ConfigError when missing or unreadable."""
    return config_mod.load(run_dir / CONFIG_FILE)


def describe_run(run_dir: Path, config: Config, dataset: Dataset, environment: dict[str, Any]) -> None:
    """Write config.json, dataset.json and environment.json (the latter of the latest session)."""
    config.save(run_dir / CONFIG_FILE)
    write_json_atomic(run_dir / DATASET_FILE, dataset.describe())
    write_json_atomic(run_dir / ENVIRONMENT_FILE, environment)


# Datasets loaded inside `reusing_datasets()`, by load_dataset's arguments; None outside it.
_reused: contextvars.ContextVar[dict[tuple[Any, ...], Dataset] | None] = contextvars.ContextVar(
    "reused_datasets", default=None
)


@contextlib.contextmanager
def reusing_datasets() -> Iterator[None]:
    """Inside the block (or a function it decorates), `load_run_dataset` loads each dataset once.

    A publish reads the run's splits twice (the quality gate, the calibration and OOD fit): an image
    folder of thousands of photos would be decoded twice. The reused arrays are made read-only, so
    a caller that modified them would fail instead of changing what the other reads. Outside the
    block every call loads afresh: data on disk may have changed between two publishes."""
    token = _reused.set({})
    try:
        yield
    finally:
        _reused.reset(token)


def load_run_dataset(config: Config) -> Dataset:
    """The dataset a run with `config` trains and evaluates on."""
    d = config.data
    kwargs: dict[str, Any] = {
        "data_dir": Path(d.data_dir) if d.data_dir else None,
        "cache_dir": Path(d.cache_dir) if d.cache_dir else None,
        "val_fraction": d.val_fraction,
        "seed": config.train.seed,
        "num_train": d.num_train,
        "num_test": d.num_test,
    }
    reused = _reused.get()
    key = (d.dataset, *sorted(kwargs.items()))
    if reused is not None and key in reused:
        return reused[key]
    dataset = load_dataset(d.dataset, **kwargs)
    if reused is not None:
        for split in (dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val,
                      dataset.x_test, dataset.y_test):  # fmt: skip
            split.flags.writeable = False
        reused[key] = dataset
    return dataset
