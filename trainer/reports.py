"""Report figures for a run directory (what the seeds drew by hand): learning curves, confusion
matrix with counts, and a grid of misclassified test images. matplotlib with the Agg backend,
so it works on headless servers; every file is written atomically (temp file + os.replace).
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed (must precede pyplot)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def read_history(path: Path) -> list[dict[str, float | None]]:
    """history.csv rows with numbers parsed; empty cells (e.g. no validation split) become None."""
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return rows


def learning_curves(history: Sequence[dict[str, float | None]], path: Path, title: str = "") -> Path:
    """Two panels: loss and accuracy per epoch, training vs validation."""
    if not history:
        raise ValueError("history is empty: nothing to plot (did training run at least one epoch?)")
    epochs = [int(r["epoch"] or i + 1) for i, r in enumerate(history)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        for prefix, name, style in (("", "train", "-o"), ("val_", "validation", "-s")):
            values = [r.get(prefix + key) for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, label=name, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_ylim(0, 1.02)  # room for markers at 100%
    fig.suptitle(title or "Learning curves")
    return save_figure(fig, path)


def confusion_matrix_plot(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Heat map of counts (rows: true class, columns: predicted), each cell labelled."""
    cm = np.asarray(cm)
    n = len(class_names)
    size = max(5.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(title or f"Confusion matrix (test accuracy {accuracy:.1%}, {int(cm.sum())} images)")
    return save_figure(fig, path)


def misclassified_grid(
    images: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    confidence: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    *,
    max_images: int = 36,
) -> Path:
    """Up to `max_images` wrongly classified test images, most confident mistakes first, each
    titled "true -> predicted (confidence)". Writes a figure saying so when there are none."""
    wrong = np.flatnonzero(y_true != y_pred)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_images]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[i].astype(np.uint8), interpolation="nearest")
        ax.set_title(f"{class_names[y_true[i]]}\n-> {class_names[y_pred[i]]} ({confidence[i]:.0%})",
                     fontsize=8, color="firebrick")
    if len(wrong) == 0:
        axes[0, 0].text(0, 0.5, "no misclassified test images", fontsize=12)
    n_wrong = int((y_true != y_pred).sum())
    fig.suptitle(f"Misclassified test images: {n_wrong} of {len(y_true)} (most confident first)\n"
                 "true -> predicted (confidence)")
    return save_figure(fig, path)
