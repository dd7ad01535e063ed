"""What a run actually uses, and why: the batch size, learning rate and flip resolved for its data.

`config.py` holds what was asked (`train.batch_size: auto`, `augment.flip: null`, a peak lr for
`optim.lr_batch_size` images per step); this module turns that into numbers for one dataset and
says why in plain words, so the start of every run prints its recipe and a run with too few
optimizer steps to learn says so before it spends the time. The resolved recipe is written to
RUN_DIR/recipe.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainer.config import Config, ConfigError
from trainer.models import REGISTRY

# Auto batch size: the largest power of two <= AUTO_MAX_BATCH with >= AUTO_MIN_STEPS steps per
# epoch, and never below AUTO_MIN_BATCH (batch-norm statistics get noisy under ~16 images).
AUTO_MAX_BATCH = 256  # images; what the GPU recipes use on full CIFAR-10 (175 steps/epoch)
AUTO_MIN_STEPS = 32  # optimizer steps per epoch; 1,300 images -> batch 32 -> 40 steps
AUTO_MIN_BATCH = 16  # images
# Fewer optimizer steps than this in the whole run rarely learns anything useful: warn.
MIN_TOTAL_STEPS = 200

# Auto width: (fewer training images than this, fraction of the arch's default width).
# Exploratory (one seed, 1,293 real digit scans, batch 32, 10 epochs): bn_cnn width 16 98.3%, 32 99.4%;
# the 5-seed figure for the default is in docs/benchmarks.md (benchmarks/small_data.py).
AUTO_WIDTH_STEPS = ((20_000, 2),)  # < 20,000 images: half the default width; else the default
MIN_AUTO_WIDTH = 8

# Datasets whose classes survive a left-right mirror; class folders are unknown data, so flip stays
# off there unless the user turns it on (a mirrored "2" or "R" is not a "2" or an "R").
FLIP_SAFE_DATASETS = ("cifar10", "synthetic")


@dataclass(frozen=True)
class Recipe:
    batch_size: int  # images per step
    width: int  # channels of the first block (units for mlp)
    lr: float  # peak learning rate after scaling to batch_size
    flip: bool
    steps_per_epoch: int
    total_steps: int
    reasons: list[str] = field(default_factory=list)  # one line each: what was chosen and why
    warnings: list[str] = field(default_factory=list)  # what is likely to go wrong, and the fix

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def apply(self, config: Config) -> Config:
        """A copy of `config` with the resolved numbers in place of auto/null (what fit uses)."""
        resolved = dataclasses.replace(
            config,
            train=dataclasses.replace(config.train, batch_size=self.batch_size),
            model=dataclasses.replace(config.model, width=self.width),
            optim=dataclasses.replace(config.optim, lr=self.lr, lr_batch_size=None),
            augment=dataclasses.replace(config.augment, flip=self.flip),
        )
        return resolved


def auto_batch_size(num_train: int) -> int:
    """The largest power of two <= AUTO_MAX_BATCH giving >= AUTO_MIN_STEPS steps per epoch."""
    batch = AUTO_MAX_BATCH
    while batch > AUTO_MIN_BATCH and num_train // batch < AUTO_MIN_STEPS:
        batch //= 2
    return batch


def _batch_size(config: Config, num_train: int) -> tuple[int, str]:
    asked = config.train.batch_size
    if asked == "auto":
        batch = min(auto_batch_size(num_train), num_train)
        return batch, (
            f"batch {batch} (auto: {num_train} training images -> {num_train // batch} steps/epoch; "
            f"auto keeps >= {AUTO_MIN_STEPS} steps/epoch, batch {AUTO_MIN_BATCH}..{AUTO_MAX_BATCH})"
        )
    batch = int(asked)
    if batch > num_train:
        raise ConfigError(
            f"train.batch_size={batch} is larger than the training split ({num_train} images): no full "
            f"batch to train on. Use --set train.batch_size=auto or a batch of at most {num_train}."
        )
    return batch, f"batch {batch} (set in the config)"


def auto_width(arch: str, num_train: int) -> int:
    """The arch's default width, divided for small training sets (AUTO_WIDTH_STEPS)."""
    default = REGISTRY[arch].width
    for limit, divisor in AUTO_WIDTH_STEPS:
        if num_train < limit:
            return max(MIN_AUTO_WIDTH, default // divisor)
    return default


def _width(config: Config, num_train: int) -> tuple[int, str]:
    arch = config.model.arch
    if config.model.width != "auto":
        return int(config.model.width), f"{arch} width {config.model.width} (set in the config)"
    width = auto_width(arch, num_train)
    return width, (
        f"{arch} width {width} (auto: {num_train} training images; the full width "
        f"{REGISTRY[arch].width} from 20,000 images, half below)"
    )


def _lr(config: Config, batch: int) -> tuple[float, str]:
    o = config.optim
    if not o.lr_batch_size or o.lr_batch_size == batch:
        return o.lr, f"peak lr {o.lr:g}"
    lr = o.lr * batch / o.lr_batch_size
    return lr, f"peak lr {lr:.4g} (= {o.lr:g} x {batch}/{o.lr_batch_size}: linear scaling to the batch)"


def _flip(config: Config) -> tuple[bool, str]:
    asked = config.augment.flip
    if not config.augment.enabled:
        return False, "augmentation off"
    if asked is not None:
        return bool(asked), f"flip {'on' if asked else 'off'} (set in the config)"
    dataset = config.data.dataset
    if dataset in FLIP_SAFE_DATASETS:
        return True, f"flip on ({dataset}: a mirrored image keeps its class)"
    return False, (
        f"flip off ({dataset}: mirroring can change the class of digits, text or documents; "
        "--set augment.flip=true if your classes survive a mirror)"
    )


def resolve(config: Config, num_train: int) -> Recipe:
    """The recipe for `num_train` training images (after the validation split)."""
    if num_train < 1:
        raise ConfigError("the training split is empty: add images or lower data.val_fraction")
    if config.model.arch not in REGISTRY:
        choices = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown model.arch {config.model.arch!r}; choose one of: {choices}")
    width, width_why = _width(config, num_train)
    batch, batch_why = _batch_size(config, num_train)
    lr, lr_why = _lr(config, batch)
    flip, flip_why = _flip(config)
    steps = num_train // batch
    total = steps * config.train.epochs
    warnings = []
    if total < MIN_TOTAL_STEPS:
        warnings.append(
            f"only {total} optimizer steps in the whole run ({steps}/epoch x {config.train.epochs} epochs): "
            f"too few to learn well. Raise --epochs or use a smaller train.batch_size "
            f"(auto picks one for your data)."
        )
    return Recipe(
        batch_size=batch,
        width=width,
        lr=lr,
        flip=flip,
        steps_per_epoch=steps,
        total_steps=total,
        reasons=[width_why, batch_why, lr_why, flip_why, f"{total} optimizer steps ({steps}/epoch)"],
        warnings=warnings,
    )
