"""Training end to end on synthetic data: learning, the run directory, resume and refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.fixtures.training import tiny_config
from tests.trainer.preemption import KillAfterEpoch, Killed
from trainer.pipeline import ShuffledBatches
from trainer.schedules import WarmupSchedule
from trainer.train import TrainingError, train


def _quiet(_msg: str) -> None:
    pass


@pytest.mark.slow
def test_loss_falls_and_synthetic_accuracy_reaches_90_percent(tmp_path: Path) -> None:
    config = tiny_config(data={"num_train": 1500, "num_test": 400}, train={"epochs": 5})
    result = train(config, tmp_path / "run", log=_quiet)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 5
    assert losses[-1] < 0.6 * losses[0]
    assert result.metrics is not None and result.metrics["test_accuracy"] >= 0.90


@pytest.mark.slow
def test_run_directory_layout(trained_run_dir: Path) -> None:
    for name in ("config.json", "dataset.json", "history.csv", "metrics.json", "model.keras",
                 "checkpoints/last.keras", "checkpoints/best.keras", "checkpoints/state.json"):
        assert (trained_run_dir / name).is_file(), name
    dataset = json.loads((trained_run_dir / "dataset.json").read_text())
    assert dataset["synthetic"] is True and dataset["name"] == "synthetic" and len(dataset["mean"]) == 3
    config = json.loads((trained_run_dir / "config.json").read_text())
    assert config["model"]["arch"] == "bn_cnn" and config["data"]["dataset"] == "synthetic"
    with (trained_run_dir / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(float(r["lr"]) >= 0 and float(r["seconds"]) > 0 for r in rows)
    state = json.loads((trained_run_dir / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 3 and state["finished"] is True
    best = max(float(r["val_accuracy"]) for r in rows)
    assert state["best_val_accuracy"] == pytest.approx(best)
    # model.keras is the best epoch's checkpoint: it reproduces the recorded validation accuracy.
    assert (trained_run_dir / "model.keras").read_bytes() == (
        trained_run_dir / "checkpoints" / "best.keras"
    ).read_bytes()
    # Only the latest per-epoch checkpoint is kept, and no temp files are left behind.
    names = sorted(p.name for p in (trained_run_dir / "checkpoints").iterdir())
    assert names == ["best.keras", "epoch-0003.keras", "last.keras", "state.json"]


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path) -> None:
    # Cutout and dropout on: their random-generator counters must survive the restart too.
    config = tiny_config(
        data={"num_train": 300, "num_test": 50},
        model={"width": 8, "dropout": 0.2},
        augment={"translate": 2, "flip": True, "cutout": 6},
        train={"epochs": 3, "batch_size": 50},
    )
    straight = train(config, tmp_path / "straight", evaluate=False, log=_quiet)

    with pytest.raises(Killed):
        train(config, tmp_path / "killed", callbacks=[KillAfterEpoch(1)], evaluate=False, log=_quiet)
    state = json.loads((tmp_path / "killed" / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1 and state["finished"] is False
    resumed = train(config, tmp_path / "killed", resume=True, evaluate=False, log=_quiet)

    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    w1 = keras.saving.load_model(tmp_path / "straight" / "checkpoints" / "last.keras", compile=False).weights
    w2 = keras.saving.load_model(tmp_path / "killed" / "checkpoints" / "last.keras", compile=False).weights
    for v1, v2 in zip(w1, w2, strict=True):
        np.testing.assert_allclose(np.asarray(v1), np.asarray(v2), rtol=1e-4, atol=1e-5, err_msg=v1.path)


@pytest.mark.slow
def test_existing_run_needs_resume_and_same_settings(trained_run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="pass --resume"):
        train(tiny_config(), trained_run_dir, log=_quiet)
    with pytest.raises(TrainingError, match=r"model.width \(run: 16, now: 32\)"):
        train(tiny_config(model={"width": 32}), trained_run_dir, resume=True, log=_quiet)
    # Resuming a finished run is a no-op that keeps its files.
    before = (trained_run_dir / "model.keras").stat().st_mtime_ns
    result = train(tiny_config(), trained_run_dir, resume=True, log=_quiet)
    assert len(result.history) == 3
    assert (trained_run_dir / "model.keras").stat().st_mtime_ns == before


def test_data_order_depends_only_on_seed_and_epoch() -> None:
    x = np.arange(10 * 32 * 32 * 3, dtype=np.uint8).reshape(10, 32, 32, 3)
    y = np.arange(10, dtype=np.int32)
    stream = ShuffledBatches(x, y, 4, seed=5)
    assert stream.steps_per_epoch == 2 and stream.num_batches is None  # the remainder is dropped
    batches = [stream[i] for i in range(6)]  # three epochs of two batches
    assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int32
    epochs = [np.concatenate([batches[2 * e][1], batches[2 * e + 1][1]]) for e in range(3)]
    assert all(len(set(e.tolist())) == 8 for e in epochs)  # no repeats within an epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    # A process restarted at epoch 1 continues with exactly the same batches.
    resumed = ShuffledBatches(x, y, 4, seed=5, initial_epoch=1)
    np.testing.assert_array_equal(np.concatenate([resumed[0][1], resumed[1][1]]), epochs[1])
    np.testing.assert_array_equal(np.concatenate([resumed[2][1], resumed[3][1]]), epochs[2])
    other_seed = ShuffledBatches(x, y, 4, seed=6)
    assert not np.array_equal(np.concatenate([other_seed[0][1], other_seed[1][1]]), epochs[0])


@pytest.mark.parametrize("kind", ["onecycle", "cosine"])
def test_lr_schedule_warms_up_then_decays(kind: str) -> None:
    schedule = WarmupSchedule(peak=0.4, total_steps=100, warmup_steps=20, kind=kind, start_factor=0.1)
    lr = [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(101)]
    assert lr[0] == pytest.approx(0.04)
    assert lr[20] == pytest.approx(0.4)
    assert max(lr) == pytest.approx(0.4)
    assert all(a <= b + 1e-7 for a, b in zip(lr[:20], lr[1:21], strict=True))
    assert all(a >= b - 1e-7 for a, b in zip(lr[20:-1], lr[21:], strict=True))
    assert lr[100] == pytest.approx(0.0, abs=1e-6)
    restored = WarmupSchedule.from_config(schedule.get_config())
    assert float(keras.ops.convert_to_numpy(restored(57))) == pytest.approx(lr[57])


@pytest.mark.slow
def test_ema_best_model_holds_the_averaged_weights_and_resume_keeps_them(tmp_path: Path) -> None:
    config = tiny_config(
        data={"num_train": 300, "num_test": 50},
        model={"width": 8},
        train={"epochs": 3, "batch_size": 50, "ema_momentum": 0.9},
    )
    straight = train(config, tmp_path / "straight", evaluate=False, log=_quiet)
    with pytest.raises(Killed):
        train(config, tmp_path / "killed", callbacks=[KillAfterEpoch(1)], evaluate=False, log=_quiet)
    resumed = train(config, tmp_path / "killed", resume=True, evaluate=False, log=_quiet)
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-6)

    # Without a validation split the model is the last epoch's: the optimizer's average then.
    final = tiny_config(data={"num_train": 300, "num_test": 50, "val_fraction": 0.0}, model={"width": 8},
                        train={"epochs": 2, "batch_size": 50, "ema_momentum": 0.9})
    run = tmp_path / "final"
    train(final, run, evaluate=False, log=_quiet)
    last = keras.saving.load_model(run / "checkpoints" / "last.keras")
    kept = keras.saving.load_model(run / "model.keras", compile=False)
    optimizer = last.optimizer
    averages = optimizer._model_variables_moving_average  # Keras keeps them aligned with the variables
    assert len(averages) == len(last.trainable_weights) > 0
    raw_differs = False
    for raw, average, saved in zip(last.trainable_weights, averages, kept.trainable_weights, strict=True):
        np.testing.assert_allclose(np.asarray(saved), np.asarray(average), atol=1e-6, err_msg=raw.path)
        raw_differs |= not np.allclose(np.asarray(raw), np.asarray(average))
    assert raw_differs, "the model holds the raw weights, not their average"


@pytest.mark.slow
def test_evaluation_reports_flip_tta_beside_the_single_view(trained_run_dir: Path) -> None:
    metrics = json.loads((trained_run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy_flip_tta"] <= 1.0
    assert "test_accuracy" in metrics  # the headline figure is still the single view


@pytest.mark.slow
def test_run_records_its_recipe_and_the_xla_it_really_used(trained_run_dir: Path) -> None:
    recipe = json.loads((trained_run_dir / "recipe.json").read_text())
    assert recipe["batch_size"] == 64 and recipe["flip"] is True and recipe["steps_per_epoch"] == 14
    environment = json.loads((trained_run_dir / "environment.json").read_text())
    assert environment["jit_compile"] is False and environment["jit_compile_requested"] is False


@pytest.mark.slow
def test_xla_asked_with_a_layer_that_cannot_compile_is_refused(tmp_path: Path) -> None:
    config = tiny_config(augment={"rotation": 10.0}, train={"jit_compile": "on", "epochs": 1})
    with pytest.raises(TrainingError, match=r"aug_rotate.*augment.rotation=0"):
        train(config, tmp_path / "run", evaluate=False, log=_quiet)


@pytest.mark.slow
def test_no_validation_split_keeps_the_last_epoch(tmp_path: Path) -> None:
    config = tiny_config(data={"num_train": 200, "num_test": 50, "val_fraction": 0.0},
                         model={"width": 8}, train={"epochs": 2, "batch_size": 50})
    result = train(config, tmp_path / "run", evaluate=False, log=_quiet)
    assert result.best_epoch == 2
