"""The `top_k` parameter and the per-image scores both /v1/predict and /v1/explain answer with."""

from __future__ import annotations

from typing import Any

import numpy as np

from contract.signatures import DEFAULT_TOP_K
from serving.errors import GatewayError
from serving.uploads import param


def requested_top_k(content_type: str) -> int:
    """The request's `top_k` (query or form), DEFAULT_TOP_K when absent or empty."""
    raw = param("top_k", content_type)
    if raw is None or raw == "":
        return DEFAULT_TOP_K
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise GatewayError(
            400, "invalid_top_k", f"top_k={raw!r} is not valid: use an integer from 1 to the class count"
        )
    return value


def check_top_k(top_k: int, names: tuple[str, ...]) -> None:
    """Refuse a top_k over the class count (known only once the backend has answered)."""
    if top_k > len(names):
        raise GatewayError(
            400,
            "invalid_top_k",
            f"top_k={top_k} is more than the {len(names)} classes; use 1 to {len(names)}",
        )


def scores(row: np.ndarray, names: tuple[str, ...], top_k: int) -> dict[str, Any]:
    """The `top_k` list (best first) and every class's probability, for one image."""
    order = np.argsort(-row, kind="stable")[:top_k]
    return {
        "top_k": [{"label": names[i], "probability": float(row[i])} for i in order],
        "probabilities": {name: float(p) for name, p in zip(names, row, strict=True)},
    }


def trust(ood_score: np.ndarray | None, abstain: np.ndarray | None, index: int) -> dict[str, Any]:
    """Image `index`'s `ood_score` (float) and `abstain` (bool: the model is not sure the image shows
    one of its classes; the label is still its best guess), both null for a version exported without
    the out-of-distribution outputs, so clients can tell "sure" from "cannot say"."""
    return {
        "ood_score": None if ood_score is None else float(ood_score[index]),
        "abstain": None if abstain is None else bool(abstain[index]),
    }
