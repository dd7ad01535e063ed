"""TensorFlow Serving over gRPC (tensorflow-serving-api stubs).

One channel per process, created on first use so each gunicorn worker opens its own after the
fork (a gRPC channel must not cross a fork), plaintext or TLS (optionally mutual).

Overload control (issue 13, item 5): every call carries the request deadline (capped by the
caller's `timeout_s`); only UNAVAILABLE from a lost connection is retried, with backoff, within the
deadline and within a retry budget (contract/overload.py). UNAVAILABLE because TF Serving's batching
queue is full is how it sheds load: it is never retried, the client gets 503 with Retry-After at
once. A circuit breaker stops calling a server that failed several calls in a row.

Messages of the exceptions raised here reach clients (serving/backend_call.py puts them in error
bodies), so they name no address, peer, file path or gRPC detail: those are logged here, under the
request id.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from contract.channel import channel_credentials, channel_options, open_channel
from contract.overload import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen, RetryBudget
from contract.request_id import METADATA_KEY as REQUEST_ID_METADATA
from contract.signatures import (
    ABSTAIN_KEY,
    CHANNELS,
    CLASSES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    OOD_SCORE_KEY,
    PROBABILITIES_KEY,
    SERVING_DEFAULT,
)
from contract.tensors import to_ndarray, to_tensor_proto
from serving import metrics, request_id, tracing
from serving.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Explanation,
    ModelStatus,
    Prediction,
    ood_fields,
    served_detail,
)
from serving.backends.explain import (
    explain_request,
    is_missing_signature,
    parse_explain_response,
    unsupported,
)
from serving.canary import (
    CANARY,
    SHADOW,
    SPLIT,
    STABLE,
    Comparisons,
    Labels,
    LabelsFile,
    Router,
    active_canary,
    observe,
    record_agreement,
    rollout,
)
from serving.errors import redact  # what /readyz shows of load errors: paths stay in the log

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # 64 images are 786 KB as float32; leave room for big batches
RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.4)  # then give up: a down backend answers 503 in well under 1 s
# TF Serving runs next to the gateway: a connect attempt needs far less than gRPC's 20 s default, and
# a short one lets a restarted server be used again within a second.
MIN_CONNECT_TIMEOUT_MS = 100
_AVAILABLE = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE
_END = get_model_status_pb2.ModelVersionStatus.State.END
# StatusProto.error_code uses TensorFlow's error codes, numbered as gRPC's.
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# TensorFlow's shared batch scheduler answers UNAVAILABLE "The batch scheduling queue to which this
# task was submitted is full" (…"is full; task size is N but scheduling capacity is only M" with
# large-batch splitting) when TF Serving's --enable_batching queue overflows: it is shedding load.
_SHEDDING = re.compile(r"batch scheduling queue .*is full", re.IGNORECASE)
SHED_RETRY_AFTER_S = 1
_BREAKER_LEVELS = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the gateway_breaker_state gauge
_TLS_HINT = (
    "if TF Serving serves TLS, set GATEWAY_TFSERVING_TLS_CA to the CA that signed its certificate; if it "
    "requires client certificates, also GATEWAY_TFSERVING_TLS_CERT and GATEWAY_TFSERVING_TLS_KEY"
)
log = logging.getLogger(__name__)


def is_shedding(code: grpc.StatusCode, details: str) -> bool:
    """True for TF Serving's answer when its batching queue is full (it sheds load)."""
    return code == grpc.StatusCode.UNAVAILABLE and bool(_SHEDDING.search(details))


class UnknownVersionLabel(BackendError):
    """TF Serving does not know a label labels.json names (yet: it re-reads models.config only every
    --model_config_file_poll_wait_seconds, and refuses labels on versions it has not loaded)."""


