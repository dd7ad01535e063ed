"""Temperature scaling (Guo et al. 2017): one scalar T fitted at export, applied inside the graph.

The served probabilities are softmax(logits / T). T > 1 softens an overconfident model, T < 1 sharpens
an underconfident one (label smoothing makes a model underconfident); the arg max never moves, so the
accuracy the model card reports is the same before and after. T minimises the negative log-likelihood
of the held-out labels (a convex 1-D problem in log T, solved by bounded Brent search in well under a
second for 10,000 images), and expected calibration error (ECE, 15 equal-width confidence bins) shows
what it bought. numpy only: the graph side is trainer/export/trust.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

ECE_BINS = 15  # the usual choice (Guo et al.); fewer bins hide miscalibration, more make each bin noisy
# Search range of T: wide enough for any trained classifier (a model needing more than 100x is broken),
# narrow enough that a degenerate held-out set cannot push T to 0 or infinity.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
LOG_FLOOR = 1e-30  # probabilities turned back into log-probabilities are floored here (float32 underflow)


def as_logits(probabilities: np.ndarray) -> np.ndarray:
    """Log-probabilities, which softmax maps back to `probabilities`: logits up to a per-row constant,
    enough for temperature scaling (softmax(log p / T) = softmax(z / T)) when the model's own logits are
    not reachable."""
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64, what the graph computes in float32."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the held-out NLL of softmax(logits / T); ValueError without data."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no held-out images to fit a temperature on")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


@dataclass(frozen=True)
class Reliability:
    """Per-bin statistics of a reliability diagram: equal-width confidence bins over (0, 1]."""

    edges: np.ndarray  # [bins + 1]
    counts: np.ndarray  # [bins] images whose top probability falls in the bin
    confidence: np.ndarray  # [bins] mean top probability (nan for an empty bin)
    accuracy: np.ndarray  # [bins] share of those images classified right (nan for an empty bin)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence| over bins."""
        used = self.counts > 0
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float(np.sum(gaps * self.counts[used]) / max(int(self.counts.sum()), 1))


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin each image by its top probability (bin i holds (i/bins, (i+1)/bins])."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=bins) / counts
    return Reliability(edges, counts, mean_conf, accuracy)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probabilities, labels, bins).ece
