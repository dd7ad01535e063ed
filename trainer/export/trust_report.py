"""The export's trust reports: reliability diagram (before/after the temperature), OOD score histograms,
and ood_report.json (ECE, threshold, AUROC per out-of-class source and score). trainer/export/trust.py
computes the numbers; this module only draws and writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training or export machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RELIABILITY_PNG = "reliability.png"
OOD_SCORES_PNG = "ood_scores.png"
REPORT_JSON = "ood_report.json"


def write_reports(folder: Path, report: dict[str, Any], figures: dict[str, Any]) -> None:
    """ood_report.json and the two figures into `folder` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    if "reliability" in figures:
        reliability_diagram(*figures["reliability"], path=folder / RELIABILITY_PNG)
    if "ood_scores" in figures:
        score_histograms(*figures["ood_scores"], path=folder / OOD_SCORES_PNG)


def reliability_diagram(before: Any, after: Any, temperature: float, *, path: Path) -> None:
    """Accuracy against confidence per bin, before and after the temperature (the diagonal is perfect)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, rel, title in (
        (axes[0], before, "before (T = 1)"),
        (axes[1], after, f"after (T = {temperature:.3f})"),
    ):
        centers = (rel.edges[:-1] + rel.edges[1:]) / 2
        width = rel.edges[1] - rel.edges[0]
        used = rel.counts > 0
        ax.bar(centers[used], rel.accuracy[used], width=width * 0.9, color="#4c72b0", label="accuracy")
        # The gap between accuracy and confidence, drawn between the two whichever is higher.
        low = np.minimum(rel.accuracy, rel.confidence)[used]
        gap = np.abs(rel.confidence - rel.accuracy)[used]
        ax.bar(centers[used], gap, bottom=low, width=width * 0.9, color="#dd8452", alpha=0.6, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_title(f"{title}: ECE {rel.ece:.3f}")
        ax.set_xlabel("confidence (top probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def score_histograms(
    kind: str, inside: np.ndarray | None, outside: dict[str, np.ndarray], threshold: float, *, path: Path
) -> None:
    """The ood_score of held-out in-distribution images against each out-of-class source."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = ({"held-out (in-distribution)": inside} if inside is not None else {}) | outside
    values = np.concatenate([np.asarray(v) for v in groups.values()])
    bins = np.linspace(values.min(), values.max(), 40) if values.size else 10
    for name, scores in groups.items():
        ax.hist(scores, bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="abstain above")
    ax.set_xlabel(f"ood_score ({kind}; higher = less like the training data)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
