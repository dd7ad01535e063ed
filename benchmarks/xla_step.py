"""XLA on vs off: one profile's training step compiled with jit_compile=True and with False.

Both models are built and compiled by the trainer's own `make_model` from the profile's config
(architecture, width, augmentation, optimizer recipe, loss), with the same seed, so the only
difference is `jit_compile`. Their steps alternate on the same batches (the order flips every step),
so load from other processes on a shared machine slows both alike; medians of the steady-state
steps are compared. Keras does not fail when a model cannot be XLA-compiled: it warns and sets
`model.jit_compile = False`. So the value the compiled model reports is recorded, not the request.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from benchmarks.machine import load_average
from trainer import config as config_lib
from trainer.data import load_dataset
from trainer.pipeline import ShuffledBatches
from trainer.recipe import resolve
from trainer.train import TrainingError, make_model

DEFAULT_PROFILE = Path("configs/default.yaml")
CIFAR10_TRAIN_IMAGES = 50_000  # the profiles' data; what their `auto` settings resolve against
POOL_BATCHES = 4  # synthetic batches generated; the stream reshuffles them every epoch


def profile_config(profile: Path, batch_size: int | None = None) -> config_lib.Config:
    """The profile's config with its recipe resolved for its training set, as `trainer train` runs it
    (batch_size: a smaller batch for a quick check; the lr then scales as the recipe says)."""
    config = config_lib.load(profile)
    if batch_size:
        config = config_lib.apply_overrides(config, [f"train.batch_size={batch_size}"])
    num_train = config.data.num_train or CIFAR10_TRAIN_IMAGES
    return resolve(config, int(num_train * (1.0 - config.data.val_fraction))).apply(config)


def _timed_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    start = time.perf_counter()
    model.train_on_batch(x, y)
    return time.perf_counter() - start


def _summary(times: list[float], warmup: int, batch_size: int) -> dict[str, float]:
    steady = float(np.median(times[warmup:]))
    return {
        "images_per_s": round(batch_size / steady, 1),
        "ms_per_step": round(steady * 1000, 1),
        # The first step traces and compiles (with XLA: the whole step into one program).
        "first_step_s": round(times[0], 2),
    }


def measure_xla(
    profile: Path = DEFAULT_PROFILE, steps: int = 12, batch_size: int | None = None, warmup: int = 3
) -> dict[str, Any]:
    """Images/s of the profile's training step with XLA on and off, measured interleaved."""
    config = profile_config(profile, batch_size)
    batch = int(config.train.batch_size)
    dataset = load_dataset("synthetic", val_fraction=0.0, num_train=batch * POOL_BATCHES, num_test=10, seed=0)
    stream = ShuffledBatches(dataset.x_train, dataset.y_train, batch, seed=config.train.seed)
    steps_per_epoch = stream.steps_per_epoch

    models: dict[str, keras.Model] = {}
    result: dict[str, Any] = {
        "profile": str(profile),
        "profile_jit_compile": config.train.jit_compile,
        "arch": config.model.arch,
        "width": config.model.width,
        "augment": {"translate": config.augment.translate, "flip": config.augment.flip,
                    "cutout": config.augment.cutout, "rotation": config.augment.rotation,
                    "brightness": config.augment.brightness},
        "batch_size": batch,
        "seed": config.train.seed,
        "steps": steps,
        "warmup": warmup,
        "data": f"synthetic shapes ({len(dataset.x_train)} images, seed 0), reshuffled every epoch",
        "load_average_1m_start": load_average(),
        "xla_error": None,
    }  # fmt: skip
    for name, jit in (("off", False), ("on", True)):
        keras.utils.set_random_seed(config.train.seed)  # same initial weights for both
        try:
            models[name] = make_model(config, dataset, steps_per_epoch, jit_compile=jit)
        except TrainingError as exc:  # a layer XLA cannot compile: the trainer refuses, say why
            result["xla_error"] = str(exc)
    result["params"] = int(models["off"].count_params())

    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for step in range(warmup + steps):
        x, y = stream[step]
        for name in order:
            times[name].append(_timed_step(models[name], x, y))
        order.reverse()  # neither model always runs first (caches, turbo, load spikes)

    for name, model in models.items():
        result[name] = {
            "jit_compile_requested": name == "on",
            # What Keras actually compiled the train step with.
            "jit_compile": bool(model.jit_compile),
            **_summary(times[name], warmup, batch),
        }
    result["xla_kept"] = bool("on" in models and models["on"].jit_compile)
    if "on" in result:
        result["speedup"] = round(result["on"]["images_per_s"] / result["off"]["images_per_s"], 3)
    result["load_average_1m_end"] = load_average()
    return result
