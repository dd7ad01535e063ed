"""TensorFlow Serving over gRPC (tensorflow-serving-api stubs).

One channel per process, created on first use so each gunicorn worker opens its own after the
fork (a gRPC channel must not cross a fork). Every call carries the request deadline; only
UNAVAILABLE is retried, with backoff, and never past the deadline.
"""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from contract.channel import channel_options, open_channel
from contract.signatures import (
    CHANNELS,
    CLASSES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    PROBABILITIES_KEY,
    SERVING_DEFAULT,
)
from contract.tensors import to_ndarray, to_tensor_proto
from serving.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Explanation,
    ModelStatus,
    Prediction,
    served_detail,
)
from serving.backends.explain import (
    explain_request,
    is_missing_signature,
    parse_explain_response,
    unsupported,
)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # 64 images are 786 KB as float32; leave room for big batches
RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.4)  # then give up: a down backend answers 503 in well under 1 s
# TF Serving runs next to the gateway: a connect attempt needs far less than gRPC's 20 s default, and
# a short one lets a restarted server be used again within a second.
MIN_CONNECT_TIMEOUT_MS = 100
_AVAILABLE = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE
_END = get_model_status_pb2.ModelVersionStatus.State.END
# StatusProto.error_code uses TensorFlow's error codes, numbered as gRPC's.
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _probabilities(proto: tensor_pb2.TensorProto) -> np.ndarray:
    if proto.dtype != types_pb2.DT_FLOAT:
        raise BackendError(
            f"TensorFlow Serving returned {PROBABILITIES_KEY} of dtype {proto.dtype}, not float32"
        )
    return to_ndarray(proto)


class TFServingBackend:
    kind = "tfserving"

    def __init__(
        self,
        address: str,
        model_name: str,
        *,
        signature_name: str = SERVING_DEFAULT,
        deadline_s: float = 5.0,
    ) -> None:
        self.address = address
        self.model_name = model_name
        self.signature_name = signature_name
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._class_names: tuple[str, ...] | None = None

    def _stubs(
        self,
    ) -> tuple[prediction_service_pb2_grpc.PredictionServiceStub, model_service_pb2_grpc.ModelServiceStub]:
        with self._lock:
            if self._channel is None or self._pid != os.getpid():
                self._channel = open_channel(
                    self.address,
                    channel_options(
                        max_message_bytes=MAX_MESSAGE_BYTES, min_connect_timeout_ms=MIN_CONNECT_TIMEOUT_MS
                    ),
                )
                self._pid = os.getpid()
            return (
                prediction_service_pb2_grpc.PredictionServiceStub(self._channel),
                model_service_pb2_grpc.ModelServiceStub(self._channel),
            )

    def _call(self, method, request):
        deadline = time.monotonic() + self.deadline_s
        for attempt in range(len(RETRY_BACKOFF_S) + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTimeout(
                    f"TensorFlow Serving at {self.address} did not answer within {self.deadline_s} s"
                )
            try:
                return method(request, timeout=remaining)
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    if (
                        attempt < len(RETRY_BACKOFF_S)
                        and deadline - time.monotonic() > RETRY_BACKOFF_S[attempt]
                    ):
                        time.sleep(RETRY_BACKOFF_S[attempt])
                        continue
                    raise BackendUnavailable(
                        f"TensorFlow Serving at {self.address} is unavailable ({error.details()})"
                    ) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise BackendTimeout(
                        f"TensorFlow Serving at {self.address} did not answer within {self.deadline_s} s"
                    ) from None
                if code == grpc.StatusCode.NOT_FOUND:
                    raise BackendUnavailable(
                        f"TensorFlow Serving has no servable version of model {self.model_name!r} "
                        f"({error.details()})"
                    ) from None
                raise BackendError(f"TensorFlow Serving answered {code.name}: {error.details()}") from None
        raise AssertionError("unreachable")

    def predict(self, images: np.ndarray) -> Prediction:
        predict_stub, _ = self._stubs()
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature_name
        request.inputs[IMAGES_KEY].CopyFrom(to_tensor_proto(np.asarray(images, dtype=np.float32)))
        response = self._call(predict_stub.Predict, request)
        try:
            probabilities = _probabilities(response.outputs[PROBABILITIES_KEY])
            classes_proto = response.outputs[CLASSES_KEY]
        except (KeyError, ValueError) as error:
            raise BackendError(f"TensorFlow Serving response lacks the contract's outputs: {error}") from None
        if probabilities.ndim != 2 or probabilities.shape[0] != len(images):
            raise BackendError(f"TensorFlow Serving returned probabilities of shape {probabilities.shape}")
        num_classes = probabilities.shape[1]
        class_names = tuple(s.decode("utf-8") for s in classes_proto.string_val[:num_classes])
        if len(class_names) != num_classes:
            raise BackendError("TensorFlow Serving returned fewer class names than probabilities")
        self._class_names = class_names
        return Prediction(
            probabilities=probabilities,
            class_names=class_names,
            model_name=response.model_spec.name or self.model_name,
            model_version=int(response.model_spec.version.value),
        )

    def explain(self, images: np.ndarray, class_index: int | None = None) -> Explanation:
        """Grad-CAM heatmaps from the `explain` signature, over gRPC (class_index None = top class)."""
        predict_stub, _ = self._stubs()
        try:
            response = self._call(predict_stub.Predict, explain_request(self.model_name, images, class_index))
        except BackendError as error:
            if is_missing_signature(error):
                raise unsupported(self.model_name, "on TensorFlow Serving", str(error)) from None
            raise
        return parse_explain_response(response, len(images), self.model_name)

    def status(self) -> ModelStatus:
        """Ready only when some version is AVAILABLE: the status call itself succeeds with none loaded."""
        _, model_stub = self._stubs()
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = self._call(model_stub.GetModelStatus, request)
        except (BackendUnavailable, BackendTimeout, BackendError) as error:
            return ModelStatus(False, self.model_name, None, None, str(error))
        available = [s.version for s in response.model_version_status if s.state == _AVAILABLE]
        if not available:
            states = ", ".join(
                f"{s.version}: {get_model_status_pb2.ModelVersionStatus.State.Name(s.state)}"
                for s in response.model_version_status
            )
            return ModelStatus(
                False, self.model_name, None, None, f"no version AVAILABLE ({states or 'none'})"
            )
        version = max(available)
        if self._class_names is None:
            # Class names travel only with predictions; one probe image learns them once.
            try:
                self.predict(np.zeros((1, INPUT_SIZE, INPUT_SIZE, CHANNELS), np.uint8))
            except (BackendUnavailable, BackendTimeout, BackendError) as error:
                return ModelStatus(False, self.model_name, version, None, f"probe prediction failed: {error}")
        # TF Serving keeps the old version when a newer one fails to load (END with an error).
        failed = {
            s.version: f"{_CODE_NAMES.get(s.status.error_code, s.status.error_code)}: "
            f"{s.status.error_message}"[:500]
            for s in response.model_version_status
            if s.version > version and s.state == _END and s.status.error_code != 0
        }
        detail = served_detail(f"version {version} AVAILABLE", failed)
        return ModelStatus(True, self.model_name, version, self._class_names, detail, failed)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
