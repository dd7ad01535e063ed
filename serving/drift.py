"""Served traffic against the model's reference: what moved (python -m serving.sampling drift).

The reference is `assets.extra/reference_stats.json` in the exported version (written at export on
the held-out split it uses, trainer/export):
    {"class_share": {label: share}, "confidence_hist": {"edges": [...], "counts": [...]},
     "ood_score_hist": {"edges": [...], "counts": [...]}, "abstain_rate": float,
     "pixel_mean": [r, g, b], "pixel_std": [r, g, b], "n": int}
and, with --run-dir, the training split's per-channel mean/std in the run's dataset.json. The served
side is the prediction sample (serving/sampling.py). Each statistic has an effect-size threshold;
class share and abstain rate must also be statistically significant, so a small sample's noise is
not reported as drift:

* class share of the answers: total variation distance (half the L1 distance of the shares) and a
  chi-square test of the two samples (served counts against the reference's n x share: the
  reference is a sample too, of n images);
* confidence and ood_score: population stability index (PSI) over the reference's histogram bins,
  merged to hold at least a tenth of the reference each (below 0.1 stable, 0.1-0.25 some change,
  above 0.25 a shift, by the usual reading), and the chi-square test over the same bins;
* abstain rate: absolute change and the same two-sample chi-square test;
* pixels: per-channel mean shift in reference standard deviations (significant against the spread
  of the served images' own means), and the ratio of the stds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FILE = Path("assets.extra") / "reference_stats.json"
_EPS = 1e-4  # share floor for PSI: an empty bin on one side must not make the index infinite
CHANNELS = ("R", "G", "B")


class DriftInputError(Exception):
    """A reference or the sample cannot be compared; the message names the file and the fix."""


@dataclass(frozen=True)
class Thresholds:
    min_records: int = 50
    class_tv: float = 0.15
    psi: float = 0.25
    abstain_delta: float = 0.10
    pixel_mean_std: float = 0.25
    pixel_std_ratio: float = 1.25
    p_value: float = 0.01


@dataclass(frozen=True)
class Histogram:
    edges: np.ndarray  # K+1 increasing bin edges
    counts: np.ndarray  # K counts


@dataclass(frozen=True)
class Reference:
    source: str
    n: int
    class_share: dict[str, float]
    confidence_hist: Histogram
    ood_score_hist: Histogram | None
    abstain_rate: float | None
    pixel_mean: np.ndarray  # [3], pixel units
    pixel_std: np.ndarray  # [3]


@dataclass(frozen=True)
class TrainingStats:
    source: str
    pixel_mean: np.ndarray
    pixel_std: np.ndarray


@dataclass
class Check:
    name: str
    statistic: str  # what `value` is: "total variation", "PSI", ...
    value: float | None  # None: not compared (detail says why)
    threshold: float
    moved: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "statistic": self.statistic, "value": self.value,
                "threshold": self.threshold, "moved": self.moved, "detail": self.detail}  # fmt: skip


@dataclass
class DriftReport:
    n: int
    reference: str
    reference_n: int
    checks: list[Check]
    first_time: float | None = None
    last_time: float | None = None
    sample_scope: str = ""
    served: dict[str, Any] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return any(c.moved for c in self.checks)

    @property
    def moved(self) -> list[str]:
        return [c.name for c in self.checks if c.moved]

    def to_dict(self) -> dict[str, Any]:
        return {
            "drifted": self.drifted, "moved": self.moved, "n": self.n, "sample": self.sample_scope,
            "reference": self.reference, "reference_n": self.reference_n,
            "first_time": self.first_time, "last_time": self.last_time, "served": self.served,
            "checks": [c.to_dict() for c in self.checks],
        }  # fmt: skip

    def text(self) -> str:
        lines = [f"drift: {self.n} sampled image(s) ({self.sample_scope}) against {self.reference} "
                 f"(n={self.reference_n})"]  # fmt: skip
        for c in self.checks:
            value = "not compared"
            if c.value is not None:
                value = f"{c.statistic} {c.value:.3g} (threshold {c.threshold:g})"
            verdict = "MOVED" if c.moved else ("-" if c.value is None else "ok")
            lines.append(f"  {c.name:<30} {verdict:<6} {value}: {c.detail}")
        if self.drifted:
            lines.append(f"DRIFT: {', '.join(self.moved)} moved")
        else:
            lines.append("no drift found: every compared statistic is within its threshold")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reading the references


def _histogram(raw: Any, where: str) -> Histogram:
    try:
        edges = np.asarray(raw["edges"], dtype=np.float64)
        counts = np.asarray(raw["counts"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise DriftInputError(f"{where} must be {{'edges': [K+1 numbers], 'counts': [K numbers]}}") from None
    if edges.ndim != 1 or counts.ndim != 1 or len(edges) != len(counts) + 1 or len(counts) < 1:
        raise DriftInputError(f"{where}: expected K+1 edges for K counts, got {len(edges)} and {len(counts)}")
    if np.any(np.diff(edges) <= 0) or np.any(counts < 0) or counts.sum() <= 0:
        raise DriftInputError(f"{where}: edges must increase and counts be >= 0 with a positive total")
    return Histogram(edges, counts)


def _triple(raw: Any, where: str) -> np.ndarray:
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (3,) or not np.all(np.isfinite(values)):
        raise DriftInputError(f"{where} must be three numbers (R, G, B in pixel units 0..255), got {raw!r}")
    return values


def parse_reference(data: dict[str, Any], source: str) -> Reference:
    """A reference_stats.json's content, checked field by field."""
    try:
        share = {str(k): float(v) for k, v in data["class_share"].items()}
        n = int(data["n"])
        confidence = _histogram(data["confidence_hist"], f"{source}: confidence_hist")
        mean = _triple(data["pixel_mean"], f"{source}: pixel_mean")
        std = _triple(data["pixel_std"], f"{source}: pixel_std")
    except KeyError as missing:
        raise DriftInputError(
            f"{source} lacks {missing}; re-export the model (python -m trainer export) to rewrite it"
        ) from None
    except (AttributeError, TypeError, ValueError):
        raise DriftInputError(
            f"{source}: class_share must map labels to shares and n be an integer"
        ) from None
    if not share or sum(share.values()) <= 0:
        raise DriftInputError(f"{source}: class_share is empty")
    total = sum(share.values())
    ood_raw = data.get("ood_score_hist")
    abstain = data.get("abstain_rate")
    return Reference(
        source=source,
        n=n,
        class_share={k: v / total for k, v in share.items()},
        confidence_hist=confidence,
        ood_score_hist=None if ood_raw is None else _histogram(ood_raw, f"{source}: ood_score_hist"),
        abstain_rate=None if abstain is None else float(abstain),
        pixel_mean=mean,
        pixel_std=std,
    )


