"""Steady background traffic for the fault drills: a few threads posting small uploads in a loop.

Each answer is recorded with when it was sent, how long it took, its status, the model version that
answered (for 200s) and the Retry-After header (for 503s), so a drill can judge the answers given
before, during and after the fault it injects.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np
import requests
from PIL import Image


def small_png(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when the request was sent
    seconds: float
    status: int  # 0: no HTTP answer at all (connection refused or reset, client timeout)
    version: int | None = None
    retry_after: str | None = None
    error: str = ""

    @property
    def done(self) -> float:
        return self.sent + self.seconds


def predict_once(
    session: requests.Session, url: str, image: bytes, timeout: float = 30.0, fresh: bool = False
) -> Answer:
    """One upload. `fresh`: close the connection after it, so the next one may reach another worker."""
    sent = time.monotonic()
    try:
        files = {"images": ("drill.png", image, "image/png")}
        headers = {"Connection": "close"} if fresh else None
        r = session.post(f"{url}/v1/predict", files=files, headers=headers, timeout=timeout)
    except requests.RequestException as error:
        return Answer(sent, time.monotonic() - sent, 0, error=f"{type(error).__name__}: {error}")
    version = None
    if r.status_code == 200:
        version = r.json().get("model", {}).get("version")
    return Answer(sent, time.monotonic() - sent, r.status_code, version, r.headers.get("Retry-After"),
                  "" if r.status_code == 200 else r.text[:300])


def breaker_state(url: str) -> float | None:
    """gateway_breaker_state from /metrics: the highest over the live workers (0 closed, 1 half-open,
    2 open), None when the gateway does not export it (no TF Serving backend) or does not answer.
    Each gunicorn worker has its own breaker, so a run of 200s may all come from one worker while
    another's is still open: this is what says every worker is back."""
    from tests.fixtures.metrics import sample_values

    try:
        text = requests.get(f"{url}/metrics", timeout=5).text
    except requests.RequestException:
        return None
    values = sample_values(text, "gateway_breaker_state")
    return max(values) if values else None


class Traffic:
    """`threads` clients posting in a closed loop until stop(); use as a context manager."""

    def __init__(
        self, url: str, threads: int = 3, timeout: float = 30.0, pause_s: float = 0.0, fresh: bool = False
    ) -> None:
        """`fresh`: a new connection per request. A kept-alive connection stays with one gunicorn
        worker, so drills that must see every worker (a version switch) spread their requests."""
        self.url = url
        self.fresh = fresh
        self.timeout = timeout
        self.pause_s = pause_s
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        image = small_png(index)
        with requests.Session() as session:
            while not self._stop.is_set():
                answer = predict_once(session, self.url, image, self.timeout, self.fresh)
                with self._lock:
                    self.answers.append(answer)
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def wait_for(self, count: int, since: float = 0.0, timeout: float = 60.0) -> list[Answer]:
        """Block until at least `count` requests sent at or after `since` were answered; return them."""
        deadline = time.monotonic() + timeout
        while len(got := self.since(since)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(got)} of {count} answers within {timeout:.0f} s")
            time.sleep(0.05)
        return got

    def since(self, start: float, until: float | None = None) -> list[Answer]:
        return [a for a in self.snapshot() if a.sent >= start and (until is None or a.sent < until)]
