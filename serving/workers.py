"""A gunicorn worker a slow client cannot starve: gthread, but each request is read whole first.

gunicorn's gthread worker hands a new connection to a thread as soon as its first byte arrives, and
the thread then blocks reading the rest of the header and the body. A client that sends one header
byte every few seconds holds that thread for as long as it likes: 16 such sockets held all 2 x 8
threads of the gateway, and /healthz (the liveness probe) stopped answering.

`BufferedThreadWorker` reads each request in the worker's event loop instead (non-blocking, beside
the accept and keep-alive polling gthread already does there) and gives a thread only a request
that has fully arrived: head and body. A slow client then costs a file descriptor and its bytes so
far, never a thread, and is closed when it misses its deadline:

* the head (request line and headers) must arrive within GATEWAY_CLIENT_HEADER_TIMEOUT_S of the
  first wait, in total (like nginx's client_header_timeout, but a total, so trickling does not
  extend it);
* the body may pause at most GATEWAY_CLIENT_BODY_TIMEOUT_S between two reads (nginx's
  client_body_timeout); a body larger than GATEWAY_MAX_UPLOAD_BYTES is not buffered: the app
  refuses it (413) from its Content-Length;
* writing the answer may take at most GATEWAY_CLIENT_SEND_TIMEOUT_S (nginx's send_timeout), so a
  client that never reads its answer frees the thread too.

Why not another worker class: gevent or eventlet would monkeypatch sockets and threads under
TensorFlow and gRPC, which they do not support; the tornado and sync workers run one request per
process at a time, and sync workers are as easy to hold with slow headers. gthread keeps
TensorFlow's model calls on real threads (TF releases the GIL); only the reading moves.

It also spreads new connections over the workers (serving/accept_balance.py): left to the race for
the shared socket, one worker could take every keep-alive connection and serve them alone.

The shipped stacks (compose.yaml, k8s/) also put nginx in front (deploy/nginx/), which buffers the
same way and adds per-address connection limits; this worker keeps `make serve` safe on its own.
Not supported here (refused at start): TLS and HTTP/2 in gunicorn; terminate TLS in the proxy.
"""

from __future__ import annotations

import errno
import json
import re
import selectors
import socket
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import http, util
from gunicorn.http.unreader import IterUnreader
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from contract.request_id import HEADER as REQUEST_ID_HEADER
from contract.request_id import new_id
from serving.accept_balance import PAUSE_S, ConnectionTable
from serving.config import Settings

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_MAX_CHUNK_LINE = 4096  # a chunk-size line or a trailer line longer than this is malformed
_RECV_BYTES = 256 * 1024


