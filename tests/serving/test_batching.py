"""The cross-request batching queue (serving/batching.py), with a NumPy model whose output says
which rows it was given and which "version" computed them, so every assertion is exact."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.backends.base import BackendTimeout, BackendUnavailable
from serving.batching import Batcher, BatchingParameters


class RecordingModel:
    """output row = input row's id x version; remembers every batch it saw."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.version = 1
        self.delay_s = delay_s
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def snapshot(self) -> int:
        return self.version

    def call(self, version: int, rows: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.lock:
            self.batches.append(rows.copy())
        return rows[:, :1].astype(np.float64) * version


def batcher_for(model: RecordingModel, **parameters: object) -> Batcher[int]:
    return Batcher(model.snapshot, model.call, BatchingParameters(**parameters))


def ids(start: int, count: int) -> np.ndarray:
    return np.arange(start, start + count, dtype=np.float32).reshape(count, 1)


def test_each_request_gets_its_own_rows_back_in_order_under_concurrency() -> None:
    model = RecordingModel(delay_s=0.003)
    batcher = batcher_for(model, max_batch_size=16, allowed_batch_sizes=())
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 9, 300)  # mixed request sizes
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) + 1  # ids from 1: padding rows are 0

    def one(i: int) -> bool:
        rows = ids(int(starts[i]), int(sizes[i]))
        out, version = batcher.submit(rows, timeout_s=30)
        return version == 1 and np.array_equal(out, rows.astype(np.float64))

    try:
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(len(sizes))))
    finally:
        batcher.close()
    assert all(results)
    # Requests really shared model calls, and no call went over max_batch_size.
    assert len(model.batches) < len(sizes) / 2
    assert max(len(b) for b in model.batches) <= 16
    seen = np.sort(np.concatenate(model.batches).ravel())
    assert np.array_equal(seen, np.arange(1, sizes.sum() + 1))  # every row once, none twice


def test_batches_are_padded_to_an_allowed_size_and_the_padding_is_cut_off() -> None:
    model = RecordingModel()
    batcher = batcher_for(model, max_batch_size=8, allowed_batch_sizes=(2, 8))
    try:
        out, _ = batcher.submit(ids(1, 3), timeout_s=10)
        one, _ = batcher.submit(ids(7, 1), timeout_s=10)
    finally:
        batcher.close()
    assert [len(b) for b in model.batches] == [8, 2]
    assert out.ravel().tolist() == [1, 2, 3] and one.ravel().tolist() == [7]


def test_a_request_larger_than_max_batch_size_runs_in_chunks_on_one_version() -> None:
    model = RecordingModel()
    batcher = batcher_for(model, max_batch_size=4, allowed_batch_sizes=(4,))
    try:
        out, version = batcher.submit(ids(1, 10), timeout_s=10)
    finally:
        batcher.close()
    assert out.ravel().tolist() == list(range(1, 11)) and version == 1
    assert [len(b) for b in model.batches] == [4, 4, 4]


def test_a_version_swap_between_batches_is_reported_per_request() -> None:
    model = RecordingModel()
    batcher = batcher_for(model)
    try:
        model.gate.clear()  # the first batch blocks inside the model, on version 1
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(batcher.submit, ids(1, 2), 10)
            time.sleep(0.2)
            second = pool.submit(batcher.submit, ids(5, 3), 10)  # queued behind it
            time.sleep(0.2)
            model.version = 2  # the swap happens mid-batch
            model.gate.set()
            (out1, v1), (out2, v2) = first.result(), second.result()
    finally:
        batcher.close()
    assert (v1, v2) == (1, 2)
    assert out1.ravel().tolist() == [1, 2]  # computed by version 1
    assert out2.ravel().tolist() == [10, 12, 14]  # computed by version 2 (ids x 2)


def test_a_request_past_its_deadline_gets_a_timeout_and_never_reaches_the_model() -> None:
    model = RecordingModel()
    batcher = batcher_for(model)
    try:
        model.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(batcher.submit, ids(1, 1), 10)
            time.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(BackendTimeout, match="within 0.3s"):
                batcher.submit(ids(100, 2), timeout_s=0.3)
            assert time.monotonic() - started < 1.5  # it stopped waiting at its deadline
            model.gate.set()
            stuck.result()
            out, _ = batcher.submit(ids(200, 1), timeout_s=10)
    finally:
        batcher.close()
    assert out.ravel().tolist() == [200]
    seen = np.concatenate(model.batches).ravel().tolist()
    assert 100 not in seen and 101 not in seen  # the timed-out request's work was dropped