def load_reference(model_dir: Path | None, override: Path | None = None) -> Reference:
    path = Path(override) if override is not None else Path(model_dir or ".") / REFERENCE_FILE
    if not path.is_file():
        raise DriftInputError(
            f"no reference statistics at {path}: the version was exported before reference_stats.json "
            "existed; re-export it with python -m trainer export, or pass --reference FILE"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DriftInputError(f"{path} is not readable JSON ({error}); re-export the model") from None
    if not isinstance(data, dict):
        raise DriftInputError(f"{path} must hold a JSON object")
    return parse_reference(data, str(path))


def load_training_stats(run_dir: Path) -> TrainingStats:
    path = Path(run_dir) / "dataset.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DriftInputError(
            f"{path} is missing or unreadable ({error}); pass the training run's RUN_DIR"
        ) from None
    return TrainingStats(
        str(path), _triple(data.get("mean"), f"{path}: mean"), _triple(data.get("std"), f"{path}: std")
    )


def version_of(model_dir: Path) -> int | None:
    """The version a MODEL_BASE/<name>/<version> directory holds (None when the name is no number)."""
    name = Path(model_dir).name
    return int(name) if name.isdigit() else None


# --------------------------------------------------------------------------------------------------
# Statistics


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def psi(expected_counts: np.ndarray, actual_counts: np.ndarray) -> float:
    """Population stability index of two histograms over the same bins."""
    e = np.maximum(np.asarray(expected_counts, float) / max(np.sum(expected_counts), 1e-12), _EPS)
    a = np.maximum(np.asarray(actual_counts, float) / max(np.sum(actual_counts), 1e-12), _EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of `values` in the reference's bins; values beyond the outer edges count in the end bins."""
    clipped = np.clip(np.asarray(values, float), edges[0], edges[-1])
    return np.histogram(clipped, bins=edges)[0].astype(np.float64)


def pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of uint8 [N, H, W, 3], as the trainer computes them:
    float64 sums over chunks, so 10,000 sampled images never become one 250 MB float copy."""
    flat = np.asarray(images).reshape(-1, 3)
    total, squares = np.zeros(3), np.zeros(3)
    for start in range(0, len(flat), 1 << 20):
        chunk = flat[start : start + (1 << 20)].astype(np.float64)
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=0)
    mean = total / max(len(flat), 1)
    return mean, np.sqrt(np.maximum(squares / max(len(flat), 1) - mean**2, 0.0))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _two_sample_p(served_counts: np.ndarray, reference_counts: np.ndarray) -> float:
    """p-value of a chi-square test that two samples' counts over the same categories come from one
    distribution (categories empty in both are left out)."""
    from scipy import stats

    table = np.array([served_counts, reference_counts], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or np.any(table.sum(axis=1) <= 0):
        return 1.0
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def _class_share_check(labels: Sequence[str], reference: Reference, t: Thresholds) -> Check:
    counts = Counter(labels)
    names = list(reference.class_share) + sorted(set(counts) - set(reference.class_share))
    n = len(labels)
    served = np.array([counts.get(k, 0) for k in names], dtype=np.float64)
    ref = np.array([reference.class_share.get(k, 0.0) for k in names])
    tv = total_variation(served / n, ref)
    p_value = _two_sample_p(served, ref * max(reference.n, 1))
    moved = tv > t.class_tv and p_value < t.p_value
    shifts = sorted(zip(names, ref, served / n, strict=True), key=lambda r: -abs(r[2] - r[1]))[:3]
    detail = ", ".join(f"{k} {_pct(r)} -> {_pct(s)}" for k, r, s in shifts) + f"; chi-square p={p_value:.2g}"
    return Check("class share", "total variation", tv, t.class_tv, moved, detail)


def coarsen(hist: Histogram, min_share: float = 0.1) -> Histogram:
    """Merge adjacent bins until each holds at least `min_share` of the reference (at most 10 bins at
    0.1). PSI over many sparse bins measures mostly sampling noise: with K bins and samples of n and m
    images its expected value without any shift is about (K - 1) (1/n + 1/m), 0.17 for 20 bins and
    the 200-image reference of a small export; over deciles it is under 0.1."""
    target = min_share * hist.counts.sum()
    edges, counts, acc = [hist.edges[0]], [], 0.0
    for right, count in zip(hist.edges[1:], hist.counts, strict=True):
        acc += count
        if acc >= target:
            edges.append(right)
            counts.append(acc)
            acc = 0.0
    if acc > 0 or len(counts) == 0:  # the remainder joins the last bin
        if counts:
            counts[-1] += acc
            edges[-1] = hist.edges[-1]
        else:
            edges.append(hist.edges[-1])
            counts.append(acc)
    edges[-1] = hist.edges[-1]
    return Histogram(np.asarray(edges, np.float64), np.asarray(counts, np.float64))


def _histogram_check(name: str, values: np.ndarray, hist: Histogram, t: Thresholds) -> Check:
    coarse = coarsen(hist)
    served = bin_counts(values, coarse.edges)
    value = psi(coarse.counts, served)
    p_value = _two_sample_p(served, coarse.counts)
    centres = (hist.edges[:-1] + hist.edges[1:]) / 2
    ref_mean = float(np.sum(centres * hist.counts) / hist.counts.sum())
    detail = (f"mean about {ref_mean:.3g} -> {float(np.mean(values)):.3g} over {len(coarse.counts)} bins; "
              f"chi-square p={p_value:.2g}")  # fmt: skip
    return Check(name, "PSI", value, t.psi, value > t.psi and p_value < t.p_value, detail)


def _abstain_check(abstained: np.ndarray, reference_rate: float, reference_n: int, t: Thresholds) -> Check:
    k, n = int(abstained.sum()), len(abstained)
    rate = k / n
    reference_counts = np.array([reference_rate, 1 - reference_rate]) * reference_n
    p_value = _two_sample_p(np.array([k, n - k]), reference_counts)
    delta = abs(rate - reference_rate)
    moved = delta > t.abstain_delta and p_value < t.p_value
    detail = f"{_pct(reference_rate)} -> {_pct(rate)}; chi-square p={p_value:.2g}"
    return Check("abstain rate", "absolute change", delta, t.abstain_delta, moved, detail)


def _pixel_checks(
    images: np.ndarray,
    ref_mean: np.ndarray,
    ref_std: np.ndarray,
    ref_n: int | None,
    against: str,
    t: Thresholds,
) -> list[Check]:
    from scipy import stats

    mean, std = pixel_stats(images)
    shift = np.abs(mean - ref_mean) / np.maximum(ref_std, 1e-6)
    # Significance from the spread of the images' own means (the reference's is taken to be alike;
    # a training split's n is large enough to ignore): a few unusual images are not a shifted stream.
    per_image = np.asarray(images).reshape(len(images), -1, 3).mean(axis=1, dtype=np.float64)
    spread = per_image.std(axis=0, ddof=1) if len(images) > 1 else np.full(3, np.inf)
    error = np.maximum(spread * np.sqrt(1 / len(images) + (1 / ref_n if ref_n else 0.0)), 1e-9)
    p_values = 2 * stats.norm.sf(np.abs(mean - ref_mean) / error)
    mean_moved = bool(np.any((shift > t.pixel_mean_std) & (p_values < t.p_value)))
    ratio = np.maximum(std, 1e-6) / np.maximum(ref_std, 1e-6)
    worst_ratio = float(np.max(np.maximum(ratio, 1 / ratio)))

    def moves(before: np.ndarray, after: np.ndarray) -> str:
        return ", ".join(f"{c} {r:.1f} -> {v:.1f}" for c, r, v in zip(CHANNELS, before, after, strict=True))

    mean_detail, std_detail = moves(ref_mean, mean), moves(ref_std, std)
    return [
        Check(f"pixel mean ({against})", "shift in stds", float(shift.max()), t.pixel_mean_std, mean_moved,
              f"{mean_detail}; p={float(p_values.min()):.2g}"),
        Check(f"pixel std ({against})", "ratio", worst_ratio, t.pixel_std_ratio,
              worst_ratio > t.pixel_std_ratio, std_detail),
    ]  # fmt: skip


def compare(
    records: Sequence[Any],
    reference: Reference,
    thresholds: Thresholds,
    *,
    training: TrainingStats | None = None,
) -> DriftReport:
    """Compare sampled records (serving.sampling.SampleRecord) with the reference statistics."""
    t = thresholds
    n = len(records)
    if n < t.min_records:
        raise DriftInputError(
            f"only {n} sampled image(s) match; at least {t.min_records} are needed to judge drift "
            "(wait for more traffic, raise GATEWAY_SAMPLE_RATE, widen --since-hours, or lower --min-records)"
        )
    labels = [r.label for r in records]
    confidence = np.array([r.confidence for r in records])
    images = np.stack([r.image for r in records])
    mean, std = pixel_stats(images)
    checks = [
        _class_share_check(labels, reference, t),
        _histogram_check("confidence", confidence, reference.confidence_hist, t),
    ]
    ood = np.array([r.ood_score for r in records if r.ood_score is not None])
    if reference.ood_score_hist is None or len(ood) == 0:
        why = "the reference has no ood_score_hist" if reference.ood_score_hist is None else (
            "the sampled version returns no ood_score"
        )
        checks.append(Check("ood_score", "PSI", None, t.psi, False, why))
    else:
        checks.append(_histogram_check("ood_score", ood, reference.ood_score_hist, t))
    abstained = np.array([r.abstain for r in records if r.abstain is not None], dtype=bool)
    if reference.abstain_rate is None or len(abstained) == 0:
        why = "the reference has no abstain_rate" if reference.abstain_rate is None else (
            "the sampled version returns no abstain"
        )
        checks.append(Check("abstain rate", "absolute change", None, t.abstain_delta, False, why))
    else:
        checks.append(_abstain_check(abstained, reference.abstain_rate, max(reference.n, 1), t))
    checks += _pixel_checks(images, reference.pixel_mean, reference.pixel_std, reference.n, "reference", t)
    if training is not None:
        checks += _pixel_checks(images, training.pixel_mean, training.pixel_std, None, "training split", t)
    times = [r.time for r in records]
    served = {
        "class_share": {k: v / n for k, v in sorted(Counter(labels).items())},
        "mean_confidence": float(confidence.mean()),
        "abstain_rate": None if len(abstained) == 0 else float(abstained.mean()),
        "pixel_mean": mean.tolist(),
        "pixel_std": std.tolist(),
    }
    return DriftReport(n, reference.source, reference.n, checks, min(times), max(times), served=served)


def reference_from_predictions(
    probabilities: np.ndarray,
    class_names: Sequence[str],
    images: np.ndarray,
    *,
    ood_score: np.ndarray | None = None,
    abstain: np.ndarray | None = None,
    confidence_edges: Sequence[float] = tuple(np.linspace(0, 1, 11)),
    ood_edges: Sequence[float] | None = None,
) -> dict[str, Any]:
    """reference_stats.json's content for a model's predictions on held-out images (the format the
    export writes; for a version exported before it, build one with `--reference`)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    top = probabilities.argmax(axis=1)
    n = len(top)
    share = {name: float(np.sum(top == i)) / n for i, name in enumerate(class_names)}
    conf_edges = np.asarray(confidence_edges, float)
    out: dict[str, Any] = {
        "class_share": share,
        "confidence_hist": {"edges": conf_edges.tolist(),
                            "counts": bin_counts(probabilities.max(axis=1), conf_edges).astype(int).tolist()},
        "n": n,
    }  # fmt: skip
    if ood_score is not None:
        scores = np.asarray(ood_score, float)
        if ood_edges is None:  # deciles of the reference scores: every bin holds a tenth of them
            ood_edges = np.quantile(scores, np.linspace(0, 1, 11))
        edges = np.unique(np.asarray(ood_edges, float))
        if len(edges) < 2:
            edges = np.array([edges[0] - 1, edges[0] + 1])
        counts = bin_counts(scores, edges).astype(int)
        out["ood_score_hist"] = {"edges": edges.tolist(), "counts": counts.tolist()}
    if abstain is not None:
        out["abstain_rate"] = float(np.mean(np.asarray(abstain, bool)))
    mean, std = pixel_stats(images)
    out["pixel_mean"], out["pixel_std"] = mean.tolist(), std.tolist()
    return out
