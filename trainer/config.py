"""Every training knob in one typed place (airbench style: read this file to see the whole recipe).

`Config` nests five sections (data, model, augment, optim, train). Defaults here are the real
CIFAR-10 GPU recipe; `configs/*.yaml` override them per profile, and the CLI overrides those with
`--set section.key=value`. The resolved config is saved as RUN_DIR/config.json, so a run can be
rebuilt and resumed from its directory alone. Unknown keys are an error naming the valid ones:
a typo must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key and the fix."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | imagefolder | synthetic
    data_dir: str | None = None  # an already-downloaded copy / the imagefolder root; None = download
    cache_dir: str | None = None  # where the CIFAR-10 archive is cached; None = loader default
    val_fraction: float = 0.1  # share of the training split held out for validation (0..1)
    num_train: int | None = None  # synthetic only: generated training images (before val split)
    num_test: int | None = None  # synthetic only: generated test images


@dataclass
class ModelConfig:
    arch: str = "bn_cnn"  # registry name: bn_cnn | resnet9 | plain_cnn | nin | mlp
    # Channels of the first conv block (later blocks double it; units for mlp), or auto: the arch's
    # default width for 20,000+ training images, half of it below that (trainer/recipe.py): a small
    # dataset needs less capacity and often trains on a CPU.
    width: int | str = "auto"
    dropout: float = 0.3  # dropout rate after each pooling stage and before the head (0..1)
    # Weight init: he_normal | torch (PyTorch's default, U(+-1/sqrt(fan_in))); null = the arch's
    # default (torch for resnet9, as Page; he_normal for the others).
    init: str | None = None
    head_bias: bool | None = None  # bias on the logits layer; null = the arch's default (resnet9: false)


@dataclass
class AugmentConfig:
    enabled: bool = True  # False turns every augmentation layer off
    translate: int = 4  # pixels: random shift up to +-translate each way (pad-and-crop), reflect fill
    # Random horizontal flip. null = by dataset: on for cifar10 and synthetic (a mirrored photo is
    # the same class), off for your own class folders, where mirroring can change the class (digits,
    # text, documents, many medical images): turn it on there with --set augment.flip=true.
    flip: bool | None = None
    rotation: float = 0.0  # degrees: random rotation up to +-rotation; 0 = off
    brightness: float = 0.0  # fraction of the 0..255 range: random shift up to +-brightness; 0 = off
    cutout: int = 0  # pixels: side of one random square zeroed per image (airbench uses 12); 0 = off


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd (momentum, Nesterov by default) | adam | rmsprop
    # Peak learning rate. Keras averages the loss over the batch where the fast PyTorch recipes
    # (Page, airbench) sum it, so their gradients are batch_size times larger: a summed-loss lr
    # of L equals L * batch_size here (Page's ResNet-9 uses 0.4 / 512 summed -> 0.4 here).
    lr: float = 0.1
    # The batch size `lr` was tuned for, when a profile wants the lr to follow a different batch:
    # the run then scales the peak lr linearly (lr * batch / lr_batch_size; Goyal et al. 2017).
    # null (the default) = lr as given at any batch. An exploratory run (one seed, this 2-core CPU,
    # scikit-learn's 1,293 digit scans, bn_cnn width 16, batch 32, 10 epochs): lr 0.1 unscaled
    # reached 98.3% test accuracy, scaled from 256 linearly (0.0125) 80.6%, by sqrt (0.035) 94.2%.
    # With few steps a small batch wants the lr a large one uses, so the default does not scale.
    lr_batch_size: int | None = None
    momentum: float = 0.9  # SGD momentum (ignored by adam, which uses beta_1=0.9)
    nesterov: bool = True
    # Weight decay; biases and batch-norm scale/offset are excluded. How it acts is
    # `weight_decay_style`: decoupled = Keras' (w -= lr * wd * w, outside the momentum); coupled =
    # PyTorch SGD's (wd * w added to the mean-loss gradient before momentum, which momentum then
    # amplifies by about 1/(1 - momentum): 5e-4 coupled is ~10x stronger than 5e-4 decoupled).
    # Page's and airbench's figures are coupled (trainer/optimizers.py has the exact conversion).
    weight_decay: float = 5e-4
    weight_decay_style: str = "decoupled"  # decoupled | coupled (sgd only)
    # true: weight decay on every trainable variable, biases and batch-norm offsets included
    # (airbench94; Page's ResNet-9 too). false: those are excluded (trainer/optimizers.py NO_DECAY).
    decay_norm_and_bias: bool = False
    # Multiplier of the lr of batch-norm offsets (beta), their coupled weight decay divided by it so
    # the per-step decay lr * wd is unchanged: airbench94's bias_scaler (64). Coupled sgd only.
    bias_lr_scale: float = 1.0
    # airbench: epochs the whitening conv's bias trains before it is frozen (3); 0 = never frozen.
    # Coupled sgd only; only architectures with a whitening layer (airbench) have that bias.
    whiten_bias_epochs: int = 0
    schedule: str = "onecycle"  # onecycle (linear up, linear down) | cosine | constant
    warmup_fraction: float = 0.2  # share of all steps spent ramping up to the peak lr
    start_factor: float = 0.1  # lr at step 0 = lr * start_factor (onecycle and cosine warm-up)
    end_factor: float = 0.0  # lr at the last step = lr * end_factor
    label_smoothing: float = 0.1  # cross-entropy label smoothing (0 = plain one-hot)
    # Batch-norm momentum in Keras' convention: moving = m * moving + (1 - m) * batch.
    # PyTorch's `momentum` is 1 minus this (PyTorch 0.1 == Keras 0.9).
    bn_momentum: float = 0.9


@dataclass
class TrainConfig:
    epochs: int = 30
    # Images per step (summed over all GPUs), or auto: the largest power of two up to
    # AUTO_MAX_BATCH that still gives AUTO_MIN_STEPS optimizer steps per epoch (never below
    # AUTO_MIN_BATCH), so a small dataset gets enough steps to learn in a few epochs.
    batch_size: int | str = "auto"
    seed: int = 0  # fixes data order, augmentation and initialization (on CPU: bit-for-bit)
    early_stopping_patience: int = 0  # epochs without val-accuracy gain before stopping; 0 = off
    mixed_precision: str = "auto"  # auto (on when a GPU is present) | on | off
    jit_compile: str = "auto"  # auto (XLA when a GPU is present) | on | off
    # Devices and processes (trainer/distribute.py): auto = every device of this process (JAX
    # DataParallel, TensorFlow MirroredStrategy on 2+ GPUs) and, when TRAIN_NUM_PROCESSES > 1, all
    # processes together; batch_size stays the global batch. off = one device.
    distribution: str = "auto"  # auto | off
    # Training set held on the accelerator as uint8, shuffled per epoch in one compiled call and
    # fed to fit without host copies (trainer/device_data.py). auto = on when a GPU is present.
    # Same batches in the same order as off: only where the data lives changes.
    data_on_device: str = "auto"  # auto | on | off
    # Exponential moving average of the weights (Keras' optimizer `use_ema`), per step: the
    # validation score, best model and export use the averaged weights. 0 = off; 0.99-0.999 is
    # typical (closer to 1 = longer memory: wants thousands of steps).
    ema_momentum: float = 0.0
    # airbench94's lookahead (trainer/models/airbench.py Lookahead; NOT Keras' EMA): from epoch
    # lookahead_start_epoch (0-based) every lookahead_every_steps steps, average = rho * average +
    # (1 - rho) * weights, the model set to the average, with rho = lookahead_decay **
    # lookahead_every_steps * (step / total_steps) ** lookahead_decay_pow. 0 = off; airbench 0.95.
    lookahead_decay: float = 0.0
    lookahead_every_steps: int = 5  # optimizer steps between lookahead updates
    lookahead_start_epoch: int = 3  # 0-based epoch of the first update
    lookahead_decay_pow: float = 3.0  # rho grows as (fraction of training done) ** this
    tensorboard: bool = True  # write RUN_DIR/tensorboard/
    verbose: int = 2  # Keras fit verbosity: 2 = one line per epoch, 1 = progress bar, 0 = silent


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON atomically (temp file + rename)."""
        write_json_atomic(Path(path), self.to_dict())


