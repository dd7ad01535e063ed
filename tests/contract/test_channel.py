"""gRPC channel set-up for TensorFlow Serving: the options each caller gets, and the retry policy."""

from __future__ import annotations

import json

import grpc
import pytest

from contract.channel import (
    MAX_MESSAGE_BYTES,
    SERVICES,
    channel_options,
    open_channel,
    retry_service_config,
)


def test_default_options_raise_both_message_limits_and_shorten_reconnects() -> None:
    assert dict(channel_options()) == {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 1000,
    }


def test_retries_and_a_short_connect_timeout_are_opt_in() -> None:
    config = retry_service_config(5, 0.1, 1.0)
    options = dict(
        channel_options(max_message_bytes=1024, service_config=config, min_connect_timeout_ms=100)
    )
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 1024
    assert options["grpc.enable_retries"] == 1 and options["grpc.service_config"] == config
    assert options["grpc.min_reconnect_backoff_ms"] == 100


def test_retry_policy_covers_both_services_and_only_unavailable() -> None:
    (method,) = json.loads(retry_service_config(4, 0.05, 0.4))["methodConfig"]
    assert [name["service"] for name in method["name"]] == list(SERVICES)
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.4s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }


def test_open_channel_accepts_the_options() -> None:
    # gRPC parses the service config when the channel is created: a bad one fails here, not later.
    options = channel_options(service_config=retry_service_config(5, 0.1, 1.0))
    with open_channel("127.0.0.1:1", options) as channel:
        assert isinstance(channel, grpc.Channel)
    with open_channel("127.0.0.1:1", options, tls=True) as channel:
        assert isinstance(channel, grpc.Channel)


def test_retries_are_throttled_when_most_attempts_fail() -> None:
    # gRPC's retryThrottling: a server failing every call stops seeing retries after a few failures.
    config = json.loads(retry_service_config(5, 0.1, 1.0))
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}


def test_tls_files_are_checked_with_a_clear_error(tmp_path) -> None:
    from contract.channel import TLSConfigError, channel_credentials

    with pytest.raises(TLSConfigError, match=r"CA file .*missing\.pem"):
        channel_credentials(ca_file=tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match="both a client certificate and its private key"):
        channel_credentials(cert_file=tmp_path / "client.pem")
