"""Per-epoch checkpoints, the best model, history.csv and early stopping, all crash-safe.

Write order per epoch, each step atomic (temp file + os.replace):
  1. checkpoints/epoch-NNNN.keras      the model after epoch N (weights + optimizer state)
  2. checkpoints/best.keras, model.keras when validation accuracy improved
  3. history.csv
  4. checkpoints/state.json            the commit point: epoch N, its checkpoint, best so far,
                                       random-generator states, history
  5. checkpoints/last.keras            a hard link to epoch-NNNN.keras; older epoch files go
A process killed anywhere leaves state.json naming a complete checkpoint, so `--resume` starts
from a consistent epoch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from trainer import run_files
from trainer.config import write_json_atomic

STATE_FILE = "state.json"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def read_state(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); delete the run directory or start a new --run-dir"
        ) from exc


def seed_states(model: keras.Model) -> dict[str, list[int]]:
    """Counters of every random generator in the model (augmentation, dropout).

    Keras does not save SeedGenerator state in .keras files; without restoring it a resumed run
    would draw different augmentations than an uninterrupted one. (`_flatten_layers` and
    `_seed_generators` are Keras internals; there is no public accessor.)
    """
    out: dict[str, list[int]] = {}
    for layer in model._flatten_layers():
        for i, gen in enumerate(getattr(layer, "_seed_generators", [])):
            out[f"{layer.name}/{i}"] = [int(v) for v in keras.ops.convert_to_numpy(gen.state)]
    return out


def restore_seed_states(model: keras.Model, states: dict[str, list[int]]) -> None:
    for layer in model._flatten_layers():
        for i, gen in enumerate(getattr(layer, "_seed_generators", [])):
            key = f"{layer.name}/{i}"
            if key in states:
                gen.state.assign(np.asarray(states[key], dtype=gen.state.dtype))


def _uses_ema(model: keras.Model) -> bool:
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # under a LossScaleOptimizer
    return bool(getattr(optimizer, "use_ema", False))


@contextlib.contextmanager
def ema_weights(model: keras.Model) -> Iterator[None]:
    """The optimizer's moving average of the weights in the model for the `with` block (Keras'
    own swap, the one SwapEMAWeights does around evaluation); the raw weights after it."""
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()
    try:
        yield
    finally:
        swap.on_test_end()


def _replace_with_link(src: Path, dst: Path) -> None:
    """dst becomes the same bytes as src, atomically (hard link when possible, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_COLUMNS})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    os.replace(tmp, path)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunCheckpointer(keras.callbacks.Callback):
    """Saves the run after every epoch, keeps the best model, logs one line per epoch with ETA,
    and stops early after `patience` epochs without validation-accuracy gain (0 = never)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_epochs: int,
        state: dict[str, Any] | None = None,
        patience: int = 0,
        log: Any = print,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / run_files.CHECKPOINTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_epochs = total_epochs
        self.patience = patience
        self.log = log
        self.verbose = verbose
        state = state or {}
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        self.best = float(state.get("best_val_accuracy", -1.0))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.since_best = int(state.get("epochs_without_improvement", 0))
        self.stopped_early = bool(state.get("stopped_early", False))
        self._epoch_start = 0.0
        self._session_seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def _lr(self) -> float | None:
        try:
            return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            return None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self._session_seconds.append(seconds)
        done = epoch + 1
        row = self._record_epoch(done, dict(logs or {}), seconds)
        improved = self._track_best(row, done)
        checkpoint = self._save_checkpoint(done, improved)
        write_history_csv(self.run_dir / run_files.HISTORY_FILE, self.history)
        if self.patience and self.since_best >= self.patience and done < self.total_epochs:
            self.stopped_early = True
            self.model.stop_training = True
        self._commit_state(done, checkpoint)
        if self.verbose:
            self.log(self._epoch_line(row, done, seconds, improved))

    def _record_epoch(self, done: int, logs: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Append the epoch's losses, accuracies, learning rate and duration to the history."""
        row: dict[str, Any] = {"epoch": done}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            row[key] = float(logs[key]) if key in logs else None
        row["lr"] = self._lr()
        row["seconds"] = round(seconds, 3)
        self.history.append(row)
        return row

    def _track_best(self, row: dict[str, Any], done: int) -> bool:
        """Update the best score and the epochs since; True when this epoch is the new best."""
        # Best by validation accuracy. Without a validation split (a final model trained on all the
        # data) no epoch can be scored fairly, so the model is the last epoch's: where the lr
        # schedule ends, as the fixed-schedule recipes intend.
        score = row["val_accuracy"] if row["val_accuracy"] is not None else row["accuracy"]
        no_validation = row["val_accuracy"] is None
        improved = score is not None and (no_validation or score > self.best)
        if improved:
            self.best, self.best_epoch, self.since_best = float(score), done, 0
        else:
            self.since_best += 1
        return improved

    def _save_checkpoint(self, done: int, improved: bool) -> Path:
        """checkpoints/epoch-NNNN.keras, and best.keras and model.keras when it improved."""
        checkpoint = self.dir / f"epoch-{done:04d}.keras"
        tmp = self.dir / f".epoch-{done:04d}.{os.getpid()}.tmp.keras"  # save() wants a .keras suffix
        self.model.save(tmp)
        os.replace(tmp, checkpoint)
        if improved and _uses_ema(self.model):
            # The epoch checkpoint keeps the raw weights (resume continues from them, the average
            # rides along in the optimizer state); the best model is the averaged weights.
            best_tmp = self.dir / f".best.{os.getpid()}.tmp.keras"
            with ema_weights(self.model):
                self.model.save(best_tmp)
            os.replace(best_tmp, self.dir / "best.keras")
            _replace_with_link(self.dir / "best.keras", self.run_dir / run_files.MODEL_FILE)
        elif improved:
            _replace_with_link(checkpoint, self.dir / "best.keras")
            _replace_with_link(checkpoint, self.run_dir / run_files.MODEL_FILE)
        return checkpoint

    def _commit_state(self, done: int, checkpoint: Path) -> None:
        """Write state.json naming `checkpoint` (the commit point), then point last.keras at it and
        delete the previous epoch's file."""
        previous = read_state(self.dir) or {}
        write_json_atomic(
            self.dir / STATE_FILE,
            {
                "epoch": done,
                "total_epochs": self.total_epochs,
                "checkpoint": checkpoint.name,
                "best_val_accuracy": self.best,
                "best_epoch": self.best_epoch,
                "epochs_without_improvement": self.since_best,
                "stopped_early": self.stopped_early,
                "finished": self.stopped_early or done >= self.total_epochs,
                "seed_states": seed_states(self.model),
                "history": self.history,
            },
        )
        _replace_with_link(checkpoint, self.dir / "last.keras")
        old = previous.get("checkpoint")
        if old and old != checkpoint.name:
            (self.dir / old).unlink(missing_ok=True)

    def _epoch_line(self, row: dict[str, Any], done: int, seconds: float, improved: bool) -> str:
        """One log line: metrics, learning rate, duration, ETA, best and early-stop marks."""
        remaining = self.total_epochs - done
        eta = sum(self._session_seconds) / len(self._session_seconds) * remaining
        parts = [f"epoch {done}/{self.total_epochs}"]
        for key, label in (("loss", "loss"), ("accuracy", "acc"), ("val_loss", "val_loss"),
                           ("val_accuracy", "val_acc")):
            if row[key] is not None:
                parts.append(f"{label} {row[key]:.4f}")
        if row["lr"] is not None:
            parts.append(f"lr {row['lr']:.3g}")
        parts.append(f"{seconds:.1f}s")
        parts.append(f"ETA {_fmt_seconds(eta)}" if remaining and not self.stopped_early else "done")
        if improved:
            parts.append("*best*")
        if self.stopped_early:
            parts.append(f"(early stop: no val gain for {self.patience} epochs)")
        return "  ".join(parts)
