"""Python clients for the CIFAR-10 classifier.

* `HTTPClient` talks to the gateway (serving/): `predict`, `models`, `ready`, `status`.
* `GRPCClient` talks to TensorFlow Serving directly: `predict` (pixels or encoded bytes),
  `model_status`, `signature_defs`. It is imported lazily because it loads TensorFlow's protos.
Both return `PredictResult` and raise `ClientError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from client.http import HTTPClient
from client.results import ClientError, ImagePrediction, ModelStatus, PredictResult, VersionStatus

if TYPE_CHECKING:
    from client.grpc import GRPCClient

__all__ = [
    "ClientError",
    "GRPCClient",
    "HTTPClient",
    "ImagePrediction",
    "ModelStatus",
    "PredictResult",
    "VersionStatus",
]


def __getattr__(name: str) -> Any:
    if name == "GRPCClient":
        from client.grpc import GRPCClient

        return GRPCClient
    raise AttributeError(f"module 'client' has no attribute {name!r}")
