"""Reports of a trained run: metrics.json, per_class.json and the PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.evaluate import confusion_matrix, per_class_metrics
from trainer.reports import confusion_matrix_plot, misclassified_grid


def test_per_class_metrics_from_a_known_confusion_matrix() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = per_class_metrics(cm, ["a", "b", "c"])
    assert m["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3, abs=1e-6),
                      "f1": pytest.approx(0.8, abs=1e-6), "support": 3}
    assert m["b"]["precision"] == 0.5 and m["b"]["recall"] == 0.5
    assert m["c"]["precision"] == 0.5 and m["c"]["recall"] == 1.0
    # A class never predicted and never present: zeros, not NaN.
    assert per_class_metrics(confusion_matrix(y_true, y_pred, 4), list("abcd"))["d"]["f1"] == 0.0


@pytest.mark.slow
def test_metrics_json_is_consistent(trained_run_dir: Path) -> None:
    metrics = json.loads((trained_run_dir / "metrics.json").read_text())
    dataset = json.loads((trained_run_dir / "dataset.json").read_text())
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == metrics["num_test"] == dataset["num_test"]
    assert metrics["test_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert metrics["test_accuracy"] > 0.2  # well above chance (0.1) after 3 short epochs
    assert 0 < metrics["test_loss"] < 5
    assert metrics["dataset"] == "synthetic" and metrics["synthetic"] is True
    assert list(metrics["per_class"]) == dataset["class_names"]
    supports = [c["support"] for c in metrics["per_class"].values()]
    assert supports == cm.sum(axis=1).tolist()
    per_class = json.loads((trained_run_dir / "reports" / "per_class.json").read_text())
    assert per_class == metrics["per_class"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["learning_curves.png", "confusion_matrix.png", "misclassified.png"])
def test_report_figures_are_real_pngs(trained_run_dir: Path, name: str) -> None:
    path = trained_run_dir / "reports" / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width >= 400 and img.height >= 200
        # Not a blank canvas: a real figure has many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 50


def test_figures_handle_edge_cases(tmp_path: Path) -> None:
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 0, 1])
    # No mistakes at all: still a valid figure saying so.
    misclassified_grid(images, y, y, np.ones(4), ["cat", "dog"], tmp_path / "none.png")
    confusion_matrix_plot(confusion_matrix(y, y, 2), ["cat", "dog"], tmp_path / "cm.png")
    for name in ("none.png", "cm.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "none.png"]  # no temp files left
