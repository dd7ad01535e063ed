"""Drift metrics in /metrics: what the served model answers, for every predicted image.

The gateway calls `observe(prediction)` after each successful predict. It counts the top class
(gateway_predicted_class_total{version, class_name}: the per-class prediction share), observes the
top-class probability (gateway_prediction_confidence) and, for versions exported with them, the
`ood_score` (gateway_ood_score) and abstentions (gateway_abstained_total). Counters and histograms
aggregate across gunicorn's worker processes in prometheus-client's multiprocess mode.

Example queries (the last hour):
    class share:   sum by (class_name) (rate(gateway_predicted_class_total[1h]))
                   / ignoring(class_name) group_left sum(rate(gateway_predicted_class_total[1h]))
    abstain rate:  sum(rate(gateway_abstained_total[1h])) / sum(rate(gateway_predicted_class_total[1h]))
The `drift` command (python -m serving.sampling drift) compares the sampled requests with the
model's reference statistics offline and says what moved.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import numpy as np

from serving import metrics

logger = logging.getLogger(__name__)


def observe(prediction: Any) -> None:
    """Count one successful prediction's images. Never raises: metrics must not fail a request."""
    try:
        _observe(prediction)
    except Exception:  # a malformed prediction is logged, the request is answered as usual
        logger.exception("drift metrics: could not observe a prediction; the request is unaffected")


def _observe(prediction: Any) -> None:
    probabilities = np.asarray(prediction.probabilities, dtype=np.float32)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        return
    version = str(prediction.model_version)
    names = tuple(prediction.class_names)
    top = probabilities.argmax(axis=1)
    # Counter, not np.unique: a request has 1 to 64 rows, where np.unique's sort costs more than the
    # metric writes (profiled: the largest part of this function under load).
    for index, count in Counter(top.tolist()).items():
        metrics.PREDICTED_CLASS.labels(version=version, class_name=names[index]).inc(count)
    confidence = metrics.CONFIDENCE.labels(version=version)
    for value in probabilities[np.arange(len(top)), top].tolist():
        confidence.observe(value)
    ood = getattr(prediction, "ood_score", None)
    if ood is not None:
        histogram = metrics.OOD_SCORE.labels(version=version)
        for value in np.asarray(ood, dtype=np.float64).reshape(-1).tolist():
            if math.isfinite(value):
                histogram.observe(value)
    abstain = getattr(prediction, "abstain", None)
    # Touch the counter even at 0, so the abstain rate of an OOD-aware version reads 0, not "no data".
    if abstain is not None:
        metrics.ABSTAINED.labels(version=version).inc(int(np.count_nonzero(np.asarray(abstain))))
