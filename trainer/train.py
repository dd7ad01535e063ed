"""Train one run: data -> model -> fit with per-epoch checkpoints -> best model -> test report.

Backend-agnostic Keras 3 (no tf.* here; trainer/accelerator.py holds the backend-specific
bits). Reproducible on CPU: `keras.utils.set_random_seed` fixes initialization and the seeds of
the augmentation/dropout generators, data order is a function of (seed, epoch), and resume
restores weights, optimizer state (including the step count that drives the lr schedule) and
the random-generator counters, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from trainer import accelerator, device_data, distribute, run_files
from trainer import config as config_mod
from trainer.checkpoints import RunCheckpointer, read_state, restore_seed_states
from trainer.config import Config, write_json_atomic
from trainer.data import Dataset
from trainer.evaluate import evaluate_run
from trainer.models import available_architectures, build_model, xla_error
from trainer.models.airbench import lookahead_callbacks
from trainer.optimizers import build_optimizer
from trainer.pipeline import ArrayBatches, ShuffledBatches
from trainer.recipe import Recipe, resolve


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


def make_optimizer(config: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The configured optimizer over the whole run's steps, with weight EMA when asked."""
    optimizer = build_optimizer(
        config.optim, max(1, steps_per_epoch * config.train.epochs), steps_per_epoch=steps_per_epoch
    )
    if config.train.ema_momentum:
        # Keras keeps the average in the optimizer (saved in checkpoints, so resume keeps it);
        # SwapEMAWeights and the checkpointer put it into the model where it is scored and saved.
        optimizer.use_ema = True
        optimizer.ema_momentum = config.train.ema_momentum
        optimizer.ema_overwrite_frequency = None
    return optimizer


def make_model(config: Config, dataset: Dataset, steps_per_epoch: int, jit_compile: bool) -> keras.Model:
    """Build and compile the configured architecture; with jit_compile, refuse layers XLA cannot
    compile instead of letting Keras silently fall back to op-by-op execution."""
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
        init=m.init,
        head_bias=m.head_bias,
        whitening_images=dataset.x_train,  # airbench's whitening conv is set from them; others ignore
    )
    if jit_compile and (problem := xla_error(model)):
        raise TrainingError(problem)
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
    saved_path = run_dir / run_files.CONFIG_FILE
    if not saved_path.is_file():
        raise TrainingError(f"cannot resume: {saved_path} is missing; start a new --run-dir")
    saved = _flatten(run_files.read_config(run_dir).to_dict())
    given = _flatten(config.to_dict())
    diffs = [f"{k} (run: {saved[k]!r}, now: {given[k]!r})" for k in saved if saved[k] != given.get(k)]
    # How chatty the log is does not change the result, nor where the pixels live: the device path
    # gives the host path's batches (tests/trainer/test_device_data.py), so a run may resume on
    # another machine.
    unchanged_result = ("train.verbose", "train.tensorboard", "train.data_on_device")
    diffs = [d for d in diffs if not d.startswith(unchanged_result)]
    if diffs:
        raise TrainingError(
            f"cannot resume {run_dir}: settings differ from the interrupted run: {'; '.join(diffs)}. "
            "Resume with the same settings (omit --config/--set to reuse config.json) or use a new --run-dir."
        )


def _resumable_state(run_dir: Path, config: Config, resume: bool) -> dict[str, Any] | None:
    """The interrupted run's checkpoint state (None for a fresh start); refuses a run that exists
    without `resume` and one whose settings differ."""
    state = read_state(run_dir / run_files.CHECKPOINTS_DIR)
    if state is not None and not resume:
        raise TrainingError(
            f"{run_dir} already holds a training run (checkpoints/state.json); pass --resume to "
            "continue it or choose a new --run-dir"
        )
    if state is not None:
        _check_same_config(run_dir, config)
    return state


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


