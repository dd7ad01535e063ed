"""The TensorFlow Serving readiness check (k8s probes and the compose healthcheck) passes only when a
version is AVAILABLE. It is run for real, with bash, against an HTTP server answering what
TensorFlow Serving's REST API answers for GET /v1/models/cifar10 in each model state."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.deploy import manifests


def _status(*states: str) -> tuple[int, str]:
    versions = [
        {"version": str(i + 1), "state": s, "status": {"error_code": "OK", "error_message": ""}}
        for i, s in enumerate(states)
    ]
    return 200, json.dumps({"model_version_status": versions}, indent=1)  # TF Serving pretty-prints


ANSWERS = {
    "available": _status("AVAILABLE"),
    "loading": _status("LOADING"),
    "start": _status("START"),
    "failed": _status("END"),
    "rolled_forward": _status("END", "AVAILABLE"),
    "unknown_model": (404, json.dumps({"error": "Could not find any versions of model cifar10"})),
}
PASSES = {"available", "rolled_forward"}


class _Server:
    def __init__(self) -> None:
        self.answer = ANSWERS["available"]
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.paths.append(self.path)
                code, body = owner.answer
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()


def _probe_scripts() -> dict[str, list[str]]:
    docs = manifests.render()
    container = next(manifests.containers(manifests.find(docs, "Deployment", "tfserving")))
    scripts = {kind: container[kind]["exec"]["command"] for kind in ("startupProbe", "readinessProbe")}
    test = manifests.compose()["services"]["tfserving"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    scripts["compose healthcheck"] = test[1:]
    return scripts


def _run(command: list[str], port: int) -> int:
    assert command[:2] == ["/bin/bash", "-c"] and "/dev/tcp/127.0.0.1/8501" in command[2]
    script = command[2].replace("/dev/tcp/127.0.0.1/8501", f"/dev/tcp/127.0.0.1/{port}")
    return subprocess.run(["bash", "-c", script], capture_output=True, timeout=10).returncode


def test_compose_and_kubernetes_use_the_same_check() -> None:
    scripts = _probe_scripts()
    assert len({tuple(s) for s in scripts.values()}) == 1, scripts


@pytest.mark.parametrize("state", sorted(ANSWERS))
def test_probe_passes_only_when_a_version_is_available(server: _Server, state: str) -> None:
    server.answer = ANSWERS[state]
    server.paths.clear()
    for where, command in _probe_scripts().items():
        code = _run(command, server.port)
        assert (code == 0) == (state in PASSES), f"{where} exit {code} for state {state}"
    assert server.paths and set(server.paths) == {"/v1/models/cifar10"}


def test_probe_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for where, command in _probe_scripts().items():
        assert _run(command, port) != 0, where
