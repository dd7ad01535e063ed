"""Client for TensorFlow Serving's gRPC API (PredictionService, ModelService).

Two ways to predict, one per exported signature (docs/architecture.md):
  * pixels (`serving_default`): images are decoded and resized here exactly as the gateway does,
    and sent as float32 [N, 32, 32, 3];
  * bytes (`serving_bytes`): the encoded files are sent as a string tensor and decoded in the graph.
Input and output keys are read from GetModelMetadata's SignatureDefs, not assumed: the one input
of the signature, the float output as probabilities and the string output as class labels; models
exported with the out-of-distribution outputs (issue 17) also answer `ood_score` and `abstain`, which
results carry (None from older models).

Retries on UNAVAILABLE are gRPC's own (a service-config retryPolicy, contract/channel.py), so they
happen inside the call's deadline and back off with jitter, without any hand-written loop; gRPC's
retry throttling stops them while most recent attempts to the server failed (no retry storm).

TLS: `ca_file` (or `tls=True` for the system roots) authenticates the server; `cert_file` and
`key_file` add a client certificate for a server that requires one (mutual TLS).

Every Predict carries a request id in its gRPC metadata (`x-request-id`, as the gateway sends its
own): the caller's `request_id=`, else a fresh uuid4 hex. A failed call's message names it, so the
server's operators can find the call in their logs (a service mesh's access log, Envoy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from client.images import ImageInput, read_image, to_pixels
from client.results import ClientError, ModelStatus, PredictResult, VersionStatus, check_request_id, rank
from contract.channel import (
    MAX_MESSAGE_BYTES,
    TLSConfigError,
    channel_options,
    open_channel,
    retry_service_config,
)
from contract.request_id import METADATA_KEY as REQUEST_ID_METADATA
from contract.request_id import new_id
from contract.signatures import ABSTAIN_KEY, DEFAULT_TOP_K, OOD_SCORE_KEY
from contract.signatures import SERVING_BYTES as BYTES_SIGNATURE
from contract.signatures import SERVING_DEFAULT as PIXELS_SIGNATURE
from contract.tensors import to_ndarray, to_tensor_proto

# What to tell the user for each failure; the server's own detail is appended.
_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is TensorFlow Serving running at that address?",
    grpc.StatusCode.NOT_FOUND: "check the model name and version the server loads",
    grpc.StatusCode.FAILED_PRECONDITION: "the model lacks that signature; re-export it or use the other mode",
    grpc.StatusCode.INVALID_ARGUMENT: "the request does not fit the model's signature",
}


@dataclass(frozen=True)
class _SignatureKeys:
    input_key: str
    input_dtype: int
    probabilities_key: str
    classes_key: str
    # Optional outputs by their contract names (contract/signatures.py), present in newer exports.
    ood_keys: tuple[str, ...] = ()


def _signature_keys(name: str, signature: meta_graph_pb2.SignatureDef) -> _SignatureKeys:
    if len(signature.inputs) != 1:
        raise ClientError(
            "unexpected_signature",
            f"signature {name!r} takes inputs {sorted(signature.inputs)}; expected one",
        )
    ((input_key, input_info),) = signature.inputs.items()
    ood_keys = tuple(k for k in (OOD_SCORE_KEY, ABSTAIN_KEY) if k in signature.outputs)
    outputs = {k: v for k, v in signature.outputs.items() if k not in ood_keys}
    floats = [k for k, v in outputs.items() if v.dtype == types_pb2.DT_FLOAT]
    strings = [k for k, v in outputs.items() if v.dtype == types_pb2.DT_STRING]
    if len(floats) != 1 or len(strings) != 1:
        raise ClientError(
            "unexpected_signature",
            f"signature {name!r} has outputs {sorted(signature.outputs)}; expected one float32 "
            "(probabilities) and one string (class labels) output",
        )
    return _SignatureKeys(input_key, input_info.dtype, floats[0], strings[0], ood_keys)


class GRPCClient:
    def __init__(
        self,
        address: str,
        model_name: str = "cifar10",
        *,
        version: int | None = None,
        timeout: float = 10.0,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        max_attempts: int = 5,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 1.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        options = channel_options(
            max_message_bytes=max_message_bytes,
            service_config=retry_service_config(max_attempts, initial_backoff_s, max_backoff_s),
        )
        self.tls = tls or any(f is not None for f in (ca_file, cert_file, key_file))
        try:
            self._channel = open_channel(
                address, options, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file
            )
        except TLSConfigError as error:
            raise ClientError("tls_config", str(error)) from None
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._keys: dict[str, _SignatureKeys] = {}

    def __enter__(self) -> GRPCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None, request_id: str | None = None):
        seconds = self.timeout if timeout is None else timeout
        if request_id:
            check_request_id(request_id)
        metadata = ((REQUEST_ID_METADATA, request_id),) if request_id else None
        try:
            return method(request, timeout=seconds, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code()
            hint = _HINTS.get(code, "")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                hint = f"no answer within {seconds} s; raise the timeout or send fewer images"
            elif code == grpc.StatusCode.UNAVAILABLE:
                hint = _unavailable_hint(error.details() or "", self.tls)
            raise ClientError(
                code.name.lower(),
                f"TensorFlow Serving at {self.address} answered {code.name}: {error.details()}"
                + (f" ({hint})" if hint else "")
                + (f" (request_id {request_id})" if request_id else ""),
            ) from None

    def _spec(self, model_spec, signature_name: str = "") -> None:
        model_spec.name = self.model_name
        if self.version is not None:
            model_spec.version.value = self.version
        if signature_name:
            model_spec.signature_name = signature_name

    def signature_defs(
        self, *, timeout: float | None = None, request_id: str | None = None
    ) -> dict[str, meta_graph_pb2.SignatureDef]:
        """GetModelMetadata: the model's SignatureDefs by name."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec)
        response = self._call(self._predict.GetModelMetadata, request, timeout, request_id)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signatures):
            raise ClientError("bad_response", "GetModelMetadata answered without a SignatureDefMap")
        return dict(signatures.signature_def)

    def model_status(self, *, timeout: float | None = None) -> ModelStatus:
        """GetModelStatus: every version the server knows and its state."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request, timeout)
        states = get_model_status_pb2.ModelVersionStatus.State
        return ModelStatus(
            model_name=self.model_name,
            versions=[
                VersionStatus(int(s.version), states.Name(s.state), s.status.error_message)
                for s in response.model_version_status
            ],
        )

    def _signature(self, name: str, timeout: float | None, request_id: str | None = None) -> _SignatureKeys:
        if name not in self._keys:  # read once per signature, as part of the first predict that needs it
            signatures = self.signature_defs(timeout=timeout, request_id=request_id)
            if name not in signatures:
                raise ClientError(
                    "signature_not_found",
                    f"model {self.model_name!r} has no signature {name!r}; it has {sorted(signatures)}",
                )
            self._keys[name] = _signature_keys(name, signatures[name])
        return self._keys[name]

    def predict(
        self,
        images: Sequence[ImageInput],
        *,
        top_k: int = DEFAULT_TOP_K,
        use_bytes: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> PredictResult:
        """Classify images (paths or (filename, bytes) pairs) in one Predict call, sent with
        `request_id` (default: a fresh uuid4 hex) in its metadata."""
        if not images:
            raise ClientError("no_images", "pass at least one image")
        request_id = request_id or new_id()
        signature_name = BYTES_SIGNATURE if use_bytes else PIXELS_SIGNATURE
        keys = self._signature(signature_name, timeout, request_id)
        files = [read_image(image) for image in images]
        if use_bytes:
            expected, tensor = types_pb2.DT_STRING, np.array([data for _, data in files], dtype=object)
        else:
            pixels = np.stack([to_pixels(name, data) for name, data in files]).astype(np.float32)
            expected, tensor = types_pb2.DT_FLOAT, pixels
        if keys.input_dtype != expected:
            raise ClientError(
                "unexpected_signature",
                f"signature {signature_name!r} input {keys.input_key!r} has dtype "
                f"{types_pb2.DataType.Name(keys.input_dtype)}, not {types_pb2.DataType.Name(expected)}",
            )
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature_name)
        request.inputs[keys.input_key].CopyFrom(to_tensor_proto(tensor))
        response = self._call(self._predict.Predict, request, timeout, request_id)
        try:
            probabilities_proto = response.outputs[keys.probabilities_key]
            classes_proto = response.outputs[keys.classes_key]
            if probabilities_proto.dtype != types_pb2.DT_FLOAT:
                raise ValueError(f"{keys.probabilities_key!r} is not float32")
            probabilities = to_ndarray(probabilities_proto)
            ood = {key: to_ndarray(response.outputs[key]) for key in keys.ood_keys}
        except (KeyError, TypeError, ValueError) as error:
            raise ClientError(
                "bad_response", f"Predict answered without the signature's outputs: {error}"
            ) from None
        if probabilities.shape[:1] != (len(files),) or probabilities.ndim != 2:
            raise ClientError(
                "bad_response", f"Predict answered probabilities of shape {probabilities.shape}"
            )
        num_classes = probabilities.shape[1]
        labels = [s.decode("utf-8") for s in classes_proto.string_val]
        # The classes output is [N, C] (one row per image); every row is the same list of labels.
        rows = [labels[i * num_classes : (i + 1) * num_classes] for i in range(len(files))]
        if any(len(row) != num_classes for row in rows):
            raise ClientError("bad_response", "Predict answered fewer class labels than probabilities")
        if any(value.shape != (len(files),) for value in ood.values()):
            shapes = {key: value.shape for key, value in ood.items()}
            raise ClientError(
                "bad_response", f"Predict answered out-of-distribution outputs of shapes {shapes}"
            )
        ood_score, abstain = ood.get(OOD_SCORE_KEY), ood.get(ABSTAIN_KEY)
        return PredictResult(
            model_name=response.model_spec.name or self.model_name,
            model_version=int(response.model_spec.version.value),
            images=[
                rank(
                    name,
                    row,
                    probabilities[i].tolist(),
                    top_k,
                    ood_score=None if ood_score is None else float(ood_score[i]),
                    abstain=None if abstain is None else bool(abstain[i]),
                )
                for i, ((name, _), row) in enumerate(zip(files, rows, strict=True))
            ],
        )


def _unavailable_hint(details: str, tls: bool) -> str:
    """Why a server may be unreachable: not running, overloaded, or TLS set up differently on each side."""
    if "is full" in details:
        return "the server is overloaded (its batching queue is full); retry later, with fewer requests"
    lowered = details.lower()
    if any(word in lowered for word in ("ssl", "handshake", "certificate", "socket closed", "tls")):
        if tls:
            return (
                "the TLS handshake failed: does --ca-file hold the CA that signed the server's "
                "certificate, does the server serve TLS, and does it require a client certificate "
                "(--cert-file, --key-file)?"
            )
        return "is the server using TLS? then pass --tls or --ca-file (and --cert-file/--key-file for mTLS)"
    return _HINTS[grpc.StatusCode.UNAVAILABLE]
