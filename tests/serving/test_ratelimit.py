"""Rate limits on /v1 (serving/ratelimit.py, Flask-Limiter): per API key when one is sent, else per
client address (X-Forwarded-For believed only from trusted proxies); 429 with Retry-After in the
gateway's error shape; public pages never limited; 429s counted per key name.
The real-gunicorn case is in test_auth.py (keys and limits through one gateway process)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client import REGISTRY

from serving import auth
from serving.app import create_app
from serving.config import ConfigError, Settings
from serving.context import BACKEND_KEY
from serving.ratelimit import client_address

ALICE, BOB = auth.new_key(), auth.new_key()


def limited_app(gateway_app: Flask, rate_limit: str, **settings: object) -> Flask:
    """A gateway with rate limits over the session model's backend (no second model load)."""
    base = gateway_app.extensions["gateway.settings"]
    return create_app(
        Settings(model_base_path=base.model_base_path, model_name=base.model_name, poll_interval_s=60,
                 rate_limit=rate_limit, **settings),
        backend=gateway_app.extensions[BACKEND_KEY],
    )


def get(client, path: str = "/v1/models", *, addr: str = "192.0.2.1", **headers: str):
    return client.get(path, headers=headers, environ_base={"REMOTE_ADDR": addr})


def nets(*items: str) -> tuple:
    return tuple(ipaddress.ip_network(i) for i in items)


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    trusted = nets("127.0.0.1/32", "10.0.0.0/8")
    # No trusted proxies: the peer, whatever the header claims.
    assert client_address("203.0.113.9", "198.51.100.1", ()) == "203.0.113.9"
    # An untrusted peer cannot pick its address with the header.
    assert client_address("203.0.113.9", "198.51.100.1", trusted) == "203.0.113.9"
    # Through nginx on 127.0.0.1: the address nginx appended.
    assert client_address("127.0.0.1", "198.51.100.7", trusted) == "198.51.100.7"
    # A client-sent (spoofed) entry to the left of what trusted proxies wrote is ignored.
    assert client_address("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.1.2.3", trusted) == "198.51.100.7"
    # Only trusted proxies in the chain: the left-most one is as far as we can see.
    assert client_address("127.0.0.1", "10.1.2.3", trusted) == "10.1.2.3"
    assert client_address("127.0.0.1", "", trusted) == "127.0.0.1"


def test_rate_limit_settings_are_checked_naming_the_variable() -> None:
    settings = Settings.from_env({})
    assert (settings.rate_limit, settings.trusted_proxies) == (None, ())  # off by default
    parsed = Settings.from_env({"GATEWAY_RATE_LIMIT": "20/second;600/minute",
                                "GATEWAY_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8"})
    assert parsed.rate_limit == "20/second;600/minute"
    assert parsed.trusted_proxies == nets("127.0.0.1/32", "10.0.0.0/8")
    for name, value in (("GATEWAY_RATE_LIMIT", "lots"), ("GATEWAY_TRUSTED_PROXIES", "nginx"),
                        ("GATEWAY_RATE_LIMIT_STORAGE", "postgres://db")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


@pytest.mark.slow
def test_a_storage_that_cannot_be_used_stops_the_gateway_naming_the_variable(
    gateway_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis:// without the redis client installed (an image built without the `redis` extra)."""
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(ConfigError, match=r"GATEWAY_RATE_LIMIT_STORAGE=.*`redis` extra"):
        limited_app(gateway_app, "5/minute", rate_limit_storage="redis://127.0.0.1:1")


@pytest.mark.slow
def test_per_address_limit_answers_429_with_retry_after(gateway_app: Flask) -> None:
    client = limited_app(gateway_app, "3/minute").test_client()
    assert [get(client).status_code for _ in range(3)] == [200, 200, 200]
    limited = get(client)
    assert limited.status_code == 429
    error = limited.json["error"]
    assert error["code"] == "rate_limited" and "3/minute" in error["message"]
    assert error["request_id"] == limited.headers["X-Request-ID"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # Another address has its own budget; the probes and the page are never limited.
    assert get(client, addr="192.0.2.2").status_code == 200
    for path in ("/healthz", "/readyz", "/", "/v1/openapi.json"):
        assert get(client, path).status_code == 200, path


@pytest.mark.slow
def test_forwarded_for_counts_only_behind_a_trusted_proxy(gateway_app: Flask) -> None:
    client = limited_app(gateway_app, "2/minute", trusted_proxies=nets("127.0.0.1/32")).test_client()
    # Two clients behind the proxy on 127.0.0.1 each get their own two requests.
    for who in ("198.51.100.1", "198.51.100.2"):
        assert [get(client, addr="127.0.0.1", **{"X-Forwarded-For": who}).status_code
                for _ in range(3)] == [200, 200, 429], who
    # A client reaching the gateway directly cannot reset its budget with a made-up header.
    statuses = [get(client, addr="203.0.113.5", **{"X-Forwarded-For": f"6.6.6.{i}"}).status_code
                for i in range(3)]
    assert statuses == [200, 200, 429]


@pytest.mark.slow
def test_per_key_limit_follows_the_key_not_the_address(gateway_app: Flask, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{auth.hash_key(ALICE)}\nbob:{auth.hash_key(BOB)}\n")
    client = limited_app(gateway_app, "2/minute", api_keys_file=keys).test_client()

    def limited(name: str) -> float:
        return REGISTRY.get_sample_value("gateway_rate_limited_total", {"key_name": name}) or 0.0

    before = limited("alice"), limited("-")
    # alice from two addresses shares one budget.
    assert get(client, addr="192.0.2.1", **{"X-API-Key": ALICE}).status_code == 200
    assert get(client, addr="192.0.2.2", **{"X-API-Key": ALICE}).status_code == 200
    refused = get(client, addr="192.0.2.3", **{"X-API-Key": ALICE})
    assert refused.status_code == 429 and "'alice'" in refused.json["error"]["message"]
    # bob, from alice's address, has his own.
    assert get(client, addr="192.0.2.1", **{"X-API-Key": BOB}).status_code == 200
    # Wrong keys are limited per address before they are refused: a key-guessing flood gets 429s.
    assert [get(client, addr="192.0.2.9", **{"X-API-Key": "c10_guess"}).status_code
            for _ in range(3)] == [401, 401, 429]
    assert (limited("alice") - before[0], limited("-") - before[1]) == (1, 1)
    assert ALICE not in refused.get_data(as_text=True)