def _restore_checkpoint(
    model: keras.Model, run_dir: Path, state: dict[str, Any], total_epochs: int, log: Callable[[str], None]
) -> None:
    """Weights, optimizer state and random-generator counters of the interrupted run."""
    model.optimizer.build(model.trainable_variables)
    checkpoint = run_dir / run_files.CHECKPOINTS_DIR / state.get("checkpoint", "last.keras")
    if not checkpoint.is_file():
        raise TrainingError(f"cannot resume: checkpoint {checkpoint} is missing; use a new --run-dir")
    model.load_weights(checkpoint)
    restore_seed_states(model, state.get("seed_states", {}))
    log(f"resuming {run_dir} after epoch {int(state['epoch'])}/{total_epochs} ({checkpoint.name})")


def _tensorboard_callbacks(
    config: Config, run_dir: Path, log: Callable[[str], None]
) -> list[keras.callbacks.Callback]:
    if not config.train.tensorboard:
        return []
    if importlib.util.find_spec("tensorboard") is None:
        # Keras' callback needs the tensorboard package for its summary ops.
        log("TensorBoard logs skipped: the tensorboard package is not installed "
            "(pip install tensorboard, or set train.tensorboard=false to silence this)")
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(run_dir / run_files.TENSORBOARD_DIR), write_graph=False)]


def _fit(
    config: Config,
    run_dir: Path,
    dataset: Dataset,
    accel: accelerator.Accelerator,
    state: dict[str, Any] | None,
    callbacks: Sequence[keras.callbacks.Callback],
    log: Callable[[str], None],
    dist: distribute.Distribution | None = None,
) -> RunCheckpointer:
    """Train the epochs after the state's (all of them for a fresh start); the checkpointer holds
    the history and the best epoch."""
    start_epoch = int(state["epoch"]) if state else 0
    batch_size = config.train.batch_size
    dist = dist or distribute.Distribution(distribute.SINGLE)
    # The same batches in the same order either way; on the device: uint8 in accelerator memory.
    on_device = device_data.use_device_data(
        config.train.data_on_device, accel.gpus, dist.cluster.num_processes
    )
    train_batches = (device_data.DeviceBatches if on_device else ShuffledBatches)(
        dataset.x_train, dataset.y_train, batch_size, seed=config.train.seed, initial_epoch=start_epoch
    )
    val_batches = ArrayBatches(dataset.x_val, dataset.y_val, batch_size) if len(dataset.x_val) else None
    steps_per_epoch = train_batches.steps_per_epoch
    dist.check_batch_size(train_batches.batch_size)  # the global batch: split evenly over the devices
    with dist.scope():
        # Same construction order as the original run, so layer seeds drawn from the global
        # seed match; then weights, optimizer state and generator counters are restored.
        model = make_model(config, dataset, steps_per_epoch, accel.jit_compile)
        dist.prepare_model(model)
        if state:
            _restore_checkpoint(model, run_dir, state, config.train.epochs, log)
    _record_compiled_environment(run_dir, accel, model, dist)

    checkpointer = RunCheckpointer(
        run_dir,
        total_epochs=config.train.epochs,
        state=state,
        patience=config.train.early_stopping_patience,
        log=log,
        verbose=config.train.verbose > 0,
    )
    # With EMA, validation scores the averaged weights (SwapEMAWeights swaps them in around each
    # evaluation); the checkpointer saves them as the best model.
    ema = [keras.callbacks.SwapEMAWeights()] if config.train.ema_momentum else []
    # airbench's lookahead writes the averaged weights into the model: before the checkpointer.
    lookahead = lookahead_callbacks(config.train, steps_per_epoch)
    cbs = [*ema, *lookahead, checkpointer, *_tensorboard_callbacks(config, run_dir, log), *callbacks]
    log(
        f"training {config.model.arch} for epochs {start_epoch + 1}..{config.train.epochs} "
        f"({steps_per_epoch} steps/epoch, batch {batch_size}) into {run_dir}"
    )
    if on_device:  # one process: the stream is already laid out over its devices (device_data.py)
        spe = train_batches.configure(model, align=[c.every_steps for c in lookahead])
        log(device_data.describe(train_batches, spe))
    started = time.perf_counter()
    model.fit(
        # this process's share of each global batch
        train_batches.for_fit() if on_device else dist.training_input(train_batches),
        validation_data=dist.training_input(val_batches) if val_batches is not None else None,
        epochs=config.train.epochs,
        initial_epoch=start_epoch,
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # order comes from ShuffledBatches (seed, epoch), never Python's random
        callbacks=cbs,
        verbose=1 if config.train.verbose == 1 else 0,
    )
    log(f"training took {time.perf_counter() - started:.1f}s; best val accuracy "
        f"{checkpointer.best:.4f} at epoch {checkpointer.best_epoch}")
    return checkpointer