class RequestFramer:
    """Finds where one HTTP/1.x request ends in bytes that arrive in pieces (`feed`).

    It reads only what framing needs (the end of the head, Content-Length, chunked encoding,
    Expect) and leaves judging the request to gunicorn's parser: anything it cannot frame (a
    malformed or conflicting length, a head over the size limit) ends the request where the bytes
    stop, so gunicorn parses it at once and answers 400 instead of the client waiting for a timeout.
    """

    def __init__(self, *, max_head_bytes: int, max_body_bytes: int) -> None:
        self.buf = bytearray()
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.head_done = False
        self.expects_continue = False
        self.end: int | None = None  # offset just past the request, once it has all arrived
        self._state = "head"
        self._pos = 0  # where scanning resumes
        self._need = 0  # bytes of body (or of the current chunk) still to come
        self._body_bytes = 0  # decoded chunked body in the chunks complete so far

    @property
    def done(self) -> bool:
        return self.end is not None

    def feed(self, data: bytes) -> None:
        self.buf += data
        if self.end is None:
            self._scan()

    def _finish(self, end: int) -> None:
        self.end = end
        self._state = "done"

    def _scan(self) -> None:
        while self.end is None:
            state = self._state
            if state == "head":
                if not self._scan_head():
                    return
            elif state == "length":
                if len(self.buf) - self._pos < self._need:
                    return
                self._finish(self._pos + self._need)
            elif state == "chunk-size":
                line = self._line()
                if line is None:
                    return
                size = line.split(b";", 1)[0].strip()
                if not size or not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size):
                    self._finish(len(self.buf))  # malformed: gunicorn answers 400
                    return
                self._need = int(size, 16)
                self._state = "chunk-data" if self._need else "trailer"
            elif state == "chunk-data":
                available = len(self.buf) - self._pos
                if available < self._need + 2:
                    if self._body_bytes + available > self.max_body_bytes:
                        # Over the limit, and more than the limit is here: the app reads past the
                        # limit and answers 413 (what it would do reading from the socket).
                        self._finish(len(self.buf))
                    return
                self._body_bytes += self._need
                self._pos += self._need
                if self.buf[self._pos : self._pos + 2] != b"\r\n":
                    self._finish(len(self.buf))
                    return
                self._pos += 2
                if self._body_bytes > self.max_body_bytes:
                    self._finish(len(self.buf))
                    return
                self._state = "chunk-size"
            elif state == "trailer":
                line = self._line()
                if line is None:
                    return
                if not line:
                    self._finish(self._pos)

    def _line(self) -> bytes | None:
        """The next CRLF-terminated line (without it), or None until it has arrived."""
        newline = self.buf.find(b"\n", self._pos)
        if newline < 0:
            if len(self.buf) - self._pos > _MAX_CHUNK_LINE:
                self._finish(len(self.buf))
            return None
        line = bytes(self.buf[self._pos : newline]).rstrip(b"\r")
        self._pos = newline + 1
        return line

    def _scan_head(self) -> bool:
        match = _HEAD_END.search(self.buf, max(0, self._pos - 3))
        if match is None:
            self._pos = len(self.buf)
            if len(self.buf) > self.max_head_bytes:
                self._finish(len(self.buf))  # gunicorn answers 400 (header too large)
            return False
        head_end = match.end()
        self.head_done = True
        lines = bytes(self.buf[: match.start()]).split(b"\n")
        version = lines[0].rstrip(b"\r").rsplit(b" ", 1)[-1]
        lengths, codings = [], []
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep:
                continue
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expects_continue = version == b"HTTP/1.1"
        self._pos = head_end
        if codings:
            if lengths or codings[-1] != b"chunked":
                self._finish(head_end)  # ambiguous framing: gunicorn refuses it
            else:
                self._state = "chunk-size"
            return True
        if not lengths:
            self._finish(head_end)  # no body
            return True
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            self._finish(head_end)
            return True
        length = int(lengths[0])
        if length == 0 or length > self.max_body_bytes:
            # Too large: not buffered; the app answers 413 from Content-Length without reading it.
            self._finish(head_end)
            return True
        self._need = length
        self._state = "length"
        return True


