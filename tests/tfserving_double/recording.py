"""What the double received besides the request messages: each call's method and gRPC metadata.

A server interceptor sees them before any servicer runs, as a tool on TF Serving's side would (a
tracing interceptor, a service mesh proxy): tests read `TFServingDouble.received` to check that the
gateway sent its request id (`x-request-id`) and, with tracing on, the W3C trace context
(`traceparent`). Calls refused by a fault (down, fail_next, shed_next) are recorded too; a stopped
server records nothing.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import grpc

KEPT_CALLS = 1000  # the newest calls; enough for any one test, bounded for session-long doubles


@dataclass(frozen=True)
class ReceivedCall:
    method: str  # the full gRPC method, e.g. "/tensorflow.serving.PredictionService/Predict"
    metadata: dict[str, str]  # the call's metadata (keys lower case, as gRPC carries them)


class MetadataRecorder(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self._calls: deque[ReceivedCall] = deque(maxlen=KEPT_CALLS)
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        metadata = {item.key: item.value for item in handler_call_details.invocation_metadata or ()}
        with self._lock:
            self._calls.append(ReceivedCall(handler_call_details.method, metadata))
        return continuation(handler_call_details)

    def calls(self) -> list[ReceivedCall]:
        """The calls received, oldest first."""
        with self._lock:
            return list(self._calls)

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()
