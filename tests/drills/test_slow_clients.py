"""Slow-client drill (issue 13, item 2): many sockets that send a request head one byte every couple of
seconds, or a whole head and then a body one byte at a time, against

* the shipped stack: the real nginx with deploy/nginx/nginx.conf in front of the real gateway under
  gunicorn (serving/gunicorn.conf.py), and
* gunicorn alone, as `make serve` runs it (same config file, 2 workers x 8 threads, no proxy).

Before the fix, 16 such sockets held all 2 x 8 gthread threads and /healthz (the liveness probe)
stopped answering. Here 64 of them (four times the threads) keep trickling, reopened whenever the
server closes one, while /healthz and a prediction must each answer within a bound; and the server
must cut the trickling sockets off at its header timeout (10 s) rather than hold them for ever.
Also checked on the same servers: the admin port split, nginx's limits and its JSON refusals.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pytest
import requests

from loadtest.gateway_process import GatewayProcess, free_port, running_gateway
from tests.drills.traffic import predict_once, small_png
from tests.fixtures.exported import ExportedModel
from tests.fixtures.nginx import running_nginx

pytestmark = [pytest.mark.drill, pytest.mark.slow]

HEAD_TRICKLERS = 48
BODY_TRICKLERS = 16  # under nginx's 32 requests in flight per address, so the probes still get in
INTERVAL_S = 2.0  # below both header and body timeouts (10 s): the server has no reason to drop them early
ATTACK_S = 13.0  # longer than the 10 s header timeout, to see the server cut the tricklers off
HEALTH_BOUND_S = 3.0
PREDICT_BOUND_S = 10.0  # generous: two CPU cores shared with other work, a TensorFlow model call inside


@dataclass
class SlowClients:
    """The slow sockets, trickling from a background thread until stop(); reopened when closed."""

    host: str
    port: int
    heads: int
    bodies: int
    closed_by_server: int = 0
    _socks: list[tuple[socket.socket, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _open(self, body: bool) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=5)
        if body:
            # A complete head announcing 100 kB, then the body a byte at a time.
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: drill\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n\x89"
            )
        else:
            # A head that never ends: one more byte of a header value each time.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: drill\r\nX-Slow: a")
        return sock

    def __enter__(self) -> SlowClients:
        self._socks = [(self._open(False), False) for _ in range(self.heads)]
        self._socks += [(self._open(True), True) for _ in range(self.bodies)]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            for i, (sock, body) in enumerate(self._socks):
                try:
                    sock.send(b"a")
                    sock.setblocking(False)
                    try:
                        sock.recv(4096)  # an answer (408) or end of file: the server gave up on it
                        closed = True
                    except BlockingIOError:
                        closed = False
                    finally:
                        sock.setblocking(True)
                    if not closed:
                        continue
                except OSError:
                    pass
                sock.close()
                self.closed_by_server += 1
                try:
                    self._socks[i] = (self._open(body), body)
                except OSError:
                    pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for sock, _ in self._socks:
            sock.close()


@dataclass
class Probe:
    what: str
    status: int
    seconds: float
    error: str = ""


def probe_health(url: str) -> Probe:
    start = time.monotonic()
    try:
        r = requests.get(f"{url}/healthz", timeout=HEALTH_BOUND_S + 2, headers={"Connection": "close"})
        return Probe("healthz", r.status_code, time.monotonic() - start)
    except requests.RequestException as e:
        return Probe("healthz", 0, time.monotonic() - start, type(e).__name__)


def probe_predict(url: str, image: bytes) -> Probe:
    answer = predict_once(requests.Session(), url, image, timeout=PREDICT_BOUND_S + 2, fresh=True)
    return Probe("predict", answer.status, answer.seconds, answer.error)


@dataclass
class Gateway:
    process: GatewayProcess
    admin_url: str

    @property
    def url(self) -> str:
        return self.process.url


@pytest.fixture(scope="module")
def gateway(exported_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway as `make serve` runs it (serving/gunicorn.conf.py: 2 workers x 8 threads), plus the
    admin listener the shipped stacks add (it does not change how the public port is served)."""
    admin_port = free_port()
    env = {
        "GATEWAY_MODEL_BASE_PATH": str(exported_model.base_path),
        "GATEWAY_MODEL_NAME": exported_model.name,
        "GATEWAY_TFSERVING_ADDRESS": "",
        "GATEWAY_ADMIN_BIND": f"127.0.0.1:{admin_port}",
    }
    log_dir = tmp_path_factory.mktemp("slow-clients-gateway")
    # Waits for /healthz: with the admin port set, /readyz answers there only.
    with running_gateway(env, workers=2, wait_ready=False, log_dir=log_dir) as process:
        admin_url = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 120
        while requests.get(f"{admin_url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the gateway never became ready on its admin port"
            time.sleep(0.5)
        yield Gateway(process, admin_url)


@pytest.fixture(scope="module")
def proxy(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_nginx(gateway.process.port, log_dir=tmp_path_factory.mktemp("slow-clients-nginx")) as url:
        yield url


def _drill(url: str, gateway: Gateway) -> None:
    target = urlparse(url)
    image = small_png(seed=3)
    assert probe_predict(url, image).status == 200  # warm: the first call may build the model's graph
    probes: list[Probe] = []
    with SlowClients(target.hostname, target.port, heads=HEAD_TRICKLERS, bodies=BODY_TRICKLERS) as slow:
        start = time.monotonic()
        time.sleep(INTERVAL_S + 0.5)  # every slow socket has sent more than its first bytes
        open_at_first_probe = HEAD_TRICKLERS + BODY_TRICKLERS - slow.closed_by_server
        while time.monotonic() - start < ATTACK_S:
            probes.append(probe_health(url))
            probes.append(probe_predict(url, image))
            time.sleep(1.0)
        closed = slow.closed_by_server
    log = f"\nprobes: {probes}\ngateway log tail:\n{gateway.process.log()[-2000:]}"
    # The attack was real: the server was holding the slow sockets when the probes ran...
    assert open_at_first_probe >= 0.9 * (HEAD_TRICKLERS + BODY_TRICKLERS), log
    # ...and yet every probe was answered, within its bound.
    late = [p for p in probes if p.status != 200]
    late += [p for p in probes if p.what == "healthz" and p.seconds > HEALTH_BOUND_S]
    late += [p for p in probes if p.what == "predict" and p.seconds > PREDICT_BOUND_S]
    assert not late, f"slow clients starved the gateway: {late}{log}"
    assert len(probes) >= 8, log
    # The trickling heads were cut off at the header timeout (10 s), not held for ever.
    assert closed >= HEAD_TRICKLERS, f"only {closed} slow sockets were closed by the server{log}"
    # The liveness probe's own port answered throughout too.
    assert requests.get(f"{gateway.admin_url}/healthz", timeout=HEALTH_BOUND_S).status_code == 200


def test_slow_clients_cannot_starve_the_gateway_behind_nginx(proxy: str, gateway: Gateway) -> None:
    _drill(proxy, gateway)


def test_slow_clients_cannot_starve_gunicorn_alone_as_make_serve_runs_it(gateway: Gateway) -> None:
    _drill(gateway.url, gateway)


def test_metrics_and_readiness_answer_on_the_admin_port_only(proxy: str, gateway: Gateway) -> None:
    for public in (proxy, gateway.url):
        for path in ("/metrics", "/readyz"):
            r = requests.get(f"{public}{path}", timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (public, path)
        assert requests.get(f"{public}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{gateway.admin_url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{gateway.admin_url}/healthz", timeout=10).status_code == 200
    metrics = requests.get(f"{gateway.admin_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "gateway_requests_total" in metrics.text
    # The port is read from the connection, not from a header a client writes.
    admin_host = urlparse(gateway.admin_url).netloc
    spoofed = requests.get(f"{gateway.url}/metrics", headers={"Host": admin_host}, timeout=10)
    assert spoofed.status_code == 404
    # The admin port serves no API: nothing there bypasses the proxy's limits.
    answer = predict_once(requests.Session(), gateway.admin_url, small_png())
    assert answer.status == 404, answer


def test_nginx_passes_the_request_id_and_refuses_in_the_gateway_error_format(proxy: str) -> None:
    files = {"images": ("a.png", small_png(), "image/png")}
    r = requests.post(f"{proxy}/v1/predict", files=files, headers={"X-Request-ID": "drill-42"}, timeout=30)
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "drill-42"
    # Over client_max_body_size (= GATEWAY_MAX_UPLOAD_BYTES): refused by nginx from the head alone.
    target = urlparse(proxy)
    with socket.create_connection((target.hostname, target.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: drill\r\nContent-Type: image/png\r\n"
            b"X-Request-ID: drill-43\r\nContent-Length: 20971521\r\n\r\n"
        )
        reply = b""
        while b'"}}' not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"X-Request-ID: drill-43" in head, reply
    error = json.loads(body)["error"]
    assert error["code"] == "upload_too_large" and error["request_id"] == "drill-43", error


def test_nginx_caps_requests_in_flight_per_address_with_429(proxy: str) -> None:
    target = urlparse(proxy)
    socks = []
    try:
        for _ in range(40):  # 32 allowed; slow bodies keep each one in flight
            sock = socket.create_connection((target.hostname, target.port), timeout=5)
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: drill\r\nContent-Length: 1000\r\n\r\n")
            socks.append(sock)
        time.sleep(1.0)  # the refusals are immediate; the others wait for their bodies (10 s timeout)
        refused, waiting = 0, 0
        for sock in socks:
            sock.setblocking(False)
            try:
                reply = sock.recv(4096)
            except BlockingIOError:
                waiting += 1
                continue
            assert reply.startswith(b"HTTP/1.1 429"), reply[:200]
            assert b'"too_many_connections"' in reply and b"Retry-After: 1" in reply
            refused += 1
        assert waiting == 32
        assert refused == 8
    finally:
        for sock in socks:
            sock.close()
