"""What the gateway needs from a model backend, whichever serves the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from contract.signatures import ABSTAIN_KEY, OOD_SCORE_KEY


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # float32 [N, C], rows in the order of the input images
    class_names: tuple[str, ...]  # C labels, column order of `probabilities`
    model_name: str
    model_version: int  # the version that answered this call
    # Out-of-distribution outputs of versions exported with them (issue 17): ood_score float32 [N],
    # higher = less like the training classes; abstain bool [N], ood_score over the threshold the
    # export chose. None for versions exported before them: the gateway still serves those.
    ood_score: np.ndarray | None = None
    abstain: np.ndarray | None = None


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM from the exported `explain` signature (trainer/export/gradcam.py)."""

    probabilities: np.ndarray  # float32 [N, C]
    heatmaps: np.ndarray  # float32 [N, 32, 32], 0..1: where the evidence for explained_class sits
    explained_class: np.ndarray  # int32 [N]: the class each heatmap explains
    class_names: tuple[str, ...]
    model_name: str
    model_version: int
    ood_score: np.ndarray | None = None  # as in Prediction: None when the explain signature lacks it
    abstain: np.ndarray | None = None


@dataclass(frozen=True)
class ModelStatus:
    ready: bool  # True only when a model version is loaded and answering
    model_name: str
    version: int | None
    class_names: tuple[str, ...] | None
    detail: str  # why not ready, or what is served
    # Versions newer than the served one that failed to load: {version: error}. The backend keeps
    # serving the older version (TF Serving's availability-preserving policy does the same), so
    # readiness stays true; operators see here why the rollout did not happen.
    failed_versions: dict[int, str] = field(default_factory=dict)
    # With labels.json (serving/canary.py): {"stable", "canary", "canary_percent", "mode"} as the
    # backend applies them (canary None while that version cannot answer); None without labels.
    rollout: dict[str, Any] | None = None


def served_detail(served: str, failed_versions: dict[int, str]) -> str:
    """ModelStatus.detail for a ready backend: what is served, and which newer versions are not."""
    if not failed_versions:
        return served
    newer = ", ".join(map(str, sorted(failed_versions)))
    return f"{served}; newer version(s) {newer} failed to load, not served"


def ood_fields(outputs: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The `ood_score` (float32 [count]) and `abstain` (bool [count]) among a signature's decoded
    outputs, as Prediction/Explanation keyword arguments; an output the version lacks is left out
    (None). BackendError when one is there but breaks the contract."""
    fields: dict[str, np.ndarray] = {}
    for key, name, dtype in (
        (OOD_SCORE_KEY, "ood_score", np.dtype(np.float32)),
        (ABSTAIN_KEY, "abstain", np.dtype(np.bool_)),
    ):
        if key not in outputs:
            continue
        value = np.asarray(outputs[key])
        if value.dtype != dtype or value.shape != (count,):
            raise BackendError(
                f"the model's {key!r} output is {value.dtype} of shape {value.shape}, not {dtype} [{count}] "
                "as the contract says; re-export the model with trainer/export"
            )
        fields[name] = value
    return fields


class BackendUnavailable(Exception):
    """The model cannot answer now (backend down, no version loaded): clients should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendTimeout(Exception):
    """The backend did not answer within the deadline."""


class BackendError(Exception):
    """The backend answered with an error the client cannot fix (bad gateway)."""


class ExplainUnsupported(Exception):
    """The served model version has no `explain` signature (exported before Grad-CAM existed, or a
    model without convolutional layers): re-export it to get explanations. Deliberately not a
    BackendError: the gateway answers it 501 (a missing feature), not 502 (a failing backend)."""


class Backend(Protocol):
    kind: str  # "embedded" | "tfserving": the label on backend metrics

    def predict(self, images: np.ndarray, *, timeout_s: float | None = None) -> Prediction:
        """uint8 [N, 32, 32, 3] (all images of one request) -> probabilities. `timeout_s` (the
        request's time left) caps the backend's own deadline: BackendTimeout past it."""
        ...

    def explain(
        self, images: np.ndarray, class_index: int | None = None, *, timeout_s: float | None = None
    ) -> Explanation:
        """uint8 [N, 32, 32, 3] -> probabilities and a Grad-CAM heatmap per image, of class
        `class_index` (None: each image's top class). Raises ExplainUnsupported when the served
        version was exported without the `explain` signature."""
        ...

    def status(self) -> ModelStatus: ...

    def close(self) -> None: ...
