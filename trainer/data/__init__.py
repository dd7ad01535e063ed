"""Where data enters the trainer: every dataset becomes one `Dataset` of uint8 pixels.

`load_dataset` is the single entry point; the loaders for each source live beside it
(`cifar10`, `imagefolder`, `synthetic`) and `splits` carves validation and computes
normalization statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data import cifar10, imagefolder, synthetic
from trainer.data.errors import DataError
from trainer.data.raw import RawSplits
from trainer.data.splits import channel_stats, stratified_split

__all__ = ["DATASET_NAMES", "DataError", "Dataset", "load_dataset"]

DATASET_NAMES = ("cifar10", "imagefolder", "synthetic")

# Sizes of the synthetic dataset when the caller does not limit them: enough for a small CNN
# to pass 90% in a few epochs, small enough to generate in about a second.
SYNTHETIC_TRAIN = 3000
SYNTHETIC_TEST = 1000


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test splits as raw RGB pixels.

    x_*: uint8 [N, 32, 32, 3] (RGB, 0..255); y_*: int32 [N] class indices into `class_names`.
    `mean`/`std`: per-channel statistics of x_train in pixel units (0..255), computed on the
    training split only; the model's first layer uses them, so the model takes raw pixels.
    """

    name: str  # "cifar10" | "imagefolder" | "synthetic"
    class_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""  # where it came from: a path, a URL, or "generated (seed=...)"
    synthetic: bool = False  # True when the images are generated, not photos
    notes: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        """JSON-ready summary written to the run directory as dataset.json."""
        return {
            "name": self.name,
            "source": self.source,
            "synthetic": self.synthetic,
            "class_names": list(self.class_names),
            "num_train": int(len(self.x_train)),
            "num_val": int(len(self.x_val)),
            "num_test": int(len(self.x_test)),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            **({"notes": self.notes} if self.notes else {}),
        }


def load_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    download_url: str | None = None,
    download_md5: str | None = None,
) -> Dataset:
    """Load dataset `name`, carve a stratified validation split, compute train-only statistics.

    name: "cifar10" (official archive, downloaded once into `cache_dir` unless `data_dir` holds
    a copy), "imagefolder" (`data_dir`/train/<class>/*, `data_dir`/test/<class>/*) or "synthetic".
    num_train / num_test: cap the training pool (before validation is carved) and the test split;
    real data keeps a seeded random subset, synthetic data generates exactly that many.
    download_url / download_md5: a mirror (or test server) and its archive's MD5; the MD5 defaults
    to the official archive's. Bad or missing data raises DataError (a ValueError).
    """
    _check_sizes(val_fraction, num_train, num_test)
    raw = _load_raw(name, data_dir=data_dir, cache_dir=cache_dir, seed=seed, num_train=num_train,
                    num_test=num_test, download_url=download_url, download_md5=download_md5)
    is_synthetic = name == "synthetic"
    if not is_synthetic:  # synthetic data was generated at the requested size
        raw = _limit(raw, num_train, num_test, seed)
    return _carve_validation(name, raw, val_fraction, seed, is_synthetic=is_synthetic)


def _check_sizes(val_fraction: float, num_train: int | None, num_test: int | None) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for label, value in (("num_train", num_train), ("num_test", num_test)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be a positive number of images, got {value}")


def _load_raw(
    name: str,
    *,
    data_dir: Path | None,
    cache_dir: Path | None,
    seed: int,
    num_train: int | None,
    num_test: int | None,
    download_url: str | None,
    download_md5: str | None,
) -> RawSplits:
    """Train and test splits from the loader of source `name`."""
    if name == "synthetic":
        return synthetic.load(
            num_train=SYNTHETIC_TRAIN if num_train is None else num_train,
            num_test=SYNTHETIC_TEST if num_test is None else num_test,
            seed=seed,
        )
    if name == "cifar10":
        return cifar10.load(data_dir=data_dir, cache_dir=cache_dir, url=download_url, md5=download_md5)
    if name == "imagefolder":
        if data_dir is None:
            raise DataError(
                "the imagefolder dataset needs a data directory: pass --data-dir ROOT "
                "with ROOT/train/<class>/* and ROOT/test/<class>/*"
            )
        return imagefolder.load(Path(data_dir))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def _limit(raw: RawSplits, num_train: int | None, num_test: int | None, seed: int) -> RawSplits:
    """Seeded random subsets of at most `num_train` training and `num_test` test images."""
    x_train, y_train = _subset(raw.x_train, raw.y_train, num_train, seed)
    x_test, y_test = _subset(raw.x_test, raw.y_test, num_test, seed + 1)
    return raw._replace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def _carve_validation(
    name: str, raw: RawSplits, val_fraction: float, seed: int, *, is_synthetic: bool
) -> Dataset:
    """Hold out a stratified validation split; statistics come from what is left for training."""
    train_idx, val_idx = stratified_split(raw.y_train, val_fraction, seed)
    x_tr = raw.x_train[train_idx]
    mean, std = channel_stats(x_tr)  # training split only, after validation is carved out
    return Dataset(
        name=name,
        class_names=tuple(raw.class_names),
        x_train=x_tr,
        y_train=raw.y_train[train_idx].astype(np.int32),
        x_val=raw.x_train[val_idx],
        y_val=raw.y_train[val_idx].astype(np.int32),
        x_test=raw.x_test,
        y_test=raw.y_test.astype(np.int32),
        mean=mean,
        std=std,
        source=raw.source,
        synthetic=is_synthetic,
        notes=dict(raw.notes),
    )


def _subset(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of at most `limit` images, in original order (None: everything)."""
    if limit is None or limit >= len(x):
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(x), size=limit, replace=False))
    return x[keep], y[keep]
