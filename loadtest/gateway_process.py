"""Start the gateway the way production does (gunicorn, serving/gunicorn.conf.py) on a free port.

Used by the load test (loadtest/run.py), by the test suite's fault drills, which need
their own gateway per drill: a model base they can write into, a TF Serving address they control,
a short poll interval or deadline, several workers to kill one of; and by the serving benchmark
(benchmarks/serving_latency.py), which runs the naive Flask baseline under the same launcher.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def master(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def workers(self) -> list[psutil.Process]:
        """The live worker processes (children of the gunicorn master)."""
        return [p for p in self.master.children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def rss_bytes(self) -> int:
        """Resident memory of the master and all its workers together."""
        return sum(p.memory_info().rss for p in [self.master, *self.workers()])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def _answers(url: str, statuses: tuple[int, ...] = (200,)) -> bool:
    try:
        return requests.get(url, timeout=2).status_code in statuses
    except requests.RequestException:
        return False


@contextmanager
def running_gateway(
    env: dict[str, str],
    *,
    workers: int = 2,
    threads: int | None = None,
    wait_ready: bool = True,
    startup_timeout: float = 120.0,
    log_dir: Path | None = None,
    app: str = "serving.app:create_app()",
    probe_path: str | None = None,
    probe_statuses: tuple[int, ...] = (200,),
) -> Iterator[GatewayProcess]:
    """gunicorn serving `app` (the gateway by default) with GATEWAY_* settings from `env`.

    Waits for /readyz (or /healthz when `wait_ready` is False, for drills whose backend is down at
    start; or `probe_path` answering one of `probe_statuses`, for another app). Stops the whole
    process group on exit, so no worker outlives the test.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="gateway-log-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")  # prometheus multiprocess mode needs its own
    full_env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KERAS_BACKEND": "tensorflow",
        **env,
    }
    command = [str(GUNICORN), "-c", "serving/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
               "--workers", str(workers)]
    if threads is not None:
        command += ["--threads", str(threads)]
    command.append(app)
    log_path = log_dir / f"gunicorn-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=full_env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    gateway = GatewayProcess(url, process, log_path)
    try:
        probe = url + (probe_path or ("/readyz" if wait_ready else "/healthz"))

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{gateway.log()[-3000:]}")
            return _answers(probe, probe_statuses)

        try:
            wait_until(up, startup_timeout, f"gateway at {probe} answering 200")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{gateway.log()[-3000:]}") from None
        yield gateway
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                # gunicorn's graceful timeout is 20 s, mostly spent waiting for a worker that is
                # still loading TensorFlow; nothing of a test's gateway needs saving, so cut it short.
                process.wait(timeout=8)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        shutil.rmtree(metrics_dir, ignore_errors=True)
