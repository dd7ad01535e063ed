"""Train one run: data -> model -> fit with per-epoch checkpoints -> best model -> test report.

Backend-agnostic Keras 3 (no tf.* here; trainer/accelerator.py holds the backend-specific
bits). Reproducible on CPU: `keras.utils.set_random_seed` fixes initialization and the seeds of
the augmentation/dropout generators, data order is a function of (seed, epoch), and resume
restores weights, optimizer state (including the step count that drives the lr schedule) and
the random-generator counters, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from trainer import accelerator
from trainer import config as config_mod
from trainer.checkpoints import RunCheckpointer, read_state, restore_seed_states
from trainer.config import Config, write_json_atomic
from trainer.data import Dataset, load_dataset
from trainer.models import build_model
from trainer.pipeline import ArrayBatches, ShuffledBatches
from trainer.schedules import WarmupSchedule

logger = logging.getLogger(__name__)

# Biases and batch-norm scale/offset get no weight decay (as in the fast CIFAR-10 recipes).
NO_DECAY = ["bias", "gamma", "beta"]


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best_val_accuracy: float
    best_epoch: int
    stopped_early: bool
    metrics: dict[str, Any] | None


def load_run_dataset(config: Config) -> Dataset:
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


def make_optimizer(config: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    o = config.optim
    total = max(1, steps_per_epoch * config.train.epochs)
    schedule = WarmupSchedule(
        peak=o.lr,
        total_steps=total,
        warmup_steps=int(round(o.warmup_fraction * total)),
        kind=o.schedule,
        start_factor=o.start_factor,
        end_factor=o.end_factor,
    )
    wd = o.weight_decay or None
    if o.optimizer == "sgd":
        opt: keras.optimizers.Optimizer = keras.optimizers.SGD(
            learning_rate=schedule, momentum=o.momentum, nesterov=o.nesterov, weight_decay=wd
        )
    else:
        # Keras applies `weight_decay` decoupled (AdamW-style) in every optimizer.
        opt = keras.optimizers.Adam(learning_rate=schedule, weight_decay=wd)
    if wd:
        opt.exclude_from_weight_decay(var_names=NO_DECAY)
    return opt


def make_model(config: Config, dataset: Dataset, steps_per_epoch: int, jit_compile: bool) -> keras.Model:
    m = config.model
    model = build_model(
        m.arch,
        num_classes=dataset.num_classes,
        mean=dataset.mean,
        std=dataset.std,
        augmentation=config.augment,
        width=m.width,
        dropout=m.dropout,
        bn_momentum=config.optim.bn_momentum,
    )
    # Label smoothing needs one-hot targets in Keras' API; the pipeline gives class indices, so
    # smoothing is applied by the sparse loss wrapper below.
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=SmoothedSparseCrossentropy(config.optim.label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


@keras.saving.register_keras_serializable(package="trainer")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy from class indices with label smoothing (Keras' sparse loss has none).

    Averaged over the batch (Keras' convention; the fast recipes sum, see OptimConfig.lr).
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        num_classes = keras.ops.shape(y_pred)[-1]
        y_true = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        one_hot = keras.ops.one_hot(y_true, num_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_config(run_dir: Path, config: Config) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        raise TrainingError(f"cannot resume: {saved_path} is missing; start a new --run-dir")
    saved = _flatten(config_mod.load(saved_path).to_dict())
    given = _flatten(config.to_dict())
    diffs = [f"{k} (run: {saved[k]!r}, now: {given[k]!r})" for k in saved if saved[k] != given.get(k)]
    # How chatty the log is does not change the result.
    diffs = [d for d in diffs if not d.startswith(("train.verbose", "train.tensorboard"))]
    if diffs:
        raise TrainingError(
            f"cannot resume {run_dir}: settings differ from the interrupted run: {'; '.join(diffs)}. "
            "Resume with the same settings (omit --config/--set to reuse config.json) or use a new --run-dir."
        )


def announce_dataset(dataset: Dataset, log: Callable[[str], None]) -> None:
    desc = dataset.describe()
    log(
        f"dataset {desc['name']} from {desc['source'] or '?'}: {desc['num_train']} train / "
        f"{desc['num_val']} val / {desc['num_test']} test images, {dataset.num_classes} classes"
    )
    if dataset.synthetic:
        banner = "!" * 78
        log(banner)
        log("!!! trained on SYNTHETIC data: generated shapes, not photos. The model means nothing")
        log("!!! for real images; this is recorded in dataset.json and metrics.json.")
        log(banner)


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    dataset: Dataset | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    evaluate: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train into `run_dir` (see docs/architecture.md for its layout) and return the outcome.

    resume: continue from checkpoints/state.json when present (a fresh start when absent); the
    settings must equal the interrupted run's. Without resume, an existing run is an error.
    dataset: skip loading (tests pass a prepared one). callbacks: extra Keras callbacks, run
    after the checkpointer. evaluate: write metrics.json and reports/ on the test split.
    """
    config_mod.validate(config)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    state = read_state(ckpt_dir)
    if state is not None and not resume:
        raise TrainingError(
            f"{run_dir} already holds a training run (checkpoints/state.json); pass --resume to "
            "continue it or choose a new --run-dir"
        )
    if state is not None:
        _check_same_config(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(config.train.seed)
    accel = accelerator.setup(config.train.mixed_precision, config.train.jit_compile)
    log(accel.describe())

    if dataset is None:
        dataset = load_run_dataset(config)
    announce_dataset(dataset, log)
    config.save(run_dir / "config.json")
    write_json_atomic(run_dir / "dataset.json", dataset.describe())
    write_json_atomic(run_dir / "environment.json", accel.environment())  # of the latest session

    start_epoch = int(state["epoch"]) if state else 0
    finished = bool(state and state.get("finished"))
    history = list(state.get("history", [])) if state else []
    best, best_epoch = (float(state["best_val_accuracy"]), int(state["best_epoch"])) if state else (-1.0, 0)
    stopped_early = bool(state and state.get("stopped_early"))

    if not finished:
        batch_size = config.train.batch_size
        train_batches = ShuffledBatches(
            dataset.x_train, dataset.y_train, batch_size, seed=config.train.seed, initial_epoch=start_epoch
        )
        val_batches = (
            ArrayBatches(dataset.x_val, dataset.y_val, batch_size) if len(dataset.x_val) else None
        )
        steps_per_epoch = train_batches.steps_per_epoch
        with accel.scope:
            # Same construction order as the original run, so layer seeds drawn from the global
            # seed match; then weights, optimizer state and generator counters are restored.
            model = make_model(config, dataset, steps_per_epoch, accel.jit_compile)
            if state:
                model.optimizer.build(model.trainable_variables)
                checkpoint = ckpt_dir / state.get("checkpoint", "last.keras")
                if not checkpoint.is_file():
                    raise TrainingError(
                        f"cannot resume: checkpoint {checkpoint} is missing; use a new --run-dir"
                    )
                model.load_weights(checkpoint)
                restore_seed_states(model, state.get("seed_states", {}))
                log(f"resuming {run_dir} after epoch {start_epoch}/{config.train.epochs} ({checkpoint.name})")

        checkpointer = RunCheckpointer(
            run_dir,
            total_epochs=config.train.epochs,
            state=state,
            patience=config.train.early_stopping_patience,
            log=log,
            verbose=config.train.verbose > 0,
        )
        cbs: list[keras.callbacks.Callback] = [checkpointer]
        if config.train.tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                # Keras' callback needs the tensorboard package for its summary ops.
                log("TensorBoard logs skipped: the tensorboard package is not installed "
                    "(pip install tensorboard, or set train.tensorboard=false to silence this)")
            else:
                cbs.append(
                    keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), write_graph=False)
                )
        cbs.extend(callbacks)
        log(
            f"training {config.model.arch} for epochs {start_epoch + 1}..{config.train.epochs} "
            f"({steps_per_epoch} steps/epoch, batch {batch_size}) into {run_dir}"
        )
        started = time.perf_counter()
        model.fit(
            train_batches,
            validation_data=val_batches,
            epochs=config.train.epochs,
            initial_epoch=start_epoch,
            steps_per_epoch=steps_per_epoch,
            shuffle=False,  # order comes from ShuffledBatches (seed, epoch), never Python's random
            callbacks=cbs,
            verbose=1 if config.train.verbose == 1 else 0,
        )
        log(f"training took {time.perf_counter() - started:.1f}s; best val accuracy "
            f"{checkpointer.best:.4f} at epoch {checkpointer.best_epoch}")
        history, best, best_epoch = checkpointer.history, checkpointer.best, checkpointer.best_epoch
        stopped_early = checkpointer.stopped_early
    else:
        log(f"{run_dir} already finished training ({start_epoch} epochs); nothing to resume")

    metrics = None
    if evaluate and (not finished or not (run_dir / "metrics.json").is_file()):
        from trainer.evaluate import evaluate_run

        metrics = evaluate_run(run_dir, dataset=dataset, log=log)
    return TrainResult(run_dir, history, best, best_epoch, stopped_early, metrics)


def config_with(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `config` with some fields replaced, e.g. config_with(c, train={"epochs": 2})."""
    return config_mod.from_dict(sections, config) if sections else dataclasses.replace(config)
