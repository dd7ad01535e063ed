"""The files of a run directory: where each lives, the ones that describe a run, and its dataset again.

Training writes config.json, dataset.json and environment.json before the first epoch (see
docs/architecture.md for the whole layout); evaluation rebuilds the dataset from config.json
(same seed, same split), so a run can be evaluated and resumed from its directory alone.
"""

from __future__ import annotations

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


def load_run_dataset(config: Config) -> Dataset:
    """The dataset a run with `config` trains and evaluates on."""
    d = config.data
    return load_dataset(
        d.dataset,
        data_dir=Path(d.data_dir) if d.data_dir else None,
        cache_dir=Path(d.cache_dir) if d.cache_dir else None,
        val_fraction=d.val_fraction,
        seed=config.train.seed,
        num_train=d.num_train,
        num_test=d.num_test,
    )
