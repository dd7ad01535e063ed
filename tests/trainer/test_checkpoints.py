"""The per-epoch checkpointer: best model selection, history, state commit and early stopping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import pytest

from tests.fixtures.training import tiny_config
from trainer.checkpoints import RunCheckpointer, read_state
from trainer.train import train


def _tiny_model() -> keras.Model:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def _epoch(cb: RunCheckpointer, epoch: int, val_accuracy: float) -> None:
    cb.on_epoch_begin(epoch)
    cb.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "accuracy": 0.5, "val_loss": 1.0,
                            "val_accuracy": val_accuracy})


def test_best_model_history_state_and_early_stop(tmp_path: Path) -> None:
    lines: list[str] = []
    cb = RunCheckpointer(tmp_path, total_epochs=10, patience=2, log=lines.append)
    model = _tiny_model()
    cb.set_model(model)

    _epoch(cb, 0, 0.50)
    best_after_1 = (tmp_path / "model.keras").read_bytes()
    model.layers[-1].kernel.assign(model.layers[-1].kernel + 1.0)  # the weights move on
    _epoch(cb, 1, 0.70)
    best_after_2 = (tmp_path / "model.keras").read_bytes()
    assert best_after_2 != best_after_1
    model.layers[-1].kernel.assign(model.layers[-1].kernel + 1.0)
    _epoch(cb, 2, 0.60)  # worse: model.keras and best.keras stay at epoch 2
    assert (tmp_path / "model.keras").read_bytes() == best_after_2
    assert (tmp_path / "checkpoints" / "best.keras").read_bytes() == best_after_2
    assert not model.stop_training
    _epoch(cb, 3, 0.65)  # second epoch without gain: patience 2 reached
    assert model.stop_training

    state = read_state(tmp_path / "checkpoints")
    assert state is not None
    assert state["epoch"] == 4 and state["best_epoch"] == 2 and state["best_val_accuracy"] == 0.70
    assert state["stopped_early"] is True and state["finished"] is True
    assert state["checkpoint"] == "epoch-0004.keras"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.keras", "epoch-0004.keras", "last.keras", "state.json"
    ]
    with (tmp_path / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_accuracy"]) for r in rows] == [0.5, 0.7, 0.6, 0.65]
    assert "epoch 2/10" in lines[1] and "*best*" in lines[1] and "ETA" in lines[1]
    assert "early stop" in lines[-1]


def test_unreadable_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{half")
    with pytest.raises(ValueError, match="not valid JSON.*new --run-dir"):
        read_state(tmp_path)


def test_tensorboard_logs_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")

    config = tiny_config(data={"num_train": 100, "num_test": 20}, model={"width": 4},
                         train={"epochs": 1, "batch_size": 50, "tensorboard": True})
    train(config, tmp_path / "run", evaluate=False, log=lambda _m: None)
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "run" / "checkpoints" / "state.json").read_text())["epoch"] == 1
