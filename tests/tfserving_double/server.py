"""The TensorFlow Serving test double: a real grpc.server on a real port, watching a model base dir.

Failure controls for client and gateway tests:
  * `set_down(True)` stops the gRPC server, so callers get connection refused (UNAVAILABLE), as when
    the real server's pod is gone; `set_down(False)` starts it again on the same port.
  * `set_delay(seconds)` makes every RPC wait that long before answering (a slow server).
  * `fail_next(n)` answers the next n RPCs with UNAVAILABLE (a server shutting down), and `calls`
    counts the RPCs received, so retry policies can be checked attempt by attempt.
  * `shed_next(n)` answers the next n RPCs UNAVAILABLE with the real batching queue's "is full"
    message: TF Serving shedding load, which callers must not retry.
  * `received` lists the calls received with their gRPC metadata (tests/tfserving_double/recording.py),
    e.g. the gateway's `x-request-id` and `traceparent`.
  * `tls_key_and_cert` serves TLS only; with `tls_client_ca` too, clients must present a certificate
    that CA signed (mutual TLS), as TF Serving's --ssl_config_file with client_verify does.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tests.tfserving_double.models import ModelRegistry
from tests.tfserving_double.recording import MetadataRecorder, ReceivedCall
from tests.tfserving_double.services import Faults, ModelServicer, PredictionServicer

# The real server accepts large batches; grpc's 4 MiB default would reject them first.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class TFServingDouble:
    def __init__(
        self,
        model_base: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        poll_interval_s: float = 0.5,
        all_versions: bool = False,
        model_config: str | Path | None = None,
        allow_version_labels_for_unavailable_models: bool = False,
        workers: int = 8,
        tls_key_and_cert: tuple[bytes, bytes] | None = None,
        tls_client_ca: bytes | None = None,
    ) -> None:
        # model_config: TF Serving's --model_config_file (models, policies, version_labels), re-read
        # on every poll; without it the double serves model_base's directories, latest version only.
        self.registry = ModelRegistry(
            Path(model_base),
            all_versions=all_versions,
            model_config=Path(model_config) if model_config is not None else None,
            allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
        )
        self.host = host
        self.port = port
        self.poll_interval_s = poll_interval_s
        self._workers = workers
        self._tls = tls_key_and_cert  # PEM private key and certificate chain: serve TLS only
        self._tls_client_ca = tls_client_ca  # PEM CA: require client certificates it signed
        self.faults = Faults()
        self.recorder = MetadataRecorder()  # kept across set_down: one record for the double's life
        self._server: grpc.Server | None = None
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None
        self._state_lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_down(self) -> bool:
        return self._server is None

    def start(self) -> TFServingDouble:
        """Load what is on disk (so the first request finds the model), then listen and poll."""
        self.registry.refresh()
        self._start_server()
        self._poller = threading.Thread(target=self._poll, name="tfserving-double-poll", daemon=True)
        self._poller.start()
        return self

    def stop(self) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
        self._stop_server()
        self.registry.close()

    def __enter__(self) -> TFServingDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_down(self, down: bool) -> None:
        with self._state_lock:
            if down and self._server is not None:
                self._stop_server()
            elif not down and self._server is None:
                self._start_server()

    def set_delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {seconds}")
        self.faults.delay_s = float(seconds)

    def fail_next(self, count: int) -> None:
        self.faults.fail_next(count)

    def shed_next(self, count: int) -> None:
        self.faults.shed_next(count)

    @property
    def calls(self) -> int:
        return self.faults.calls

    @property
    def received(self) -> list[ReceivedCall]:
        """The calls received so far (the newest 1000), oldest first, with their metadata."""
        return self.recorder.calls()

    def _start_server(self) -> None:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="tfserving-double"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            interceptors=[self.recorder],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.registry, self.faults), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.registry, self.faults), server
        )
        if self._tls is not None:
            credentials = grpc.ssl_server_credentials(
                [self._tls],
                root_certificates=self._tls_client_ca,
                require_client_auth=self._tls_client_ca is not None,
            )
            bound = server.add_secure_port(self.address, credentials)
        else:
            bound = server.add_insecure_port(self.address)
        if bound == 0:
            raise OSError(f"tfserving double could not bind {self.address}: port in use?")
        self.port = bound  # port 0 asks the OS; keep the real one so a restart reuses it
        server.start()
        self._server = server

    def _stop_server(self) -> None:
        if self._server is not None:
            # No grace: in-flight calls fail at once, like a killed server process.
            self._server.stop(grace=None).wait()
            self._server = None

    def _poll(self) -> None:
        while not self._stop_polling.wait(self.poll_interval_s):
            try:
                self.registry.refresh()
            except OSError:
                continue  # the directory is being rewritten; look again next tick
