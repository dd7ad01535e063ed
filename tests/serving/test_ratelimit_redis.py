"""Rate limits in a real Redis (GATEWAY_RATE_LIMIT_STORAGE=redis://): one limit for every worker, and a
Redis outage that degrades to per-worker limits instead of failing requests.

Two gateway apps over one Redis stand for two gunicorn workers (or two replicas): with memory://
each would allow the whole limit. `redis-server` is Debian's (make test installs it); without it
these tests skip and say so.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.gateway import free_port
from tests.serving.test_ratelimit import get, limited_app

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).is_file(), reason="redis-server not installed (apt-get install redis-server)"
)


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, without persistence, that a test can stop and start."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [REDIS_SERVER, *options, "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def keys(self) -> list[bytes]:
        import redis

        return redis.Redis(port=self.port, socket_timeout=1).keys("*")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def statuses(app, count: int) -> list[int]:
    client = app.test_client()
    return [get(client).status_code for _ in range(count)]


def fallback_gauge(app) -> float:
    """gateway_rate_limit_store_fallback as the app's /metrics shows it."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    (line,) = [line for line in text.splitlines() if line.startswith("gateway_rate_limit_store_fallback ")]
    return float(line.split()[1])


def test_workers_sharing_a_redis_store_share_one_limit(gateway_app, redis_server):
    first, second = (
        limited_app(gateway_app, "3/minute", rate_limit_storage=redis_server.url) for _ in range(2)
    )
    assert statuses(first, 2) == [200, 200]
    assert statuses(second, 2) == [200, 429]  # with memory:// this worker would allow 3 of its own
    assert statuses(first, 1) == [429]
    assert redis_server.keys(), "the counters are in Redis"
    assert fallback_gauge(first) == 0.0


def test_a_redis_outage_falls_back_to_per_worker_limits_and_recovers(gateway_app, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="flask-limiter")
    app = limited_app(gateway_app, "3/minute", rate_limit_storage=redis_server.url)
    assert statuses(app, 4) == [200, 200, 200, 429]
    redis_server.stop()
    started = time.monotonic()
    # Not 500s: the worker counts in memory (a fresh window) and still limits.
    assert statuses(app, 4) == [200, 200, 200, 429]
    assert time.monotonic() - started < 5, "each call to the dead store must time out quickly"
    assert "Rate limit storage unreachable" in caplog.text
    assert fallback_gauge(app) == 1.0  # operators can alert on it: limits are per worker now
    redis_server.start()  # empty: the counts from before the outage are gone
    deadline = time.monotonic() + 40  # the store is tried again after 1, 2, 4 ... s
    while not redis_server.keys():
        assert time.monotonic() < deadline, "the limiter never went back to Redis"
        statuses(app, 1)
        time.sleep(0.5)
    assert "Rate limit storage recovered" in caplog.text
    assert fallback_gauge(app) == 0.0


def test_a_store_that_accepts_but_never_answers_costs_a_request_at_most_a_timeout(gateway_app):
    """A hung Redis (or a network that drops packets) must not hold requests for the TCP timeout: each
    call times out after STORE_TIMEOUT_S and the worker falls back to its own limits."""
    import socket
    import threading

    from serving.ratelimit import STORE_TIMEOUT_S

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # connections complete in the backlog; nothing ever reads or answers
        app = limited_app(gateway_app, "3/minute", rate_limit_storage=f"redis://127.0.0.1:{hung.getsockname()[1]}")
        answers: list[int] = []
        started = time.monotonic()
        caller = threading.Thread(target=lambda: answers.extend(statuses(app, 4)), daemon=True)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "a request waited on the hung store"
    assert answers == [200, 200, 200, 429]
    assert time.monotonic() - started < 10 * STORE_TIMEOUT_S + 5