_SECTION_TYPES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON to `path` via a temp file in the same directory and os.replace: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are read by other users (serving)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert `value` to the field's type; strings (from --set) are parsed as YAML scalars."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "~"):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        error: ConfigError | None = None
        for candidate in inner:  # int | str (batch_size: 64 or auto): the first type that fits
            try:
                return _coerce(value, candidate, key)
            except ConfigError as exc:
                error = error or exc
        assert error is not None
        raise error
    if isinstance(value, str) and annotation is not str:
        value = yaml.safe_load(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def _apply_section(section: Any, values: dict[str, Any], section_name: str) -> None:
    types_by_name = _field_types(type(section))
    for key, value in values.items():
        if key not in types_by_name:
            raise ConfigError(
                f"unknown config key '{section_name}.{key}'; valid keys in '{section_name}': "
                f"{', '.join(sorted(types_by_name))}"
            )
        setattr(section, key, _coerce(value, types_by_name[key], f"{section_name}.{key}"))


def from_dict(payload: dict[str, Any], base: Config | None = None) -> Config:
    """A Config from nested dicts (a YAML/JSON document), on top of `base` (defaults if None)."""
    config = dataclasses.replace(base) if base is not None else Config()
    # replace() is shallow: copy every section so `base` is never mutated.
    for name in _SECTION_TYPES:
        setattr(config, name, dataclasses.replace(getattr(config, name)))
    if not isinstance(payload, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(payload).__name__}")
    for name, values in payload.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(
                f"unknown config section '{name}'; valid sections: {', '.join(_SECTION_TYPES)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping of key: value, got {values!r}")
        _apply_section(getattr(config, name), values, name)
    validate(config)
    return config


def load(path: str | os.PathLike[str], base: Config | None = None) -> Config:
    """Read a YAML or JSON config file (JSON is valid YAML) on top of `base`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}; pass an existing YAML/JSON file to --config")
    try:
        payload = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML/JSON: {exc}") from exc
    try:
        return from_dict(payload, base)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings (the CLI's --set); values are parsed as YAML scalars."""
    payload: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=5)")
        dotted, value = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(
                f"override key {dotted!r} must be section.key, sections: {', '.join(_SECTION_TYPES)}"
            )
        section, key = dotted.strip().split(".", 1)
        payload.setdefault(section, {})[key.strip()] = value.strip()
    return from_dict(payload, config)


