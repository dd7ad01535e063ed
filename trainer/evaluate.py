"""Evaluate a run's best model on the test split: metrics.json and the report files.

The test split is touched only here, after training, for the final report. The dataset is
re-created from the run's config.json (same seed, same split) unless the caller passes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

import trainer.models  # noqa: F401  (registers the custom layers load_model needs)
from trainer import embedding, reports, run_files
from trainer.checkpoints import read_state
from trainer.config import ConfigError, write_json_atomic
from trainer.data import Dataset

EPS = 1e-7  # probability floor for the log in cross-entropy


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def per_class_metrics(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        name: {
            "precision": round(float(precision[i]), 6),
            "recall": round(float(recall[i]), 6),
            "f1": round(float(f1[i]), 6),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }


def predict_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Class probabilities [N, classes] for uint8 pixels."""
    return np.asarray(model.predict(images.astype(np.float32), batch_size=256, verbose=0))


def predict_flip_tta(model: keras.Model, images: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
    """Test-time flip augmentation: the mean of the probabilities of each image and its mirror
    (what the fast recipes report). `probs`: the single-view probabilities, when already known."""
    single = predict_probabilities(model, images) if probs is None else probs
    mirrored = predict_probabilities(model, np.ascontiguousarray(images[:, :, ::-1, :]))
    return (single + mirrored) / 2.0


def score_test_split(probs: np.ndarray, dataset: Dataset, state: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: accuracy, loss, per-class scores and confusion matrix on the test split, plus
    the training outcome recorded in the checkpoint `state`."""
    y_true = dataset.y_test.astype(np.int64)
    y_pred = probs.argmax(axis=1)
    # Plain cross-entropy (no label smoothing): comparable across runs whatever they trained with.
    test_loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], EPS, 1.0))))
    cm = confusion_matrix(y_true, y_pred, dataset.num_classes)
    per_class = per_class_metrics(cm, dataset.class_names)
    return {
        "test_accuracy": float(np.mean(y_pred == y_true)),
        "test_loss": test_loss,
        "num_test": int(len(y_true)),
        "dataset": dataset.name,
        "synthetic": bool(dataset.synthetic),
        "class_names": list(dataset.class_names),
        "best_val_accuracy": state.get("best_val_accuracy"),
        "best_epoch": state.get("best_epoch"),
        "epochs_trained": state.get("epoch"),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def write_reports(
    report_dir: Path, model: keras.Model, dataset: Dataset, probs: np.ndarray, metrics: dict[str, Any],
    history_path: Path,
) -> None:
    """per_class.json and the figures: learning curves (when `history_path` exists), confusion
    matrix, misclassified images and the feature-space embedding."""
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_dir / "per_class.json", metrics["per_class"])
    y_true = dataset.y_test.astype(np.int64)
    y_pred = probs.argmax(axis=1)
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    acc = metrics["test_accuracy"]
    tag = f"{model.name} on {dataset.name}{' (SYNTHETIC)' if dataset.synthetic else ''}"
    if history_path.is_file():
        reports.learning_curves(reports.read_history(history_path), report_dir / "learning_curves.png",
                                title=f"Learning curves: {tag}")
    reports.confusion_matrix_plot(cm, dataset.class_names, report_dir / "confusion_matrix.png",
                                  title=f"Confusion matrix: {tag}, test accuracy {acc:.1%}")
    reports.misclassified_grid(dataset.x_test, y_true, y_pred, probs.max(axis=1), dataset.class_names,
                               report_dir / "misclassified.png")
    # Feature-space view of the same (best) model: do the classes form separate clusters?
    embedding.write_embedding_report(model, dataset.x_test, y_true, dataset.class_names,
                                     report_dir / "embedding.png",
                                     title=f"Penultimate-layer features, {{method}}: {tag}")


def _arch(run_dir: Path) -> str | None:
    try:
        return run_files.read_config(run_dir).model.arch
    except ConfigError:  # a run dir without its config.json (evaluate's callers pass the dataset)
        return None


def evaluate_run(
    run_dir: str | Path, *, dataset: Dataset | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Predict the test split with RUN_DIR/model.keras; write metrics.json and reports/*."""
    run_dir = Path(run_dir)
    model_path = run_dir / run_files.MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{model_path} not found: train first (python -m trainer train --run-dir {run_dir})"
        )
    if dataset is None:
        dataset = run_files.load_run_dataset(run_files.read_config(run_dir))
    if len(dataset.x_test) == 0:
        raise ValueError(f"dataset {dataset.name} has an empty test split: nothing to evaluate")

    model = keras.saving.load_model(model_path, compile=False)
    probs = predict_probabilities(model, dataset.x_test)
    metrics = score_test_split(probs, dataset, read_state(run_dir / run_files.CHECKPOINTS_DIR) or {})
    # Beside the single view, never instead of it: the exported model answers with one view
    # unless it is exported with --tta flip (which doubles its cost).
    tta = predict_flip_tta(model, dataset.x_test, probs)
    metrics["test_accuracy_flip_tta"] = float(np.mean(tta.argmax(axis=1) == dataset.y_test))
    if _arch(run_dir) == "airbench":
        # The figure airbench94's 94.01% is: its six flip-and-translate views (3x flip's cost).
        from trainer.models.airbench import predict_tta

        views = predict_tta(model, dataset.x_test)
        metrics["test_accuracy_airbench_tta"] = float(np.mean(views.argmax(axis=1) == dataset.y_test))
        log(f"test accuracy with airbench's flip + translate TTA {metrics['test_accuracy_airbench_tta']:.4f}")
    write_json_atomic(run_dir / run_files.METRICS_FILE, metrics)
    report_dir = run_dir / run_files.REPORTS_DIR
    write_reports(report_dir, model, dataset, probs, metrics, history_path=run_dir / run_files.HISTORY_FILE)
    synthetic_note = " (SYNTHETIC data)" if dataset.synthetic else ""
    log(f"test accuracy {metrics['test_accuracy']:.4f} "
        f"(with flip TTA {metrics['test_accuracy_flip_tta']:.4f}), test loss {metrics['test_loss']:.4f} on "
        f"{metrics['num_test']} {dataset.name} images{synthetic_note}; reports in {report_dir}")
    return metrics
