"""Stable and canary versions: which version answers a request, and per-version metrics.

`MODEL_BASE/<name>/labels.json` (written atomically by `python -m trainer.export promote|rollback|
canary`) says what the gateway serves:

    {"stable": 3, "canary": 4, "canary_percent": 10.0, "mode": "split"}

* no file: today's behaviour, the newest published version takes all traffic;
* `canary` null (or `canary_percent` 0): `stable` takes all traffic, however many newer versions sit
  on disk (a published version waits for `canary`/`promote`);
* mode "split": each request goes to the canary with probability canary_percent/100 (drawn per
  request, so workers need no shared counter); the others go to stable;
* mode "shadow": the user always gets stable's answer; for canary_percent of the requests the canary
  also runs on a copy of the images after the answer is given, and its top-1 agreement with stable
  is recorded. Shadow work runs on a small bounded pool and is dropped, not queued, when the pool is
  busy, so it never adds to a user's latency beyond one image's worth of CPU contention.

In split mode a canary's answers are compared with stable's the same way (stable runs on a copy in
the background), so `/metrics` shows the canary's agreement with stable in both modes.

The file is re-read on the backends' poll, so labels take effect within a poll interval and survive
a gateway restart (they are on disk, not in a worker's memory).
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from contract.labels import (
    CANARY,
    LABELS_FILE,
    MODES,
    SHADOW,
    SPLIT,
    STABLE,
    Labels,
    LabelsError,
    parse_labels,
)
from serving import metrics

# The file format (and the role names) live in contract/labels.py, shared with trainer/export/labels.py;
# re-exported here so the backends import routing and format from one place.
__all__ = [
    "CANARY", "LABELS_FILE", "MODES", "SHADOW", "SPLIT", "STABLE", "Comparisons", "Labels", "LabelsError",
    "LabelsFile", "Router", "active_canary", "describe", "labels_path", "observe", "parse_labels",
    "record_agreement", "top1_agreement",
]  # fmt: skip

log = logging.getLogger(__name__)

# Roles, the `role` label of the per-version metrics: STABLE and CANARY answer users (named as the
# labels), SHADOW ran on a copy of a request in shadow mode.

# Background comparisons (shadow runs, stable re-runs for canary answers) waiting or running at once
# per worker; beyond this they are dropped: under load the user's requests get the CPU.
MAX_PENDING_COMPARISONS = 4


def active_canary(labels: Labels) -> int | None:
    """The canary version that gets traffic (split) or copies (shadow); None when there is none."""
    if labels.canary is None or labels.canary == labels.stable or labels.canary_percent <= 0:
        return None
    return labels.canary


def describe(labels: Labels) -> str:
    if active_canary(labels) is None:
        return f"stable version {labels.stable}"
    share = "of requests mirrored" if labels.mode == SHADOW else "of requests"
    return (
        f"stable version {labels.stable}, canary version {labels.canary} "
        f"({labels.canary_percent:g}% {share}, {labels.mode})"
    )


def rollout(labels: Labels | None, stable: int, canary: int | None) -> dict[str, Any] | None:
    """What /v1/models says a backend routes by: the stable version, and the canary that really gets
    traffic (or copies, in shadow mode), with its share; None without labels.json. `canary` is the
    version the backend can answer with (None while it is not loaded), not merely the one labelled."""
    if labels is None:
        return None
    return {
        "stable": stable,
        "canary": canary,
        "canary_percent": labels.canary_percent if canary is not None else 0.0,
        "mode": labels.mode,
    }


def labels_path(model_dir: Path) -> Path:
    return Path(model_dir) / LABELS_FILE


class LabelsFile:
    """labels.json, re-read when it changes. A file that turns invalid keeps the last good labels
    (a broken edit must not move traffic), with one error in the log per bad content."""

    def __init__(self, model_dir: Path) -> None:
        self.path = labels_path(model_dir)
        self._stamp: tuple[int, int, int] | None = None
        self._labels: Labels | None = None
        self.error = ""  # why the file on disk is not what is applied ("" when it is)

    def read(self) -> Labels | None:
        """The labels in force: None when there is no file (the newest version takes all traffic)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._labels, self.error = None, None, ""
            return None
        except OSError as error:
            self.error = f"{LABELS_FILE} cannot be read ({error.strerror}); keeping the labels in force"
            return self._labels
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)  # rename-replace changes the inode
        if stamp == self._stamp:
            return self._labels
        self._stamp = stamp
        try:
            # Named without its directory: the message reaches /readyz, which shows no server paths.
            labels = parse_labels(self.path.read_text(), LABELS_FILE)
        except (OSError, LabelsError) as error:
            unreadable = f"{LABELS_FILE} cannot be read ({getattr(error, 'strerror', '')})"
            problem = error if isinstance(error, LabelsError) else unreadable
            self.error = f"{problem}; keeping the labels in force"
            log.error("%s (%s)", self.error, self.path)
            return self._labels
        if labels != self._labels:
            log.info("labels: %s", describe(labels))
        self._labels, self.error = labels, ""
        return labels


class Router:
    """Chooses per request: does the canary answer (split) or get a copy (shadow)?

    `rng` is injectable so tests can seed it; the default draws from the OS-seeded module RNG."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # random.Random is not documented as thread-safe

    def canary_chosen(self, labels: Labels | None) -> bool:
        if labels is None or active_canary(labels) is None:
            return False
        with self._lock:
            return self._rng.random() * 100.0 < labels.canary_percent


def observe(version: int | None, role: str, seconds: float, ok: bool) -> None:
    """One prediction call's outcome for the per-version metrics."""
    label = str(version) if version is not None else "none"
    metrics.VERSION_REQUESTS.labels(version=label, role=role).inc()
    metrics.VERSION_SECONDS.labels(version=label, role=role).observe(seconds)
    if not ok:
        metrics.VERSION_ERRORS.labels(version=label, role=role).inc()


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> tuple[int, int]:
    """(rows whose top-1 class matches, rows compared) between two probability arrays [N, C]."""
    reference, other = np.asarray(reference), np.asarray(other)
    if reference.shape != other.shape or reference.ndim != 2:
        return 0, 0  # different class sets: no meaningful agreement
    return int(np.sum(reference.argmax(axis=1) == other.argmax(axis=1))), len(reference)


def record_agreement(version: int, role: str, stable: np.ndarray, other: np.ndarray) -> None:
    agreed, compared = top1_agreement(stable, other)
    if compared:
        metrics.VERSION_COMPARED.labels(version=str(version), role=role).inc(compared)
        metrics.VERSION_AGREED.labels(version=str(version), role=role).inc(agreed)


class Comparisons:
    """Background comparison work (shadow runs; stable re-runs for canary answers), bounded.

    Submitted after the user's answer is computed; at most MAX_PENDING_COMPARISONS wait or run,
    later ones are dropped and counted (gateway_shadow_dropped_total)."""

    def __init__(self, max_pending: int = MAX_PENDING_COMPARISONS, threads: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shadow")
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Condition()
        self._closed = False

    def submit(self, work: Callable[[], None]) -> bool:
        """Run `work` in the background; False when it was dropped (busy or closing)."""
        with self._lock:
            if self._closed or self._pending >= self._max_pending:
                metrics.SHADOW_DROPPED.inc()
                return False
            self._pending += 1
        try:
            self._pool.submit(self._run, work)
        except RuntimeError:  # the pool shut down meanwhile
            self._done()
            return False
        return True

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as error:  # a failed comparison is counted by `work`; never crash the pool
            log.warning("background comparison failed: %s: %s", type(error).__name__, error)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1
            self._lock.notify_all()

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until no comparison is pending (tests); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