@dataclass
class _Reading:
    framer: RequestFramer
    deadline: float
    continue_sent: bool = False


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    """An answer the worker writes itself, before any app sees the request, in the API's error shape
    (serving/errors.py) with a fresh request id (the request's own, if any, was never read)."""
    rid = new_id()
    body = json.dumps({"error": {"code": code, "message": message, "request_id": rid}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{REQUEST_ID_HEADER}: {rid}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _timeout_response() -> bytes:
    message = "the request did not arrive in time; send the whole request without pausing"
    return _error_response(408, "Request Timeout", "request_timeout", message)


# gunicorn answers a request it cannot parse itself, before the app, as an HTML page: 400 for malformed
# HTTP, 414 for a request line over limit_request_line (a long query string), 431 for headers over
# the limits, and a few rarer ones. The API promises every error as JSON with a stable code and a
# message that says the fix (docs and serving/openapi.yaml): these say it too.
_PROTOCOL_ERRORS = {
    400: ("bad_request", "the request is not valid HTTP/1.1 ({detail}); check the client"),
    403: ("forbidden", "the request was refused ({detail})"),
    414: ("request_line_too_long", "the request line (method, path and query string) is over the "
          "server's limit ({detail}); shorten the query string"),
    417: ("expectation_failed", "the Expect header asks for something the server does not do ({detail}); "
          "send only 'Expect: 100-continue', or none"),
    431: ("headers_too_large", "the request's headers are over the server's limits ({detail}); send "
          "fewer or shorter headers"),
    501: ("not_implemented", "the request uses an HTTP feature the server does not support ({detail})"),
}
_DETAIL_CHARS = 200  # gunicorn's message may quote the client's bytes: enough to recognise them


def write_protocol_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn.util.write_error's replacement (same arguments): the answer as JSON, not HTML."""
    code, text = _PROTOCOL_ERRORS.get(status, ("internal_error", ""))
    if not text:  # 500: an exception outside the app; gunicorn logged it, the client gets no internals
        text = "the server failed while handling the request; retry, and report the request id if it persists"
    detail = message if len(message) <= _DETAIL_CHARS else message[:_DETAIL_CHARS] + "..."
    util.write_nonblock(sock, _error_response(status, reason, code, text.format(detail=detail)))


def _has_pending_bytes(sock: socket.socket) -> bool:
    """Whether a (non-blocking) socket holds unread bytes; False when empty, closed or failed."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # never waits
    except OSError:  # BlockingIOError: nothing there; others: the connection is gone
        return False


class BufferedThreadWorker(ThreadWorker):
    """gthread that hands its threads whole requests only (see the module docstring)."""

    # Open connections per worker (serving/accept_balance.py): made in the master by check_config,
    # before the workers are forked, so that they all share it.
    connection_table: ConnectionTable | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        super().check_config(cfg, log)
        if cls.connection_table is None:  # kept across a reload (HUP): old workers still write to it
            cls.connection_table = ConnectionTable()
        plain_http1 = (
            not cfg.is_ssl
            and list(cfg.http_protocols) == ["h1"]
            and cfg.http2_cleartext == "off"
            and cfg.protocol == "http"
        )
        if not plain_http1:
            raise RuntimeError(
                "serving.workers.BufferedThreadWorker serves plain HTTP/1.1 only: terminate TLS and "
                "HTTP/2 in the proxy in front (deploy/nginx/), or drop --certfile, --http-protocols, "
                "--http2-cleartext and --protocol"
            )

    def init_process(self) -> None:
        settings = Settings.from_env()
        self.header_timeout_s = settings.client_header_timeout_s
        self.body_timeout_s = settings.client_body_timeout_s
        self.send_timeout_s = settings.client_send_timeout_s
        self.max_body_bytes = settings.max_upload_bytes
        cfg = self.cfg
        # As large as gunicorn's own limits allow (it answers 400 beyond them), plus the blank line.
        self.max_head_bytes = (cfg.limit_request_line or 8190) + (cfg.limit_request_fields or 100) * (
            (cfg.limit_request_field_size or 8190) + 2
        ) + 4
        self._reading: dict[TConn, _Reading] = {}
        self._leftover: dict[TConn, bytes] = {}  # pipelined bytes read past a request
        self._continue_sent: set[TConn] = set()
        self._stop_capped = False  # head deadlines capped once the worker began to stop
        self._table = type(self).connection_table
        self._slot = self._table.slot_for(self.age) if self._table is not None else 0
        self._accept_paused_until = 0.0  # accepting is off until then (left to a sibling)
        self._accept_anyway_until = 0.0  # just after a pause: accept the next connection whatever the counts
        # gunicorn's Worker.handle_error (status, logging) writes its answer through util.write_error:
        # in this worker process, that writes the API's JSON error instead of an HTML page.
        util.write_error = write_protocol_error
        super().init_process()

    # --- spreading connections over the workers (serving/accept_balance.py) ------------------

    def accept(self, listener: socket.socket) -> None:
        if self._table is not None:
            now = time.monotonic()
            if now < self._accept_anyway_until:
                self._accept_anyway_until = 0.0  # one connection, then the counts decide again
            elif self._table.should_yield(self._slot, self.nr_conns, now):
                self._accept_paused_until = now + PAUSE_S
                super().set_accept_enabled(False)
                return
        super().accept(listener)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gthread's loop turns accepting back on on its next turn whenever it has room: not during a pause.
        if enabled and self._accept_paused_until:
            now = time.monotonic()
            if now < self._accept_paused_until:
                return
            self._accept_paused_until = 0.0
            self._accept_anyway_until = now + PAUSE_S
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._accept_paused_until:
            timeout = min(timeout, max(0.0, self._accept_paused_until - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
        if self._table is not None:
            if self.alive:
                self._table.publish(self._slot, self.nr_conns, time.monotonic())
            else:  # stopping: siblings must not leave connections to a worker that no longer accepts
                self._table.clear(self._slot)

    # --- reading in the event loop -----------------------------------------------------------

    def enqueue_req(self, conn: TConn) -> None:
        """gthread calls this for a new connection and for a kept-alive one that became readable;
        read its next request here, and submit it to a thread once it is whole."""
        framer = RequestFramer(max_head_bytes=self.max_head_bytes, max_body_bytes=self.max_body_bytes)
        reading = _Reading(framer, time.monotonic() + self.header_timeout_s)
        self._reading[conn] = reading
        conn.sock.setblocking(False)
        leftover = self._leftover.pop(conn, b"")
        if conn.parser is not None:  # read-ahead gunicorn's parser kept (none when framing is exact)
            leftover = conn.parser.unreader.take_buffered() + leftover
        if leftover:
            framer.feed(leftover)
            if framer.done:
                self._dispatch(conn, reading, registered=False)
                return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, _sock: socket.socket) -> None:
        reading = self._reading[conn]
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:  # the client went away before finishing its request
            self._drop(conn)
            return
        framer = reading.framer
        was_head_done = framer.head_done
        framer.feed(data)
        if framer.head_done:
            # From here on the deadline is per read (nginx's client_body_timeout semantics).
            reading.deadline = time.monotonic() + self.body_timeout_s
            if not was_head_done and framer.expects_continue and not framer.done:
                try:  # 25 bytes into an empty send buffer: does not block
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    reading.continue_sent = True
                except OSError:
                    pass
        if framer.done:
            self._dispatch(conn, reading, registered=True)

    def _dispatch(self, conn: TConn, reading: _Reading, *, registered: bool) -> None:
        if registered:
            self.poller.unregister(conn.sock)
        del self._reading[conn]
        framer = reading.framer
        request, rest = bytes(framer.buf[: framer.end]), bytes(framer.buf[framer.end :])
        if rest:
            self._leftover[conn] = rest
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, [], conn.client)
        # The thread's parser reads this request's bytes and nothing else: it never waits on the
        # socket, so no client can hold the thread by being slow.
        conn.parser.unreader = IterUnreader([request])
        # The bytes are here, not on the socket: the thread must not wait for the socket to turn
        # readable (gthread's wait_for_data would stall 5 s, then defer).
        conn.data_ready = True
        if reading.continue_sent:
            self._continue_sent.add(conn)
        super().enqueue_req(conn)

    def _drop(self, conn: TConn, answer: bytes | None = None) -> None:
        reading = self._reading.pop(conn, None)
        self._leftover.pop(conn, None)
        if reading is not None:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        if answer:
            try:
                conn.sock.send(answer)
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Besides gthread's own pending connections, close those whose request is late."""
        super().murder_pending()
        now = time.monotonic()
        if not self.alive and not self._stop_capped:
            # Stopping: a connection accepted before the signal may still be sending its head (the
            # client cannot know we are stopping, and a POST dropped unanswered is not retried).
            # Give it what gunicorn gives kept-alive connections, STOP_KEEPALIVE_LINGER, then close;
            # bodies already under way keep their per-read deadline. Answers go out with
            # "Connection: close" (gthread stops keep-alive once not alive).
            self._stop_capped = True
            linger_until = now + STOP_KEEPALIVE_LINGER
            for reading in self._reading.values():
                if not reading.framer.head_done:
                    reading.deadline = min(reading.deadline, linger_until)
        for conn, reading in list(self._reading.items()):
            if reading.deadline > now:
                continue
            if _has_pending_bytes(conn.sock):
                # Bytes the last poll did not see: another thread held the GIL past the deadline (a
                # version loading in native code) while they waited in the socket. Read them first;
                # the request is late only if they do not finish its head (or it is still paused).
                self._on_readable(conn, conn.sock)
                if self._reading.get(conn) is not reading or reading.deadline > now:
                    continue
            got_bytes = bool(reading.framer.buf)
            self._drop(conn, _timeout_response() if got_bytes else None)

    def murder_keepalived(self, force: bool = False) -> None:
        """gthread's, except that an expired kept-alive connection on which the client has already
        sent its next request is served, not closed. The loop polls, then closes what expired; when
        another thread held the GIL for longer than a poll (a version loading in native code), a
        request can reach the socket after the poll and before this, and closing would drop it (a
        POST the client cannot safely retry). Peeking leaves only the kernel's microseconds."""
        if not force:
            now = time.monotonic()
            for conn in list(self.keepalived_conns):
                if conn.timeout > now:
                    break  # in timeout order: the rest have not expired
                if _has_pending_bytes(conn.sock):
                    self.on_client_socket_readable(conn, conn.sock)
        super().murder_keepalived(force)

    def finish_request(self, conn: TConn, fs: Any) -> None:
        self._continue_sent.discard(conn)
        super().finish_request(conn, fs)
        if conn not in self._leftover:
            return
        if conn in self.keepalived_conns:
            # A pipelined request already read does not make the socket readable again: serve it now.
            self.keepalived_conns.remove(conn)
            self.poller.unregister(conn.sock)
            self.enqueue_req(conn)
        elif conn not in self._reading:
            self._leftover.pop(conn)  # the connection was closed

    # --- in the thread ---------------------------------------------------------------------------

    def handle_request(self, req: Any, conn: TConn) -> bool:
        if conn in self._continue_sent:
            req._expected_100_continue = False  # sent from the event loop already
        try:
            conn.sock.settimeout(self.send_timeout_s)
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
        return super().handle_request(req, conn)