def validate(config: Config) -> None:
    """Reject values that would fail later, deep inside Keras, with a message naming the fix."""
    checks = [
        (config.data.dataset in ("cifar10", "imagefolder", "synthetic"),
         f"data.dataset must be cifar10, imagefolder or synthetic, got {config.data.dataset!r}"),
        (0.0 <= config.data.val_fraction < 1.0,
         f"data.val_fraction must be in [0, 1), got {config.data.val_fraction}"),
        (config.model.width == "auto" or (isinstance(config.model.width, int) and config.model.width >= 1),
         f"model.width must be auto or an integer >= 1, got {config.model.width!r}"),
        (0.0 <= config.model.dropout < 1.0, f"model.dropout must be in [0, 1), got {config.model.dropout}"),
        (config.model.init in (None, "he_normal", "torch"),
         f"model.init must be he_normal, torch or null (the arch's default), got {config.model.init!r}"),
        (config.augment.translate >= 0,
         f"augment.translate must be >= 0 pixels, got {config.augment.translate}"),
        (config.augment.cutout >= 0, f"augment.cutout must be >= 0 pixels, got {config.augment.cutout}"),
        (config.optim.optimizer in ("sgd", "adam", "rmsprop"),
         f"optim.optimizer must be sgd, adam or rmsprop, got {config.optim.optimizer!r}"),
        (config.optim.weight_decay_style in ("decoupled", "coupled"),
         f"optim.weight_decay_style must be decoupled or coupled, got {config.optim.weight_decay_style!r}"),
        (config.optim.weight_decay_style == "decoupled" or config.optim.optimizer == "sgd",
         f"optim.weight_decay_style=coupled is PyTorch SGD's and needs optim.optimizer=sgd, "
         f"got {config.optim.optimizer!r}; use decoupled with adam or rmsprop"),
        (config.optim.lr_batch_size is None or config.optim.lr_batch_size >= 1,
         f"optim.lr_batch_size must be >= 1 or null, got {config.optim.lr_batch_size}"),
        (config.optim.bias_lr_scale > 0,
         f"optim.bias_lr_scale must be > 0, got {config.optim.bias_lr_scale}"),
        (config.optim.whiten_bias_epochs >= 0,
         f"optim.whiten_bias_epochs must be >= 0 (0 = never frozen), got {config.optim.whiten_bias_epochs}"),
        ((config.optim.bias_lr_scale == 1.0 and config.optim.whiten_bias_epochs == 0)
         or (config.optim.optimizer == "sgd" and config.optim.weight_decay_style == "coupled"),
         "optim.bias_lr_scale and optim.whiten_bias_epochs are airbench's parameter groups, implemented "
         "for optimizer sgd with weight_decay_style coupled; set those, or bias_lr_scale=1.0 and "
         "whiten_bias_epochs=0"),
        (0.0 <= config.train.lookahead_decay < 1.0,
         f"train.lookahead_decay must be in [0, 1) (0 = off), got {config.train.lookahead_decay}"),
        (config.train.lookahead_every_steps >= 1,
         f"train.lookahead_every_steps must be >= 1, got {config.train.lookahead_every_steps}"),
        (config.train.lookahead_start_epoch >= 0,
         f"train.lookahead_start_epoch must be >= 0, got {config.train.lookahead_start_epoch}"),
        (not (config.train.lookahead_decay and config.train.ema_momentum),
         "train.lookahead_decay and train.ema_momentum are two weight averages: turn one off"),
        (0.0 <= config.train.ema_momentum < 1.0,
         f"train.ema_momentum must be in [0, 1) (0 = off), got {config.train.ema_momentum}"),
        (config.optim.schedule in ("onecycle", "cosine", "constant"),
         f"optim.schedule must be onecycle, cosine or constant, got {config.optim.schedule!r}"),
        (config.optim.lr > 0, f"optim.lr must be > 0, got {config.optim.lr}"),
        (0.0 <= config.optim.warmup_fraction < 1.0,
         f"optim.warmup_fraction must be in [0, 1), got {config.optim.warmup_fraction}"),
        (0.0 <= config.optim.label_smoothing < 1.0,
         f"optim.label_smoothing must be in [0, 1), got {config.optim.label_smoothing}"),
        (config.train.epochs >= 1, f"train.epochs must be >= 1, got {config.train.epochs}"),
        (config.train.batch_size == "auto"
         or (isinstance(config.train.batch_size, int) and config.train.batch_size >= 1),
         f"train.batch_size must be auto or an integer >= 1, got {config.train.batch_size!r}"),
        (config.train.mixed_precision in ("auto", "on", "off"),
         f"train.mixed_precision must be auto, on or off, got {config.train.mixed_precision!r}"),
        (config.train.distribution in ("auto", "off"),
         f"train.distribution must be auto or off, got {config.train.distribution!r}"),
        (config.train.jit_compile in ("auto", "on", "off"),
         f"train.jit_compile must be auto, on or off, got {config.train.jit_compile!r}"),
        (config.train.data_on_device in ("auto", "on", "off"),
         f"train.data_on_device must be auto, on or off, got {config.train.data_on_device!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