class RPCFailed(BackendError):
    """TF Serving answered an error: the message is safe for clients, `code` and `details` are not."""

    def __init__(self, message: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def _log(level: int, message: str, *args: object) -> None:
    log.log(level, "request_id=%s " + message, request_id.current(), *args)


def _request_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a call made for a request: its id, so logs and proxies on TF Serving's side (a
    service mesh's access log, Envoy's x-request-id) name the same id as the gateway's log and the
    client. Empty outside a request (start-up, background threads)."""
    current = request_id.current()
    return () if current is None else ((REQUEST_ID_METADATA, current),)


def _probabilities(proto: tensor_pb2.TensorProto) -> np.ndarray:
    if proto.dtype != types_pb2.DT_FLOAT:
        raise BackendError(
            f"TensorFlow Serving returned {PROBABILITIES_KEY} of dtype {proto.dtype}, not float32"
        )
    return to_ndarray(proto)


def optional_outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    """The out-of-distribution outputs the response carries, decoded. No output_filter is sent, so TF
    Serving answers every output of the signature: a version exported with `ood_score` and `abstain`
    returns them, an older one does not (and asking for them by name would fail its requests)."""
    decoded = {}
    for key in (OOD_SCORE_KEY, ABSTAIN_KEY):
        if key in response.outputs:
            try:
                decoded[key] = to_ndarray(response.outputs[key])
            except (TypeError, ValueError) as error:
                raise BackendError(f"TensorFlow Serving returned an unreadable {key!r}: {error}") from None
    return decoded


class TFServingBackend:
    kind = "tfserving"

    def __init__(
        self,
        address: str,
        model_name: str,
        *,
        signature_name: str = SERVING_DEFAULT,
        deadline_s: float = 5.0,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        breaker_failures: int = 5,
        breaker_open_s: float = 2.0,
        retry_budget_ratio: float = 0.1,
        labels_dir: str | Path | None = None,
        poll_interval_s: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.address = address
        self.model_name = model_name
        self.signature_name = signature_name
        self.deadline_s = deadline_s
        self._tls = {"ca_file": tls_ca, "cert_file": tls_cert, "key_file": tls_key}
        self.tls = any(value is not None for value in self._tls.values())
        if self.tls:
            channel_credentials(**self._tls)  # unreadable files fail the worker's start, not a request
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._class_names: tuple[str, ...] | None = None
        self._failed_logged: dict[int, str] = {}
        self._budget = RetryBudget(retry_budget_ratio)
        self.breaker = CircuitBreaker(breaker_failures, breaker_open_s, on_state_change=self._breaker_changed)
        metrics.BREAKER_STATE.labels(backend=self.kind).set(0)
        # Stable and canary (serving/canary.py): labels.json in MODEL_BASE/<name> (the volume TF Serving
        # reads) picks the version label each request carries; TF Serving resolves it through its
        # models.config's version_labels. No labels.json (or no labels_dir): no label, TF Serving's latest.
        self._labels_file = LabelsFile(Path(labels_dir)) if labels_dir is not None else None
        self._labels: Labels | None = None
        # The canary version whose label TF Serving refused last (its models.config not re-read yet):
        # its share goes to stable, so /v1/models does not call it the canary until it answers.
        self._canary_refused: int | None = None
        self._labels_read_at = -float("inf")
        self._labels_lock = threading.Lock()
        self.poll_interval_s = poll_interval_s
        self._router = Router(rng)
        self._comparisons = Comparisons()

    def _breaker_changed(self, state: str) -> None:
        metrics.BREAKER_STATE.labels(backend=self.kind).set(_BREAKER_LEVELS[state])
        metrics.BREAKER_TRANSITIONS.labels(backend=self.kind, state=state).inc()
        _log(
            logging.WARNING if state == OPEN else logging.INFO,
            "circuit breaker to TensorFlow Serving at %s is now %s",
            self.address,
            state,
        )

    def _stubs(
        self,
    ) -> tuple[prediction_service_pb2_grpc.PredictionServiceStub, model_service_pb2_grpc.ModelServiceStub]:
        with self._lock:
            if self._channel is None or self._pid != os.getpid():
                # With tracing on (serving/tracing.py), each call gets a client span and a traceparent.
                self._channel = tracing.traced_channel(
                    open_channel(
                        self.address,
                        channel_options(
                            max_message_bytes=MAX_MESSAGE_BYTES, min_connect_timeout_ms=MIN_CONNECT_TIMEOUT_MS
                        ),
                        **self._tls,
                    )
                )
                self._pid = os.getpid()
            return (
                prediction_service_pb2_grpc.PredictionServiceStub(self._channel),
                model_service_pb2_grpc.ModelServiceStub(self._channel),
            )

    def _call(self, method, request, timeout_s: float | None = None):
        """method(request) within min(deadline_s, timeout_s), through the breaker and the retry budget."""
        budget_s = self.deadline_s if timeout_s is None else min(self.deadline_s, timeout_s)
        deadline = time.monotonic() + budget_s
        try:
            self.breaker.before_call()
        except CircuitOpen as error:
            metrics.BACKEND_RETRIES.labels(backend=self.kind, decision="breaker_open").inc()
            raise BackendUnavailable(
                "TensorFlow Serving failed several calls in a row; the gateway pauses calls to it "
                "(circuit breaker open)",
                retry_after_s=error.retry_after_header,
            ) from None
        self._budget.record_call()
        # What this call says about the server, for the breaker: False for UNAVAILABLE (down, or
        # shedding load), True for any answer, None (neutral) for timeouts.
        healthy: bool | None = None
        metadata = _request_metadata()  # every attempt carries the request's id
        try:
            for attempt in range(len(RETRY_BACKOFF_S) + 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendTimeout(f"TensorFlow Serving did not answer within {budget_s:g} s")
                try:
                    response = method(request, timeout=remaining, metadata=metadata)
                except grpc.RpcError as error:
                    code, details = error.code(), error.details() or ""
                    if code == grpc.StatusCode.UNAVAILABLE and not is_shedding(code, details):
                        if self._may_retry(attempt, deadline):
                            time.sleep(RETRY_BACKOFF_S[attempt])
                            continue
                    # A timeout is neutral: deadlines already bound a slow server's cost (and a
                    # short remaining request budget says nothing about the server).
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        healthy = None
                    else:
                        healthy = code != grpc.StatusCode.UNAVAILABLE
                    raise self._failure(code, details, attempt + 1, budget_s) from None
                healthy = True
                return response
            raise AssertionError("unreachable")
        finally:
            self.breaker.record(healthy)

    def _may_retry(self, attempt: int, deadline: float) -> bool:
        """Retry a lost connection only with time for the backoff and room in the retry budget."""
        if attempt >= len(RETRY_BACKOFF_S) or deadline - time.monotonic() <= RETRY_BACKOFF_S[attempt]:
            metrics.BACKEND_RETRIES.labels(backend=self.kind, decision="budget_exhausted").inc()
            return False
        if not self._budget.try_retry():
            metrics.BACKEND_RETRIES.labels(backend=self.kind, decision="budget_exhausted").inc()
            _log(logging.INFO, "retry budget to TensorFlow Serving spent; not retrying")
            return False
        metrics.BACKEND_RETRIES.labels(backend=self.kind, decision="retried").inc()
        return True

    def _failure(self, code: grpc.StatusCode, details: str, attempts: int, budget_s: float) -> Exception:
        """The exception for a failed RPC, with a client-safe message; the details are logged."""
        where = f"TensorFlow Serving at {self.address} answered {code.name} after {attempts} attempt(s)"
        if is_shedding(code, details):
            metrics.BACKEND_RETRIES.labels(backend=self.kind, decision="load_shed").inc()
            _log(logging.WARNING, "%s (load shed, not retried): %s", where, details)
            return BackendUnavailable(
                "TensorFlow Serving is overloaded and shed this request",
                retry_after_s=SHED_RETRY_AFTER_S,
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = f"; {_TLS_HINT}" if self.tls or _looks_like_tls(details) else ""
            _log(logging.WARNING, "%s: %s%s", where, details, hint)
            return BackendUnavailable("TensorFlow Serving is unavailable")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            _log(logging.WARNING, "%s within %g s: %s", where, budget_s, details)
            return BackendTimeout(f"TensorFlow Serving did not answer within {budget_s:g} s")
        _log(logging.WARNING, "%s: %s", where, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT and "version label" in details:
            # server_core.cc: "Unrecognized servable version label: canary" (or labels not allowed).
            return UnknownVersionLabel(
                f"TensorFlow Serving has no version label the gateway's labels.json names for model "
                f"{self.model_name!r}: write labels with `python -m trainer.export promote|rollback|canary "
                "--serving-config` so its models.config's version_labels match, and start it with "
                "--allow_version_labels_for_unavailable_models"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return BackendUnavailable(
                f"TensorFlow Serving has no servable version of model {self.model_name!r}"
            )
        return RPCFailed(f"TensorFlow Serving answered {code.name}", code, details)

    def labels(self) -> Labels | None:
        """labels.json's labels, re-read at most once per poll interval (a stat when unchanged)."""
        if self._labels_file is None:
            return None
        # One reader at a time: a request arriving while another thread re-reads must get the labels
        # that read returns, not the ones before it (before the first read: None, TF Serving's latest).
        with self._labels_lock:
            now = time.monotonic()
            if now - self._labels_read_at >= self.poll_interval_s:
                self._labels = self._labels_file.read()
                self._labels_read_at = now
            return self._labels

    def predict(self, images: np.ndarray, *, timeout_s: float | None = None) -> Prediction:
        """Probabilities for uint8 [N, 32, 32, 3]; timeout_s caps the configured deadline.

        With labels.json, the request asks TF Serving for version_label "stable", or "canary" for
        canary_percent of requests (split); in shadow mode the user gets stable's answer and the
        canary runs on a copy afterwards, in the background (dropped under load)."""
        labels = self.labels()
        if labels is None:
            return self._predict_as(images, timeout_s, None, None)
        chosen = self._router.canary_chosen(labels)
        if chosen and labels.mode == SPLIT:
            try:
                prediction = self._predict_as(images, timeout_s, CANARY, labels.canary)
            except UnknownVersionLabel:  # TF Serving has not read the canary label yet: stable answers
                self._label_unknown(CANARY, "stable")
                return self._predict_stable(images, timeout_s, labels)
            self._compare_later(images, prediction, STABLE, labels.stable, CANARY)
            return prediction
        prediction = self._predict_stable(images, timeout_s, labels)
        if chosen:
            self._compare_later(images, prediction, CANARY, labels.canary, SHADOW)
        return prediction

    def _predict_stable(self, images: np.ndarray, timeout_s: float | None, labels: Labels) -> Prediction:
        try:
            return self._predict_as(images, timeout_s, STABLE, labels.stable)
        except UnknownVersionLabel:
            # Labels newly adopted and TF Serving's models.config not re-read yet: rather than fail
            # every request, ask without a label (TF Serving's latest loaded version), as before labels.
            self._label_unknown(STABLE, "its latest version")
            return self._predict_as(images, timeout_s, None, None)

    def _label_unknown(self, label: str, instead: str) -> None:
        metrics.VERSION_LABEL_UNKNOWN.labels(label=label).inc()
        _log(
            logging.WARNING,
            "TensorFlow Serving does not know version label %r of model %r (yet: it re-reads its "
            "models.config every poll); answered with %s instead",
            label,
            self.model_name,
            instead,
        )

    def _predict_as(
        self,
        images: np.ndarray,
        timeout_s: float | None,
        label: str | None,
        version: int | None,
        role: str = "",
    ) -> Prediction:
        """One Predict asking for `label` (None: TF Serving's latest), with per-version metrics."""
        role = role or label or STABLE
        started = time.monotonic()
        try:
            prediction = self._predict_labelled(images, timeout_s, label)
        except Exception as error:
            if label == CANARY and isinstance(error, UnknownVersionLabel):
                self._canary_refused = version  # split traffic and shadow copies alike
            observe(version, role, time.monotonic() - started, ok=False)
            raise
        if label == CANARY:
            self._canary_refused = None
        observe(prediction.model_version, role, time.monotonic() - started, ok=True)
        return prediction

    def _compare_later(
        self, images: np.ndarray, answered: Prediction, label: str, version: int | None, role: str
    ) -> None:
        """Predict `label` on a copy of `images` in the background and record the top-1 agreement of
        the non-stable answer with stable's (role canary: `label` is stable, re-run for comparison)."""
        rows = np.array(images, copy=True)

        def work() -> None:
            if role == CANARY:  # the canary answered; stable's answer is the reference, not traffic
                stable = self._predict_labelled(rows, self.deadline_s, STABLE)
                record_agreement(answered.model_version, CANARY, stable.probabilities, answered.probabilities)
            else:
                shadow = self._predict_as(rows, self.deadline_s, label, version, role=SHADOW)
                record_agreement(shadow.model_version, SHADOW, answered.probabilities, shadow.probabilities)

        self._comparisons.submit(work)

    def _predict_labelled(self, images: np.ndarray, timeout_s: float | None, label: str | None) -> Prediction:
        predict_stub, _ = self._stubs()
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature_name
        if label is not None:  # resolved by TF Serving through its models.config's version_labels
            request.model_spec.version_label = label
        request.inputs[IMAGES_KEY].CopyFrom(to_tensor_proto(np.asarray(images, dtype=np.float32)))
        response = self._call(predict_stub.Predict, request, timeout_s)
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
            **ood_fields(optional_outputs(response), len(images)),  # absent for older versions
        )

    def explain(
        self, images: np.ndarray, class_index: int | None = None, *, timeout_s: float | None = None
    ) -> Explanation:
        """Grad-CAM heatmaps from the `explain` signature, over gRPC (class_index None = top class);
        timeout_s caps the configured deadline."""
        predict_stub, _ = self._stubs()
        request = explain_request(self.model_name, images, class_index)
        if self.labels() is not None:  # explanations come from the version users get: stable
            request.model_spec.version_label = STABLE
        try:
            try:
                response = self._call(predict_stub.Predict, request, timeout_s)
            except UnknownVersionLabel:  # not in TF Serving's models.config yet: its latest, as predict
                self._label_unknown(STABLE, "its latest version")
                request.model_spec.ClearField("version_label")
                response = self._call(predict_stub.Predict, request, timeout_s)
        except RPCFailed as error:
            if is_missing_signature(BackendError(f"{error.code.name}: {error.details}")):
                raise unsupported(
                    self.model_name, "on TensorFlow Serving", "the served version lacks it"
                ) from None
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
        labels = self.labels()
        # With labels the stable version is the one served to users (max would be the canary).
        version = labels.stable if labels is not None and labels.stable in available else max(available)
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
        if failed != self._failed_logged:  # the full text (paths included) once, in the log
            self._failed_logged = failed
            for number, error in sorted(failed.items()):
                _log(
                    logging.WARNING, "model %r version %d failed to load: %s", self.model_name, number, error
                )
        failed = {number: redact(error) for number, error in failed.items()}
        detail = served_detail(f"version {version} AVAILABLE", failed)
        # A canary TF Serving has not loaded gets no traffic (its label is unknown there: stable answers).
        canary = active_canary(labels) if labels is not None else None
        answering = canary in available and canary != self._canary_refused
        routed = rollout(labels, version, canary if answering else None)
        return ModelStatus(True, self.model_name, version, self._class_names, detail, failed, routed)

    def close(self) -> None:
        self._comparisons.close()
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def _looks_like_tls(details: str) -> bool:
    lowered = details.lower()
    return any(word in lowered for word in ("ssl", "tls", "handshake", "certificate", "socket closed"))
