"""gRPC channels to TensorFlow Serving: message limits, reconnect backoff, retries and TLS in one place.

The gateway's TF Serving backend and the gRPC client open their channels here. What they choose
differently stays a parameter:
  * the message limit (the gateway sends whole request batches; the client documents 64 MiB);
  * the connect timeout: the gateway talks to a TF Serving next to it and gives each connect attempt
    as little as `min_connect_timeout_ms`, so a restarted server is used again within a second; a
    client may cross a slow network and keeps gRPC's own 20 s;
  * retries: the client lets gRPC retry UNAVAILABLE (`retry_service_config`, throttled by gRPC's
    retryThrottling so a failing server sees few retries); the gateway retries in its own loop,
    within the request deadline and a retry budget (serving/backends/tfserving.py);
  * TLS: server-authenticated (a CA file, or the system roots) and optionally mutual (a client
    certificate and key), the same for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC's 4 MiB default is ~1300 CIFAR images as float32
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
# After an outage gRPC would wait up to 2 minutes between reconnects; come back within ~1 s.
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1000

ChannelOptions = list[tuple[str, int | str]]


# gRPC's retry throttling (gRFC A6): a channel holds max_tokens; each failed attempt takes 1, each
# success gives back token_ratio; retries stop while fewer than half the tokens are left. So after
# a handful of consecutive failures retries stop until successes (about 10 % of them) earn them back.
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}


def retry_service_config(max_attempts: int, initial_backoff_s: float, max_backoff_s: float) -> str:
    """gRPC service config retrying UNAVAILABLE on both TF Serving services (gRPC caps attempts at 5),
    with retry throttling, so a server that sheds load is not hit by every caller's retries."""
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": f"{initial_backoff_s}s",
        "maxBackoff": f"{max_backoff_s}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps(
        {
            "methodConfig": [{"name": [{"service": s} for s in SERVICES], "retryPolicy": policy}],
            "retryThrottling": RETRY_THROTTLING,
        }
    )


def channel_options(
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    service_config: str | None = None,
    min_connect_timeout_ms: int | None = None,
) -> ChannelOptions:
    """Options for a channel to TF Serving: both message limits raised, reconnects within ~1 s.

    service_config: e.g. retry_service_config(...), which also turns gRPC's retries on.
    min_connect_timeout_ms: gRPC's `min_reconnect_backoff_ms`, which despite its name is the least
    time a connect attempt is given (default 20 s); only for a server on a fast, near network.
    """
    options: ChannelOptions = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if service_config is not None:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", service_config)]
    options.append(("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS))
    if min_connect_timeout_ms is not None:
        options.append(("grpc.min_reconnect_backoff_ms", min_connect_timeout_ms))
    options.append(("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS))
    return options


class TLSConfigError(ValueError):
    """A TLS file for the channel is missing or unreadable; the message names it and the fix."""


def _read(kind: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TLSConfigError(f"cannot read the TLS {kind} file {path}: {error.strerror}") from None


def channel_credentials(
    *,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: trust ca_file (None: the system roots); with cert_file and key_file, also
    present that client certificate (mutual TLS, for a server that requires client certificates)."""
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError(
            "mutual TLS needs both a client certificate and its private key; pass both or neither"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_read("CA", ca_file) if ca_file is not None else None,
        private_key=_read("client key", key_file) if key_file is not None else None,
        certificate_chain=_read("client certificate", cert_file) if cert_file is not None else None,
    )


def open_channel(
    address: str,
    options: ChannelOptions,
    *,
    tls: bool = False,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.Channel:
    """A channel to address; TLS when tls is set or any TLS file is given (no CA file: the system
    roots); mutual TLS when cert_file and key_file are given. Raises TLSConfigError for bad files."""
    if tls or ca_file is not None or cert_file is not None or key_file is not None:
        credentials = channel_credentials(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)
