"""Batching across requests: concurrent requests in one worker share one model call.

Every model call has a fixed cost beside the arithmetic (on TensorFlow about 1.5 ms of CPU: a batch
of one costs 5.6 ms per image, a batch of 16 3.8; on LiteRT, the embedded default, far less, but
still a Python call, a thread hand-off and an output copy), so the embedded backend queues each
request's rows here and a batch thread runs whatever is queued as one batch. The parameters are
TensorFlow Serving's (`serving/tfserving/batching_parameters.txt`), with the same meaning, so one
mental model covers both backends:

  max_batch_size        rows in one model call; a request with more rows runs alone, in chunks
  batch_timeout_micros  how long a batch thread, once it has a first request, waits for more
                        before it runs a batch that is not full
  allowed_batch_sizes   batches are padded up to the next of these, so the model sees a few
                        shapes only; the last must equal max_batch_size; empty (the default
                        here, see below) = no padding
  max_enqueued_batches  queued rows beyond max_enqueued_batches x max_batch_size are refused at
                        once (503 with Retry-After) instead of waiting into their deadline
  num_batch_threads     model calls in flight at once in this process

Why batch_timeout_micros defaults to 0 here: a batch thread that is busy lets requests pile up
on its own, so under load batches fill without waiting, and a lone request runs at once. A
timeout only adds latency unless the model's batch cost is flat and traffic is steady.

Every request keeps its own deadline: one whose deadline passes while queued is dropped before
it reaches the model (its caller gets BackendTimeout, the gateway answers 504), and the caller
stops waiting at its deadline even when its batch is already running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from serving import metrics
from serving.backends.base import BackendTimeout, BackendUnavailable

log = logging.getLogger(__name__)
Outputs = np.ndarray | dict[str, np.ndarray]  # one array, or a signature's named outputs
Tag = TypeVar("Tag")  # the model a batch ran on (the embedded backend: a loaded version)


@dataclass(frozen=True)
class BatchingParameters:
    max_batch_size: int = 64  # rows; 64 = the gateway's default GATEWAY_MAX_IMAGES, one full request
    batch_timeout_micros: int = 0  # see the module docstring for why 0
    # No padding by default: the served signature is one compiled function for any batch size (it
    # never retraces), and on CPU a batch costs in proportion to its rows (measured: docs/
    # benchmarks.md), so padding 9 rows to 16 would only spend 7 rows of work on zeros. Set sizes
    # for backends where shapes are compiled (XLA) or when oneDNN's per-shape cache must stay small.
    allowed_batch_sizes: tuple[int, ...] = ()
    max_enqueued_batches: int = 8  # 8 x 64 rows queued is ~1.5 s of this CPU's work: beyond, shed
    num_batch_threads: int = 1  # one model call at a time: the runtime already uses every core in it

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        if self.max_enqueued_batches < 1 or self.num_batch_threads < 1:
            raise ValueError("max_enqueued_batches and num_batch_threads must be >= 1")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] < 1:
                raise ValueError(f"allowed_batch_sizes must be increasing positive sizes, got {list(sizes)}")
            if sizes[-1] != self.max_batch_size:
                raise ValueError(
                    f"the last allowed batch size ({sizes[-1]}) must equal max_batch_size "
                    f"({self.max_batch_size}), as in TensorFlow Serving"
                )

    def padded_size(self, rows: int) -> int:
        """The batch size a batch of `rows` rows is padded to."""
        for size in self.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows


class _Task:
    """One request's rows waiting for, or inside, a batch."""

    __slots__ = ("rows", "deadline", "enqueued", "future")

    def __init__(self, rows: np.ndarray, deadline: float) -> None:
        self.rows = rows
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.future: Future = Future()