def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    model = RecordingModel()
    batcher = Batcher(
        model.snapshot,
        model.call,
        BatchingParameters(max_batch_size=2, allowed_batch_sizes=(), max_enqueued_batches=1),
    )
    try:
        model.gate.clear()
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(batcher.submit, ids(1, 1), 10)
            time.sleep(0.2)  # taken by the batch thread, blocked in the model
            queued = pool.submit(batcher.submit, ids(2, 2), 10)  # fills the queue (2 rows)
            time.sleep(0.2)
            with pytest.raises(BackendUnavailable, match="queue is full") as refused:
                batcher.submit(ids(9, 1), timeout_s=10)
            assert refused.value.retry_after_s >= 1
            model.gate.set()
            assert running.result()[0].ravel().tolist() == [1]
            assert queued.result()[0].ravel().tolist() == [2, 3]
    finally:
        batcher.close()


def test_a_model_error_reaches_every_request_of_the_batch_and_the_batcher_goes_on() -> None:
    calls = []

    def failing_once(version: int, rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("kernel failed")
        return rows[:, :1].astype(np.float64)

    batcher = Batcher(lambda: 1, failing_once, BatchingParameters(allowed_batch_sizes=()))
    try:
        with pytest.raises(RuntimeError, match="kernel failed"):
            batcher.submit(ids(1, 1), timeout_s=10)
        out, _ = batcher.submit(ids(4, 1), timeout_s=10)
    finally:
        batcher.close()
    assert out.ravel().tolist() == [4]


def test_close_answers_what_is_queued_then_refuses_new_requests() -> None:
    model = RecordingModel(delay_s=0.05)
    batcher = batcher_for(model, max_batch_size=2, allowed_batch_sizes=())
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batcher.submit, ids(10 * i + 1, 2), 30) for i in range(6)]
        time.sleep(0.05)
        batcher.close()  # as on SIGTERM: the queue is drained, nothing is lost
        answers = [f.result()[0].ravel().tolist() for f in futures]
    assert answers == [[10 * i + 1, 10 * i + 2] for i in range(6)]
    with pytest.raises(BackendUnavailable, match="shutting down"):
        batcher.submit(ids(1, 1), timeout_s=1)


def test_a_batch_timeout_waits_for_more_requests_when_the_model_is_idle() -> None:
    model = RecordingModel()
    batcher = Batcher(
        model.snapshot,
        model.call,
        BatchingParameters(max_batch_size=8, allowed_batch_sizes=(), batch_timeout_micros=300_000),
    )
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(batcher.submit, ids(i + 1, 1), 10) for i in range(4)]
            [f.result() for f in futures]
    finally:
        batcher.close()
    assert [len(b) for b in model.batches] == [4]  # one call for all four, not four calls


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 32, "allowed_batch_sizes": (8, 16)}, "must equal max_batch_size"),
        ({"allowed_batch_sizes": (8, 4, 64)}, "increasing"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_inconsistent_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchingParameters(**kwargs)


def test_a_signature_with_several_outputs_is_split_per_request() -> None:
    def two_outputs(version: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": rows[:, :1] * 10, "score": rows[:, 0] + 0.5}

    batcher = Batcher(lambda: 1, two_outputs, BatchingParameters(max_batch_size=3))
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(batcher.submit, ids(1 + 2 * i, 2), 10) for i in range(4)]
            answers = [f.result()[0] for f in futures]
    finally:
        batcher.close()
    for i, answer in enumerate(answers):
        assert answer["probabilities"].ravel().tolist() == [10 * (1 + 2 * i), 10 * (2 + 2 * i)]
        assert answer["score"].tolist() == [1.5 + 2 * i, 2.5 + 2 * i]


def test_busy_says_whether_other_requests_share_the_model() -> None:
    """A lone request runs with busy False (the LiteRT runtime then uses all its threads); a batch
    run while others wait, or holding several requests, with busy True."""
    model = RecordingModel()
    seen: list[tuple[int, bool]] = []
    batcher: Batcher[int] = Batcher(
        model.snapshot,
        lambda version, rows: (seen.append((len(rows), batcher.busy)), model.call(version, rows))[1],
        BatchingParameters(max_batch_size=8, allowed_batch_sizes=()),
    )
    try:
        batcher.submit(ids(1, 3), timeout_s=10)  # alone: one request of 3 rows
        model.gate.clear()
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(batcher.submit, ids(10, 1), 10)
            time.sleep(0.2)  # taken, blocked in the model; the next two queue behind it
            later = [pool.submit(batcher.submit, ids(20 + i, 1), 10) for i in range(2)]
            time.sleep(0.2)
            model.gate.set()
            first.result(), [f.result() for f in later]
    finally:
        batcher.close()
    assert seen[0] == (3, False)
    assert seen[1] == (1, False)  # taken while nothing else waited
    assert seen[2] == (2, True)  # the two queued requests, run together
