"""serving/workers.py: the gunicorn worker that reads each request whole before a thread gets it.

First the framing (where a request ends, fed in pieces), then the worker under real gunicorn with a
small echo app (tests/fixtures/echo_wsgi.py) and 1 worker x 2 threads: ordinary HTTP/1.1 still works
(keep-alive, pipelining, chunked bodies, Expect: 100-continue), slow clients do not take threads, and
they are cut off at their deadlines; a stopping worker still answers what it accepted. The drill
with the real gateway and nginx is tests/drills/test_slow_clients.py.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from loadtest.gateway_process import GatewayProcess, running_gateway
from serving.workers import RequestFramer

HEAD = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"


def framer(max_head: int = 8192, max_body: int = 1000) -> RequestFramer:
    return RequestFramer(max_head_bytes=max_head, max_body_bytes=max_body)


def test_a_request_is_done_only_when_its_last_body_byte_arrives() -> None:
    f = framer()
    request = HEAD + b"hello"
    for i, byte in enumerate(request[:-1]):
        f.feed(bytes([byte]))
        assert not f.done, i
        assert f.head_done == (i >= len(HEAD) - 1)
    f.feed(request[-1:])
    assert f.done and f.end == len(request)


def test_pipelined_requests_end_at_the_first() -> None:
    f = framer()
    f.feed(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n" + HEAD + b"hello")
    assert f.done and f.end == len(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")


def test_chunked_body_with_extensions_and_trailers_in_pieces() -> None:
    head = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3;ext=1\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
    f = framer()
    data = head + body + b"GET /next HTTP/1.1\r\n"
    for i in range(0, len(data), 7):
        f.feed(data[i : i + 7])
    assert f.done and f.end == len(head + body)


@pytest.mark.parametrize("pieces", [[b"8\r\n12345678\r\n8\r\n12345"], [b"4\r\nabcd\r\n"] * 3])
def test_a_chunked_body_over_the_limit_is_handed_over_once_more_than_the_limit_is_here(pieces) -> None:
    # The app then reads past its limit and answers 413, as it would reading from the socket.
    f = framer(max_body=10)
    f.feed(b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in pieces:
        f.feed(piece)
    assert f.done and f.end == len(f.buf)


@pytest.mark.parametrize(
    "data",
    [
        # Framing gunicorn must judge (and refuse with 400): handed over as soon as the head is in.
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        # Over the upload limit: not buffered; the app answers 413 from Content-Length.
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n",
        # No body.
        b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
)
def test_requests_without_a_body_to_wait_for_end_at_their_head(data: bytes) -> None:
    f = framer()
    f.feed(data)
    assert f.done and f.end == len(data)


def test_a_head_over_the_limit_is_handed_over_for_gunicorn_to_refuse() -> None:
    f = framer(max_head=100)
    f.feed(b"GET /x HTTP/1.1\r\nX-Long: " + b"a" * 50)
    assert not f.done
    f.feed(b"a" * 60)
    assert f.done


def test_expect_100_continue_is_noticed_for_http_1_1_only() -> None:
    f = framer()
    f.feed(b"POST /x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert f.expects_continue and f.head_done and not f.done
    f = framer()
    f.feed(b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert not f.expects_continue


# --- the worker under real gunicorn --------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {"GATEWAY_CLIENT_HEADER_TIMEOUT_S": "1.5", "GATEWAY_CLIENT_BODY_TIMEOUT_S": "1.5"}
    log_dir = tmp_path_factory.mktemp("echo-gunicorn")
    with running_gateway(
        env, workers=1, threads=2, app="tests.fixtures.echo_wsgi:app", probe_path="/", log_dir=log_dir
    ) as gateway:
        yield gateway


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
    return out


@pytest.mark.slow
def test_the_garbage_collector_is_off_while_a_worker_builds_its_app_and_on_once_it_serves(
    echo_server: GatewayProcess,
) -> None:
    """serving/gunicorn.conf.py: off between post_fork and post_worker_init (full collections over
    TensorFlow's objects cost ~1 s of a worker's start), and never left off: cycles would leak."""
    answer = requests.get(f"{echo_server.url}/", timeout=10).json()
    assert answer["gc_enabled"] == {"while_built": False, "serving": True}


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /?q=" + b"x" * 6000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "request_line_too_long"),
        (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n",
         431, "headers_too_large"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n", 400, "bad_request"),
    ],
    ids=["query string too long", "too many headers", "malformed header"],
)
def test_requests_gunicorn_cannot_parse_get_the_apis_json_error(
    echo_server: GatewayProcess, request_bytes: bytes, status: int, code: str
) -> None:
    """gunicorn answers these before any app sees them; the answer is JSON in the API's error shape
    (a code, a message saying the fix, a request id, also in X-Request-ID), never its HTML page."""
    reply = _raw(echo_server.port, request_bytes)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head[:200]
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["request_id"] == headers["X-Request-ID"] and len(error["request_id"]) == 32
    assert len(error["message"]) < 400  # gunicorn quotes the request: cut short, not echoed whole
    # The worker keeps serving.
    assert requests.get(f"{echo_server.url}/after", timeout=10).json()["path"] == "/after"


def test_ordinary_http_still_works(echo_server: GatewayProcess) -> None:
    url = echo_server.url
    with requests.Session() as session:  # one kept-alive connection
        assert [session.get(f"{url}/a").json()["path"] for _ in range(3)] == ["/a"] * 3
        body = bytes(range(256)) * 12_000  # 3 MB, read in many pieces
        answer = session.post(f"{url}/big", data=body).json()
        assert answer["length"] == len(body) and answer["sha256"] == hashlib.sha256(body).hexdigest()
        chunked = session.post(f"{url}/chunked", data=iter([b"ab", b"cde", b"f" * 70_000])).json()
        assert chunked["length"] == 70_005
    pipelined = _raw(
        echo_server.port,
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    assert pipelined.count(b"HTTP/1.1 200 OK") == 3
    assert pipelined.index(b'"/1"') < pipelined.index(b'"/2"') < pipelined.index(b'"/3"')
    # Malformed framing is refused by gunicorn at once, not left to time out.
    conflicting = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    refused = _raw(echo_server.port, conflicting)
    assert refused.startswith(b"HTTP/1.1 400")


@pytest.mark.slow
def test_expect_100_continue_gets_one_interim_answer(echo_server: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=5) as sock:
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n"
                     b"Connection: close\r\n\r\n")  # fmt: skip
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK") and b'"length": 5' in reply


@pytest.mark.slow
def test_slow_clients_take_no_thread(echo_server: GatewayProcess) -> None:
    socks = []
    try:
        for i in range(40):  # 20 times the threads
            sock = socket.create_connection(("127.0.0.1", echo_server.port), timeout=5)
            if i % 4:
                sock.sendall(b"GET /held HTTP/1.1\r\nHost: t\r\nX-Slow: a")  # a head that never ends
            else:
                sock.sendall(HEAD + b"he")  # a body that never ends
            socks.append(sock)
        time.sleep(0.3)
        start = time.monotonic()
        assert requests.get(f"{echo_server.url}/ok", timeout=5).json()["path"] == "/ok"
        assert time.monotonic() - start < 1.0
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
def test_slow_clients_are_cut_off_at_their_deadlines(echo_server: GatewayProcess) -> None:
    port = echo_server.port
    trickling_head = socket.create_connection(("127.0.0.1", port), timeout=5)
    paused_body = socket.create_connection(("127.0.0.1", port), timeout=5)
    steady_body = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        trickling_head.sendall(b"GET /h HTTP/1.1\r\n")
        paused_body.sendall(HEAD + b"he")
        steady_body.sendall(b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 12\r\nConnection: close\r\n\r\n")
        start = time.monotonic()
        # The head's deadline is a total (1.5 s): a byte every 0.3 s does not extend it. The body's
        # is per read (1.5 s): a byte every 0.3 s keeps it going past 1.5 s in all.
        for _ in range(12):
            time.sleep(0.3)
            for sock in (trickling_head, steady_body):
                try:
                    sock.send(b"a")
                except OSError:
                    pass
        elapsed = time.monotonic() - start
        assert elapsed > 3.0
        for sock in (trickling_head, paused_body):
            reply = sock.recv(65536)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b'"request_timeout"' in reply
        reply = b""
        while chunk := steady_body.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK") and b'"length": 12' in reply
    finally:
        for sock in (trickling_head, paused_body, steady_body):
            sock.close()


def test_a_head_finished_before_its_deadline_is_served_though_the_loop_saw_it_late(
    echo_server: GatewayProcess,
) -> None:
    """Another thread holds the GIL for seconds (a version loading in native code): the loop's poll
    ended before a slow client's last head bytes arrived, and the head's deadline (1.5 s) passes
    before the loop runs again. Those bytes came in time and are in the socket: the request is
    served, not answered 408."""
    port = echo_server.port
    late = socket.create_connection(("127.0.0.1", port), timeout=20)
    staller = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        late.sendall(b"POST /late HTTP/1.1\r\nHost: t\r\n")  # its head is due 1.5 s from now
        started = time.monotonic()
        time.sleep(0.1)
        staller.sendall(b"GET /gil?4 HTTP/1.1\r\nHost: t\r\n\r\n")  # the loop stalls ~4 s from now
        # After the poll under way (1 s at most) gave up, before the deadline:
        time.sleep(max(0.0, started + 1.3 - time.monotonic()))
        late.sendall(b"Content-Length: 2\r\n\r\nhi")
        sent_at = time.monotonic() - started
        reply = _response(late)
        assert _response(staller).startswith(b"HTTP/1.1 200 OK")
    finally:
        late.close()
        staller.close()
    assert sent_at < 1.5, f"this test's own send was late ({sent_at:.2f} s): the machine is too busy"
    assert reply.startswith(b"HTTP/1.1 200 OK") and b'"/late"' in reply, reply[:300]


def _response(sock: socket.socket) -> bytes:
    """One whole answer on a kept-alive connection: its head, then Content-Length bytes of body
    (a head and its body may arrive in separate reads)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    lengths = [line.split(b":", 1)[1] for line in lines if line.startswith(b"content-length:")]
    length = int(lengths[0]) if lengths else 0
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.mark.slow
def test_a_request_on_an_expired_keep_alive_connection_is_served_after_a_stall(tmp_path: Path) -> None:
    """The event loop closes kept-alive connections past their keep-alive timeout (2 s). When another
    thread held the GIL for seconds (a version loading), its last poll ended before a client's next
    request arrived on such a connection: that request is in the socket, unseen, and closing the
    connection would drop it (a POST the client cannot safely retry). It must be served."""
    with running_gateway(
        {}, workers=1, threads=2, app="tests.fixtures.echo_wsgi:app", probe_path="/", log_dir=tmp_path / "log"
    ) as gateway:
        kept = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
        staller = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
        try:
            kept.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
            first = _response(kept)
            answered = time.monotonic()
            assert first.startswith(b"HTTP/1.1 200 OK") and b"close" not in first.lower()
            staller.sendall(b"GET /gil?6 HTTP/1.1\r\nHost: t\r\n\r\n")  # the loop stalls ~6 s from now
            # Past the keep-alive timeout, and more than the loop's 1 s poll into the stall:
            time.sleep(max(0.0, answered + 2.5 - time.monotonic()))
            kept.sendall(b"POST /second HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
            second = _response(kept)
            assert _response(staller).startswith(b"HTTP/1.1 200 OK")
        finally:
            kept.close()
            staller.close()
    assert second.startswith(b"HTTP/1.1 200 OK") and b'"/second"' in second, second[:300]


def _stop_with_requests_in_flight(tmp_path: Path) -> tuple[list[bytes], float, float, int | None]:
    """One run of the scenario below: (replies, seconds from SIGTERM to the last byte sent, seconds
    to the gateway's exit, its exit status)."""
    log_dir = tmp_path / "log"
    with running_gateway(
        {}, workers=1, threads=2, app="tests.fixtures.echo_wsgi:app", probe_path="/", log_dir=log_dir
    ) as gateway:
        worker = gateway.workers()[0]
        nothing_yet, half_head, half_body, idle = (
            socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in range(4)
        )
        try:
            half_head.sendall(b"POST /h HTTP/1.1\r\nHost: t\r\n")
            half_body.sendall(HEAD + b"he")
            deadline = time.monotonic() + 10
            while len(worker.net_connections("tcp")) < 4 + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(worker.net_connections("tcp")) == 4 + 1, "the worker did not accept all four"
            stop = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            nothing_yet.sendall(b"GET /n HTTP/1.1\r\nHost: t\r\n\r\n")
            half_head.sendall(b"Content-Length: 3\r\n\r\nabc")
            half_body.sendall(b"llo")
            sent_after = time.monotonic() - stop
            replies = []
            for sock in (nothing_yet, half_head, half_body):
                reply = b""
                try:
                    while chunk := sock.recv(65536):
                        reply += chunk
                except ConnectionResetError:
                    reply += b"<reset>"
                replies.append(reply)
            assert idle.recv(100) == b""  # closed, not answered
            gateway.process.wait(timeout=30)
            stopped_after = time.monotonic() - stop
        finally:
            for sock in (nothing_yet, half_head, half_body, idle):
                sock.close()
    return replies, sent_after, stopped_after, gateway.process.returncode


@pytest.mark.slow
def test_a_stopping_worker_answers_connections_it_accepted(tmp_path: Path) -> None:
    """SIGTERM (a rollout) arrives after the worker accepted connections whose requests are not
    whole yet: each request that arrives within the linger is answered, with "Connection: close";
    an idle connection is closed; the worker exits long before its graceful timeout.

    The requests are sent 0.3 s after the signal, well inside the 2 s linger. A run in which a busy
    machine delayed this test's own sends past 1 s proves nothing either way and is repeated (at
    most 3 runs); a reset or a missing answer to requests sent in time fails, naming when they went.
    Under make test's two processes one reset was seen (its send time unknown), and once a 408 for a
    head sent 0.3 s after the signal: the stalled loop judged the 2 s linger before reading bytes
    already in the socket, which murder_pending now reads first (the test above)."""
    for attempt in range(3):
        run = _stop_with_requests_in_flight(tmp_path / str(attempt))
        replies, sent_after, stopped_after, returncode = run
        if sent_after < 1.0:
            break
    else:
        pytest.fail(f"the requests went out {sent_after:.1f} s after SIGTERM in 3 runs: machine too busy")
    for reply, path in zip(replies, (b'"/n"', b'"/h"', b'"/x"'), strict=True):
        assert reply.startswith(b"HTTP/1.1 200 OK"), (sent_after, reply[:200])
        assert path in reply and b"connection: close" in reply.lower()
    assert returncode == 0
    assert stopped_after < 10
