"""The result types both clients return, whichever server answered."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.request_id import RULE, is_valid


class ClientError(Exception):
    """A failed call: `code` is stable for programs (the gateway's error code, or the gRPC status
    name in lower case, or a client-side code such as `connection_error`), `message` is for people."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status  # HTTP status, when an HTTP server answered


def check_request_id(request_id: str) -> None:
    """Raise ClientError unless the gateway would keep `request_id` as it is: an id it replaced
    would be missing from its logs when the caller looks it up."""
    if not is_valid(request_id):
        raise ClientError("bad_request_id", f"request id {request_id!r} is not {RULE}; pass one that is")


@dataclass(frozen=True)
class ImagePrediction:
    filename: str
    top_k: list[tuple[str, float]]  # (label, probability), most likely first
    probabilities: dict[str, float]  # every class label -> probability
    # From models exported with the out-of-distribution outputs (None from older ones): how unlike
    # the training classes the image is (higher = less like them), and whether the model abstains,
    # i.e. is not sure the image shows any of its classes (`label` is then only its best guess).
    ood_score: float | None = None
    abstain: bool | None = None

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def not_sure(self) -> bool:
        """True when the model abstained; False when it did not or cannot say (an older model)."""
        return self.abstain is True

    def to_dict(self) -> dict[str, Any]:
        # The gateway's JSON shape, so `--json` output is the same whichever server answered.
        return {
            "filename": self.filename,
            "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
            "probabilities": dict(self.probabilities),
            "ood_score": self.ood_score,
            "abstain": self.abstain,
        }


@dataclass(frozen=True)
class PredictResult:
    model_name: str
    model_version: int
    images: list[ImagePrediction]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model_name, "version": self.model_version},
            "predictions": [image.to_dict() for image in self.images],
        }


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str  # TF Serving's ModelVersionStatus.State name: AVAILABLE, LOADING, END, ...
    detail: str = ""


@dataclass(frozen=True)
class ModelStatus:
    model_name: str
    versions: list[VersionStatus] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return any(v.state == "AVAILABLE" for v in self.versions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "ready": self.ready,
            "versions": [{"version": v.version, "state": v.state, "detail": v.detail} for v in self.versions],
        }


def rank(
    filename: str,
    labels: list[str],
    probabilities: list[float],
    top_k: int,
    *,
    ood_score: float | None = None,
    abstain: bool | None = None,
) -> ImagePrediction:
    """One image's probabilities -> ImagePrediction with the k most likely labels (ties keep order)."""
    if not 1 <= top_k <= len(labels):
        raise ClientError("invalid_top_k", f"top_k={top_k} must be between 1 and the {len(labels)} classes")
    order = sorted(range(len(labels)), key=lambda i: -probabilities[i])[:top_k]
    return ImagePrediction(
        filename=filename,
        top_k=[(labels[i], float(probabilities[i])) for i in order],
        probabilities={label: float(p) for label, p in zip(labels, probabilities, strict=True)},
        ood_score=None if ood_score is None else float(ood_score),
        abstain=None if abstain is None else bool(abstain),
    )