class Batcher(Generic[Tag]):
    """Runs batches built from submitted requests: `snapshot()` once per batch picks the model
    (the embedded backend: the served version), `call(model, rows) -> outputs` runs it, where
    outputs is an array [N, ...] or a dict of them (a signature's several outputs), row i of each
    belonging to input row i.

    `submit(rows, timeout_s)` blocks until the request's own rows of the output come back, with
    the model that computed them: a version swap between batches is reported truthfully per
    request, and no batch (nor a large request's chunks) mixes two versions.
    """

    def __init__(
        self,
        snapshot: Callable[[], Tag],
        call: Callable[[Tag, np.ndarray], Outputs],
        parameters: BatchingParameters | None = None,
        *,
        name: str = "batch",
    ) -> None:
        self._snapshot = snapshot
        self._call = call
        self.parameters = parameters or BatchingParameters()
        self._capacity_rows = self.parameters.max_enqueued_batches * self.parameters.max_batch_size
        self._queue: deque[_Task] = deque()
        self._queued_rows = 0
        # Per batch thread: whether the batch it runs shares the model with other requests (see busy).
        self._running = threading.local()
        self._condition = threading.Condition()
        self._closed = False
        # Daemon threads, so they never hold a process open; a stopping worker still answers what is
        # queued: gunicorn waits for its in-flight requests, and close() (atexit) drains the rest.
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(self.parameters.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def busy(self) -> bool:
        """In `call`: whether this batch shares the model with other requests (several in it, or more
        queued behind it), a hint a call may use (the LiteRT runtime then runs on one thread). Read
        per batch thread, so with several batch threads each sees its own batch's."""
        return getattr(self._running, "busy", False)

    # ---- the request side -------------------------------------------------------------------

    def submit(self, rows: np.ndarray, timeout_s: float) -> tuple[Outputs, Tag]:
        """This request's output rows and the call's tag; BackendTimeout at the deadline,
        BackendUnavailable when the queue is full or the batcher is closing."""
        task = _Task(rows, time.monotonic() + timeout_s)
        with self._condition:
            if self._closed:
                raise BackendUnavailable("the gateway is shutting down; retry on another replica")
            if self._queue and self._queued_rows + len(rows) > self._capacity_rows:
                metrics.BATCH_REJECTED.inc()
                raise BackendUnavailable(
                    f"the model queue is full ({self._queued_rows} images waiting); the server is "
                    "overloaded, retry after a moment",
                    retry_after_s=1,
                )
            self._queue.append(task)
            self._queued_rows += len(rows)
            self._condition.notify()
        try:
            return task.future.result(timeout=max(0.0, task.deadline - time.monotonic()))
        except FutureTimeout:
            task.future.cancel()  # still queued: the batch thread skips it, its work is never done
            raise BackendTimeout(
                f"the model did not answer within {timeout_s:g}s (the server is overloaded); "
                "retry later or send fewer images per request"
            ) from None

    # ---- the batch side ---------------------------------------------------------------------

    def _take_batch(self) -> list[_Task] | None:
        """The next batch's tasks (whole requests, at most max_batch_size rows unless one request
        alone is larger), or None once closed and drained."""
        p = self.parameters
        with self._condition:
            while not self._queue:
                if self._closed:
                    return None
                self._condition.wait()
            if p.batch_timeout_micros:
                close_at = self._queue[0].enqueued + p.batch_timeout_micros / 1e6
                while self._queued_rows < p.max_batch_size and not self._closed:
                    left = close_at - time.monotonic()
                    if left <= 0:
                        break
                    self._condition.wait(left)
            tasks = [self._queue.popleft()]
            rows = len(tasks[0].rows)
            while self._queue and rows + len(self._queue[0].rows) <= p.max_batch_size:
                task = self._queue.popleft()
                tasks.append(task)
                rows += len(task.rows)
            self._queued_rows -= rows
            return tasks

    def _loop(self) -> None:
        while (tasks := self._take_batch()) is not None:
            now = time.monotonic()
            live = []
            for task in tasks:
                if not task.future.set_running_or_notify_cancel():
                    continue  # its caller gave up at its deadline
                if now >= task.deadline:
                    task.future.set_exception(BackendTimeout("the deadline passed while queued"))
                    continue
                metrics.BATCH_QUEUE_SECONDS.observe(now - task.enqueued)
                live.append(task)
            if live:
                self._run(live)

    def _run(self, tasks: Sequence[_Task]) -> None:
        rows = np.concatenate([t.rows for t in tasks]) if len(tasks) > 1 else tasks[0].rows
        self._running.busy = len(tasks) > 1 or bool(self._queue)
        try:
            tag = self._snapshot()
            outputs = self._call_padded(tag, rows)
        except BaseException as error:  # every waiting request gets the model's error, none hangs
            for task in tasks:
                task.future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        start = 0
        for task in tasks:
            end = start + len(task.rows)
            task.future.set_result((_rows(outputs, start, end), tag))
            start = end

    def _call_padded(self, tag: Tag, rows: np.ndarray) -> Outputs:
        p = self.parameters
        count = len(rows)
        if count > p.max_batch_size:  # one large request: max_batch_size chunks, one model
            step = p.max_batch_size
            return _concatenate([self._call_padded(tag, rows[i : i + step]) for i in range(0, count, step)])
        size = p.padded_size(count)
        metrics.BATCH_SIZE.observe(count)
        if size > count:
            padding = np.zeros((size - count, *rows.shape[1:]), dtype=rows.dtype)
            rows = np.concatenate([rows, padding])
        return _rows(self._call(tag, rows), 0, count)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, answer those queued, and stop the batch threads."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)


def _rows(outputs: Outputs, start: int, end: int) -> Outputs:
    if isinstance(outputs, dict):
        return {key: value[start:end] for key, value in outputs.items()}
    return outputs[start:end]


def _concatenate(parts: list[Outputs]) -> Outputs:
    if isinstance(parts[0], dict):
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return np.concatenate(parts)
