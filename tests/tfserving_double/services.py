"""gRPC servicers for TensorFlow Serving's PredictionService and ModelService, on the real stubs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.tfserving_double.models import ModelRegistry
from tests.tfserving_double.servable import ServingError

SIGNATURE_DEF_FIELD = "signature_def"  # the only metadata field TF Serving supports
# grpc_status_util.cc ToGRPCStatus: longer messages are cut here and marked.
ERROR_MESSAGE_LIMIT = 1024
# TensorFlow's shared_batch_scheduler.h, verbatim: what TF Serving with --enable_batching answers
# (UNAVAILABLE) when its batching queue is full, i.e. when it sheds load.
QUEUE_FULL_MESSAGE = "The batch scheduling queue to which this task was submitted is full"


def _model_spec(request):
    """The three *_impl.cc entry points: INVALID_ARGUMENT only when the field is absent altogether."""
    if not request.HasField("model_spec"):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    return request.model_spec


def _servable_request(model_spec, registry: ModelRegistry) -> tuple[str, int | None]:
    """server_core.cc ServableRequestFromModelSpec (Predict and GetModelMetadata; not GetModelStatus).

    `version` and `version_label` are one proto oneof (version_choice): a spec carries at most one of
    them (setting one clears the other, and on the wire the last one sent wins)."""
    if not model_spec.name:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version_label":
        # Resolved through the models.config's version_labels (an empty map without a config file):
        # then served as ServableRequest::Specific(name, version).
        return model_spec.name, registry.version_for_label(model_spec.name, model_spec.version_label)
    return model_spec.name, (model_spec.version.value if choice == "version" else None)


def _truncated(message: str) -> str:
    raw = message.encode()
    if len(raw) <= ERROR_MESSAGE_LIMIT:
        return message
    return raw[:ERROR_MESSAGE_LIMIT].decode(errors="ignore") + "...TRUNCATED"


class Faults:
    """Misbehaviour the tests switch on, shared by all servicers; also counts the calls received."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.calls = 0
        self._unavailable_left = 0
        self._shed_left = 0
        self._lock = threading.Lock()

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._unavailable_left = count

    def shed_next(self, count: int) -> None:
        with self._lock:
            self._shed_left = count

    def on_call(self) -> str | None:
        """Count a call; the UNAVAILABLE message it must be answered with, or None."""
        with self._lock:
            self.calls += 1
            if self._shed_left > 0:
                self._shed_left -= 1
                return QUEUE_FULL_MESSAGE
            if self._unavailable_left > 0:
                self._unavailable_left -= 1
                return "Server is shutting down (tfserving double fault)"
            return None


class _Base:
    def __init__(self, registry: ModelRegistry, faults: Faults) -> None:
        self._registry = registry
        self._faults = faults

    def _handle(self, context: grpc.ServicerContext, work: Callable[[], object]):
        unavailable = self._faults.on_call()
        if unavailable is not None:
            # A server shutting down (clients may retry elsewhere) or shedding load (they must not).
            context.abort(grpc.StatusCode.UNAVAILABLE, unavailable)
        if self._faults.delay_s > 0:
            time.sleep(self._faults.delay_s)  # a slow server: the client's deadline decides the outcome
        try:
            return work()
        except ServingError as err:
            context.abort(err.code, _truncated(err.message))


class PredictionServicer(_Base, prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext):
        def work() -> predict_pb2.PredictResponse:
            name, version = _servable_request(_model_spec(request), self._registry)
            servable = self._registry.get(name, version)
            outputs = servable.predict(
                request.model_spec.signature_name, request.inputs, request.output_filter
            )
            response = predict_pb2.PredictResponse()
            response.model_spec.name = name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
            for alias, proto in outputs.items():
                response.outputs[alias].CopyFrom(proto)
            return response

        return self._handle(context, work)

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ):
        def work() -> get_model_metadata_pb2.GetModelMetadataResponse:
            # get_model_metadata_impl.cc: the spec's presence, then the fields, then the servable.
            model_spec = _model_spec(request)
            if not request.metadata_field:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            for field in request.metadata_field:
                if field != SIGNATURE_DEF_FIELD:
                    # Verbatim: the server builds this with errors::InvalidArgument(
                    # "Metadata field %s is not supported", field), which concatenates (StrCat),
                    # so the "%s" stays and the field name follows "supported" directly.
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field %s is not supported{field}"
                    )
            name, version = _servable_request(model_spec, self._registry)
            servable = self._registry.get(name, version)
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for key, signature in servable.signature_defs.items():
                signature_map.signature_def[key].CopyFrom(signature)
            packed = any_pb2.Any()
            packed.Pack(signature_map)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = name
            response.model_spec.version.value = servable.version
            response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(packed)
            return response

        return self._handle(context, work)


class ModelServicer(_Base, model_service_pb2_grpc.ModelServiceServicer):
    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ):
        def work() -> get_model_status_pb2.GetModelStatusResponse:
            # get_model_status_impl.cc asks the ServableStateMonitor directly: no name check (an
            # empty name is just a model with no versions) and no labels (a version_label is
            # ignored and every version is listed).
            model_spec = _model_spec(request)
            name = model_spec.name
            version = model_spec.version.value if model_spec.HasField("version") else None
            response = get_model_status_pb2.GetModelStatusResponse()
            for number, state in sorted(self._registry.status(name, version).items(), reverse=True):
                entry = response.model_version_status.add()
                entry.version = number
                entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
                entry.status.error_code = state.error_code.value[0]
                entry.status.error_message = state.error_message
            return response

        return self._handle(context, work)