def _record_compiled_environment(run_dir: Path, accel: accelerator.Accelerator, model: keras.Model,
                                 dist: distribute.Distribution) -> None:
    """environment.json with what the compiled model really uses: Keras turns XLA off with only a
    warning when a layer cannot compile, so the setting alone is not the truth."""
    environment = accel.environment()
    environment["distribution"] = dist.environment()
    environment["jit_compile_requested"] = accel.jit_compile
    environment["jit_compile"] = bool(getattr(model, "jit_compile", False))
    write_json_atomic(run_dir / run_files.ENVIRONMENT_FILE, environment)


def announce_recipe(recipe: Recipe, log: Callable[[str], None]) -> None:
    for line in recipe.reasons:
        log(f"recipe: {line}")
    for line in recipe.warnings:
        log(f"WARNING: {line}")


def _result_of_finished_run(run_dir: Path, state: dict[str, Any]) -> TrainResult:
    return TrainResult(
        run_dir,
        history=list(state.get("history", [])),
        best_val_accuracy=float(state["best_val_accuracy"]),
        best_epoch=int(state["best_epoch"]),
        stopped_early=bool(state.get("stopped_early")),
        metrics=None,
    )


def _result_of_fit(run_dir: Path, checkpointer: RunCheckpointer) -> TrainResult:
    return TrainResult(
        run_dir,
        history=checkpointer.history,
        best_val_accuracy=checkpointer.best,
        best_epoch=checkpointer.best_epoch,
        stopped_early=checkpointer.stopped_early,
        metrics=None,
    )


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
    if config.model.arch not in available_architectures():
        raise TrainingError(
            f"unknown model.arch {config.model.arch!r}; choose one of: {', '.join(available_architectures())}"
        )
    run_dir = requested_dir = Path(run_dir)
    state = _resumable_state(run_dir, config, resume)
    # First, before any backend computation: joins the other processes when the environment names
    # them (trainer/distribute.py). Only the chief writes RUN_DIR; the others write a scratch copy.
    dist = distribute.setup(config.train.distribution)
    run_dir = dist.output_dir(run_dir, state)
    run_dir.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(config.train.seed)
    accel = accelerator.setup(config.train.mixed_precision, config.train.jit_compile)
    log(accel.describe())
    log(dist.describe())
    if dataset is None:
        dataset = run_files.load_run_dataset(config)
    announce_dataset(dataset, log)
    recipe = resolve(config, len(dataset.x_train))
    announce_recipe(recipe, log)
    finished = bool(state and state.get("finished"))
    if not finished:  # a finished run's files describe the session that trained it: keep them
        run_files.describe_run(run_dir, config, dataset, accel.environment())
        write_json_atomic(run_dir / run_files.RECIPE_FILE, recipe.to_dict())
    if state is not None and finished:
        log(f"{run_dir} already finished training ({int(state['epoch'])} epochs); nothing to resume")
        result = _result_of_finished_run(run_dir, state)
    else:
        resolved = recipe.apply(config)
        checkpointer = _fit(resolved, run_dir, dataset, accel, state, callbacks, log, dist=dist)
        result = _result_of_fit(run_dir, checkpointer)

    dist.close()  # the test-split report runs on the chief alone, without a distribution
    result.run_dir = requested_dir
    if evaluate and dist.is_chief and (not finished or not (run_dir / run_files.METRICS_FILE).is_file()):
        result.metrics = evaluate_run(run_dir, dataset=dataset, log=log)
    return result
