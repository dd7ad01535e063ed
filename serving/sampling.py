"""Prediction sampling: a share of /v1/predict requests kept for relabelling and drift checks.

    python -m serving.sampling export --dir SAMPLES --out FOLDER     # an image folder to relabel
    python -m serving.sampling drift --dir SAMPLES --model-dir MODEL_BASE/cifar10/3 [--run-dir RUN]
    python -m serving.sampling stats|prune|delete --dir SAMPLES       # look, apply retention, erase

The gateway calls `record(images, prediction, request_id)` after each successful predict. With
GATEWAY_SAMPLE_RATE > 0 that share of requests is kept in GATEWAY_SAMPLE_DIR/samples.sqlite3, one row
per image: request id, time, model name and version, the 32x32 input the model saw, its probabilities,
the answer (top class and its probability) and `ood_score`/`abstain` when the version has them.

Never on the request's path: record() only draws the random number and puts the request on a bounded
in-memory queue (dropped, and counted, when full); a writer thread per worker process writes batches.
The store is SQLite in WAL mode, so gunicorn's worker processes write to the same file at once (each
waits for the write lock in its own writer thread) while the export and drift commands read.
It is bounded by GATEWAY_SAMPLE_MAX_RECORDS (oldest rows go first) and GATEWAY_SAMPLE_RETENTION_HOURS
(checked on every write batch and every minute while the gateway runs, and by `prune`). Deleted rows
are overwritten in the file (SQLite's secure_delete). Failures are logged and counted in
gateway_sample_errors_total{reason}; they never fail or slow a request. docs/deploy.md has the privacy
note: what is stored, where, for how long, how to turn it off and delete it.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import datetime as dt
import hashlib
import json
import logging
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.signatures import INPUT_SIZE
from serving import metrics

logger = logging.getLogger(__name__)

SAMPLE_FILE = "samples.sqlite3"
IMAGE_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)
QUEUE_SIZE = 1000  # requests waiting for the writer; beyond it samples are dropped, not waited for
PRUNE_INTERVAL_S = 60.0  # age retention also runs this often in an idle gateway
_WRITE_BATCH = 256  # rows per transaction at most
_BUSY_TIMEOUT_S = 10.0  # the writer thread may wait this long for another worker's write lock
_EXTENSION_KEY = "gateway.sampler"
_OFF = "off"  # app.extensions value when sampling is off in this process

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order across all writers, never reused
    time REAL NOT NULL,                    -- Unix seconds when the gateway answered
    request_id TEXT NOT NULL,
    image_index INTEGER NOT NULL,          -- position of the image in its request
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    class_names TEXT NOT NULL,             -- JSON list: the column order of probabilities
    image BLOB NOT NULL,                   -- uint8 [32, 32, 3] RGB, row-major: what the model saw
    probabilities BLOB NOT NULL,           -- float32 little-endian [C]
    label TEXT NOT NULL,                   -- the answer: the top class
    confidence REAL NOT NULL,              -- its probability
    ood_score REAL,                        -- NULL for versions exported without it
    abstain INTEGER                        -- 0/1, NULL likewise
);
CREATE INDEX IF NOT EXISTS samples_time ON samples (time);
CREATE INDEX IF NOT EXISTS samples_request ON samples (request_id);
"""
_COLUMNS = (
    "time, request_id, image_index, model_name, model_version, class_names, image, probabilities, "
    "label, confidence, ood_score, abstain"
)


class SampleError(Exception):
    """The sample cannot be read or written as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class SampleRecord:
    row_id: int
    time: float
    request_id: str
    image_index: int
    model_name: str
    model_version: int
    class_names: tuple[str, ...]
    image: np.ndarray  # uint8 [32, 32, 3]
    probabilities: np.ndarray  # float32 [C]
    label: str
    confidence: float
    ood_score: float | None
    abstain: bool | None


# --------------------------------------------------------------------------------------------------
# The store


class SampleStore:
    """One SQLite file in WAL mode under `directory`. A connection belongs to the thread that opened
    the store (sqlite3's rule); open one store per thread or process."""

    def __init__(
        self,
        directory: Path,
        *,
        max_records: int | None = None,
        retention_hours: float | None = None,
        create: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / SAMPLE_FILE
        self.max_records = max_records
        self.retention_hours = retention_hours
        if not create and not self.path.is_file():
            raise SampleError(
                f"no prediction sample at {self.path}: point --dir at the gateway's GATEWAY_SAMPLE_DIR "
                "(sampling writes there only while GATEWAY_SAMPLE_RATE > 0 and requests come in)"
            )
        if create:
            # Owner-only: the sample holds users' images. SQLite gives its -wal and -shm files the mode of
            # the database file, so the file is created 0600 before SQLite opens it (empty is valid).
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._setup(create)
        except BaseException:
            self._conn.close()
            raise

    def _setup(self, create: bool) -> None:
        conn = self._conn
        # Deleted rows (retention, bounds, `delete`) are overwritten with zeros, not left in free pages.
        conn.execute("PRAGMA secure_delete = ON")
        if not create:
            return
        # Switching to WAL takes an exclusive lock and may report "locked" without waiting while
        # another worker does the same at start-up; WAL then stays set in the file for everyone.
        # 8 KiB pages hold two 3.3 KB records (4 KiB pages hold one): half the file for the same sample.
        # It only takes effect on a new, empty file.
        conn.execute("PRAGMA page_size = 8192")
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                conn.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode.lower() != "wal":
            raise SampleError(
                f"{self.path}: SQLite refused WAL mode ({mode}); put GATEWAY_SAMPLE_DIR on a local disk"
            )
        conn.execute("PRAGMA journal_size_limit = 8388608")  # the WAL shrinks to 8 MiB after checkpoints
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL's fast setting; a power cut may lose the last rows

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Rows in _COLUMNS order, in one transaction with the count bound. The oldest rows make room
        first, so their pages are free for the new ones and the file stays at about the bound."""
        conn = self._conn
        if self.max_records is not None:
            rows = rows[-self.max_records :]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self.max_records is not None:
                room = self.max_records - len(rows)
                if room == 0:
                    conn.execute("DELETE FROM samples")
                else:
                    self._bound(room)
            conn.executemany(f"INSERT INTO samples ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _bound(self, max_records: int) -> int:
        # Keep the newest max_records rows: ids grow with insertion order across all writers.
        return self._conn.execute(
            "DELETE FROM samples WHERE id < (SELECT id FROM samples ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (max_records - 1,),
        ).rowcount

    def prune(self, now: float | None = None) -> int:
        """Apply retention by age and the count bound; returns the rows deleted."""
        deleted = 0
        if self.retention_hours is not None:
            cutoff = (time.time() if now is None else now) - self.retention_hours * 3600
            deleted += self._conn.execute("DELETE FROM samples WHERE time < ?", (cutoff,)).rowcount
        if self.max_records is not None:
            deleted += self._bound(self.max_records)
        if deleted:
            self.checkpoint()
        return deleted

    def checkpoint(self) -> None:
        """Move the WAL into the database and truncate it, so deleted rows leave the WAL file too."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:  # a reader holds the WAL: the next checkpoint gets it
            pass

    def delete(self, *, request_id: str | None = None) -> int:
        """Delete one request's rows (request_id) or all rows (None); returns the rows deleted. The
        files stay (empty, and shrunk when no gateway is writing), so a running gateway's workers keep
        writing into the file the commands read, not into an unlinked one."""
        if request_id is None:
            deleted = self._conn.execute("DELETE FROM samples").rowcount
        else:
            deleted = self._conn.execute("DELETE FROM samples WHERE request_id = ?", (request_id,)).rowcount
        self.checkpoint()
        if request_id is None:
            try:
                self._conn.execute("VACUUM")  # give the space back
            except sqlite3.OperationalError:  # a worker is writing: its pages are reused instead
                pass
        return deleted

    def count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM samples").fetchone()[0]

    def summary(self) -> dict[str, Any]:
        rows = self._conn.execute(
            "SELECT model_name, model_version, count(*), min(time), max(time) FROM samples "
            "GROUP BY model_name, model_version ORDER BY model_name, model_version"
        ).fetchall()
        return {
            "path": str(self.path),
            "records": sum(r[2] for r in rows),
            "bytes": sum(p.stat().st_size for p in self.directory.glob(SAMPLE_FILE + "*") if p.is_file()),
            "versions": [
                {"model_name": n, "model_version": v, "records": c, "first": _iso(t0), "last": _iso(t1)}
                for n, v, c, t0, t1 in rows
            ],
        }

    def records(
        self,
        *,
        model_version: int | None = None,
        since: float | None = None,
        until: float | None = None,
        abstained_only: bool = False,
        limit: int | None = None,
    ) -> Iterator[SampleRecord]:
        """Records oldest first, filtered as asked (times in Unix seconds, `until` exclusive)."""
        where, params = [], []
        if model_version is not None:
            where.append("model_version = ?")
            params.append(model_version)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time < ?")
            params.append(until)
        if abstained_only:
            where.append("abstain = 1")
        sql = f"SELECT id, {_COLUMNS} FROM samples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        for row in self._conn.execute(sql, params):
            yield _record(row)


def _record(row: tuple[Any, ...]) -> SampleRecord:
    (row_id, t, request_id, index, name, version, names, image, probs, label, confidence, ood, abstain) = row
    return SampleRecord(
        row_id=row_id,
        time=t,
        request_id=request_id,
        image_index=index,
        model_name=name,
        model_version=version,
        class_names=tuple(json.loads(names)),
        image=np.frombuffer(image, dtype=np.uint8).reshape(IMAGE_SHAPE),
        probabilities=np.frombuffer(probs, dtype="<f4").astype(np.float32),
        label=label,
        confidence=confidence,
        ood_score=ood,
        abstain=None if abstain is None else bool(abstain),
    )


def rows_for(images: np.ndarray, prediction: Any, request_id: str, at: float) -> list[tuple[Any, ...]]:
    """One row per image of a request, in _COLUMNS order."""
    images = np.asarray(images)
    probabilities = np.asarray(prediction.probabilities, dtype=np.float32)
    if images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images {list(IMAGE_SHAPE)}, got {images.dtype} {images.shape}")
    if probabilities.ndim != 2 or probabilities.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but probabilities shaped {list(probabilities.shape)}")
    names = tuple(prediction.class_names)
    ood = getattr(prediction, "ood_score", None)
    abstain = getattr(prediction, "abstain", None)
    top = probabilities.argmax(axis=1)
    names_json = json.dumps(list(names))
    rows = []
    for i in range(images.shape[0]):
        rows.append((
            at, request_id, i, prediction.model_name, int(prediction.model_version), names_json,
            np.ascontiguousarray(images[i]).tobytes(), probabilities[i].astype("<f4").tobytes(),
            names[top[i]], float(probabilities[i, top[i]]),
            None if ood is None else float(np.asarray(ood)[i]),
            None if abstain is None else int(bool(np.asarray(abstain)[i])),
        ))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------
# The sampler: the gateway side


class Sampler:
    """Decides which requests to keep and writes them from a background thread of this process."""

    def __init__(
        self,
        directory: Path,
        rate: float,
        *,
        max_records: int,
        retention_hours: float,
        queue_size: int = QUEUE_SIZE,
        seed: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.rate = rate
        self.max_records = max_records
        self.retention_hours = retention_hours
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._random = random.Random(seed)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._last_error_log = 0.0
        self._closed = False

    def record(self, images: np.ndarray, prediction: Any, request_id: str | None) -> bool:
        """Keep this request with probability `rate`; True when it was queued for writing."""
        if self.rate <= 0 or self._closed or self._random.random() >= self.rate:
            return False
        self._ensure_thread()
        try:
            # The arrays of a Prediction are not written to after it is returned; the images are the
            # request's own batch. Copying the images keeps the sample independent of either anyway.
            self._queue.put_nowait((np.array(images, copy=True), prediction, request_id or "-", time.time()))
        except queue.Full:
            metrics.SAMPLE_ERRORS.labels(reason="queue_full").inc(len(images))
            return False
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most `timeout`), then stop the writer thread."""
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self.flush(timeout)
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                # Started on the first sampled request, so in the worker process (after gunicorn's fork).
                self._thread = threading.Thread(target=self._run, name="prediction-sampler", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def _run(self) -> None:
        store: SampleStore | None = None
        last_prune = float("-inf")  # the first write prunes: a restarted gateway applies retention at once
        while True:
            items: list[tuple[Any, ...]] = []
            got, stop = 0, False
            try:
                first = self._queue.get(timeout=PRUNE_INTERVAL_S)
                got += 1
                stop = first is None
                if not stop:
                    items.append(first)
            except queue.Empty:
                pass  # idle: only prune
            while items and not stop and len(items) < _WRITE_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                got += 1
                stop = more is None
                if not stop:
                    items.append(more)
            try:
                prune = time.monotonic() - last_prune >= PRUNE_INTERVAL_S
                store = self._write(store, items, prune)
                if prune and store is not None:
                    last_prune = time.monotonic()
            finally:
                for _ in range(got):
                    self._queue.task_done()
            if stop:
                if store is not None:
                    store.close()
                return

    def _write(
        self, store: SampleStore | None, items: list[tuple[Any, ...]], prune: bool
    ) -> SampleStore | None:
        """Write a batch of queued requests (and prune when due); returns the open store, or None
        after a failure (it is reopened on the next batch)."""
        rows: list[tuple[Any, ...]] = []
        for images, prediction, request_id, at in items:
            try:
                rows.extend(rows_for(images, prediction, request_id, at))
            except Exception as error:  # a malformed prediction loses its own sample only
                self._failed("bad_prediction", len(images), error)
        if not rows and not prune:
            return store
        try:
            if store is None:
                store = SampleStore(
                    self.directory, max_records=self.max_records, retention_hours=self.retention_hours
                )
            if rows:
                store.insert(rows)
                metrics.SAMPLE_RECORDS.inc(len(rows))
            if prune:
                store.prune()
            return store
        except Exception as error:  # the writer must survive a full disk or a bad directory
            self._failed("write_failed", len(rows), error)
            if store is not None:
                store.close()
            return None

    def _failed(self, reason: str, count: int, error: Exception) -> None:
        if count:
            metrics.SAMPLE_ERRORS.labels(reason=reason).inc(count)
        now = time.monotonic()
        if now - self._last_error_log >= 60.0:  # one line a minute, not one per request
            self._last_error_log = now
            logger.error(
                "prediction sampling: %d image(s) not stored (%s) in %s: %s: %s; requests are unaffected",
                count, reason, self.directory, type(error).__name__, error,
            )  # fmt: skip


def sampler_from_settings(settings: Any) -> Sampler | None:
    """The Sampler the gateway's settings ask for, or None when sampling is off."""
    if settings.sample_rate <= 0 or settings.sample_dir is None:
        return None
    return Sampler(
        settings.sample_dir,
        settings.sample_rate,
        max_records=settings.sample_max_records,
        retention_hours=settings.sample_retention_hours,
    )


_app_lock = threading.Lock()


def record(images_uint8: np.ndarray, prediction: Any, request_id: str | None) -> None:
    """The gateway's hook after a successful predict: keep this request in the sample (or not).

    A no-op when GATEWAY_SAMPLE_RATE is 0 or outside a Flask app. Never raises: a failure is logged
    and counted in gateway_sample_errors_total, and the request is answered as if nothing happened.
    """
    try:
        sampler = _app_sampler()
        if sampler is not None:
            sampler.record(images_uint8, prediction, request_id)
    except Exception:  # sampling must never fail the request it observes
        logger.exception("prediction sampling failed; the request is unaffected")
        metrics.SAMPLE_ERRORS.labels(reason="record_failed").inc()


def _app_sampler() -> Sampler | None:
    from flask import current_app, has_app_context

    if not has_app_context():
        return None
    extensions = current_app.extensions
    sampler = extensions.get(_EXTENSION_KEY)
    if sampler is None:
        from serving.context import settings

        with _app_lock:
            sampler = extensions.get(_EXTENSION_KEY)
            if sampler is None:
                sampler = sampler_from_settings(settings()) or _OFF
                extensions[_EXTENSION_KEY] = sampler
    return None if sampler is _OFF else sampler


def app_sampler(app: Any) -> Sampler | None:
    """The sampler `app` has started (None: off, or no request sampled yet); tests flush it."""
    sampler = app.extensions.get(_EXTENSION_KEY)
    return None if sampler in (None, _OFF) else sampler


# --------------------------------------------------------------------------------------------------
# Export for relabelling


def _split_of(record: SampleRecord, test_fraction: float) -> str:
    # Stable across runs: the same record always lands in the same split.
    digest = hashlib.sha256(f"{record.request_id}/{record.image_index}/{record.time!r}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _safe_folder(label: str) -> str:
    if not label or label.startswith(".") or "/" in label or "\\" in label or "\0" in label:
        raise SampleError(
            f"class name {label!r} cannot be a folder name; rename the class in the training data"
        )
    return label


def export_image_folder(
    store: SampleStore,
    out: Path,
    *,
    test_fraction: float = 0.2,
    model_version: int | None = None,
    since: float | None = None,
    until: float | None = None,
    abstained_only: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write OUT/{train,test}/<predicted label>/<request id>-<image index>.png and OUT/manifest.csv,
    the layout `python -m trainer train --dataset imagefolder --data-dir OUT` reads. Every class of
    the model gets a folder in both splits (the loader needs the same classes in each), so a
    relabeller only moves files between folders. Returns a summary."""
    from PIL import Image

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SampleError(f"{out} is not empty; choose a new --out directory (nothing is overwritten)")
    records = list(store.records(model_version=model_version, since=since, until=until,
                                 abstained_only=abstained_only, limit=limit))  # fmt: skip
    if not records:
        raise SampleError(
            f"no sampled records match in {store.path} (model version {model_version}, since {_iso(since)}, "
            f"until {_iso(until)}, abstained only {abstained_only}); widen the filters or check `stats`"
        )
    class_lists = {r.class_names for r in records}
    if len(class_lists) > 1:
        raise SampleError(
            f"the selected records come from models with different classes ({sorted(class_lists)}); "
            "pass --model-version to export one version's classes"
        )
    class_names = next(iter(class_lists))
    for split in ("train", "test"):
        for name in class_names:
            (out / split / _safe_folder(name)).mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    counts = {"train": 0, "test": 0}
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "split", "predicted_label", "confidence", "ood_score", "abstain",
                         "request_id", "image_index", "time_utc", "model_name", "model_version",
                         "probabilities"])  # fmt: skip
        for r in records:
            split = _split_of(r, test_fraction)
            # Request ids are [A-Za-z0-9._-]; a leading dot would make the image loader skip the file.
            stem = f"{r.request_id}-{r.image_index}".lstrip(".") or "request"
            path = out / split / r.label / f"{stem}.png"
            if path.exists():  # a client reused a request id: keep both
                path = path.with_name(f"{stem}-{r.row_id}.png")
            Image.fromarray(r.image, mode="RGB").save(path, format="PNG")
            counts[split] += 1
            writer.writerow([
                path.relative_to(out).as_posix(), split, r.label, f"{r.confidence:.6f}",
                "" if r.ood_score is None else f"{r.ood_score:.6f}",
                "" if r.abstain is None else int(r.abstain), r.request_id, r.image_index, _iso(r.time),
                r.model_name, r.model_version, json.dumps([round(float(p), 6) for p in r.probabilities]),
            ])  # fmt: skip
    return {"out": str(out), "records": len(records), **counts, "classes": list(class_names),
            "manifest": str(manifest)}  # fmt: skip


def _time_arg(raw: str) -> float:
    """A command-line time: ISO 8601 (UTC when it names no zone) or Unix seconds."""
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a time: use ISO 8601, e.g. 2026-12-06T14:00:00Z, or Unix seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------------
# The command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from serving.config import Settings

    # Defaults come from the same GATEWAY_* variables the gateway reads, so inside its container the
    # commands find its sample and bounds without flags.
    try:
        settings = Settings.from_env()
    except ValueError:
        settings = Settings()
    default_dir = settings.sample_dir
    p = argparse.ArgumentParser(prog="python -m serving.sampling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", type=Path, default=default_dir, required=default_dir is None,
                       help="the sample directory (GATEWAY_SAMPLE_DIR; default from the environment)")

    def times(q: argparse.ArgumentParser) -> None:
        q.add_argument("--since-hours", type=float, help="only records of the last H hours")
        q.add_argument("--since", type=_time_arg, help="only records from this time on (ISO 8601, UTC)")
        q.add_argument("--until", type=_time_arg, help="only records before this time (ISO 8601)")

    def filters(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model-version", type=int, help="only records answered by this version")
        times(q)

    e = sub.add_parser("export", help="write an image folder (train/ and test/) to relabel and train on")
    common(e)
    filters(e)
    e.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    e.add_argument("--test-fraction", type=float, default=0.2, help="share of images put in test/ (0.2)")
    e.add_argument("--abstained-only", action="store_true", help="only images the model was not sure of")
    e.add_argument("--limit", type=int, help="at most this many images (oldest first)")

    d = sub.add_parser("drift", help="compare served traffic with the model's reference statistics")
    common(d)
    times(d)
    d.add_argument("--model-dir", type=Path, required=True,
                   help="MODEL_BASE/<name>/<version>: its assets.extra/reference_stats.json is the "
                   "reference; only records answered by that version are compared (see --any-version)")
    d.add_argument("--reference", type=Path, help="a reference_stats.json to use instead of the model's")
    d.add_argument("--run-dir", type=Path, help="the training run: also compare pixels with its dataset.json")
    d.add_argument("--any-version", action="store_true", help="compare records of every version")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    from serving.drift import Thresholds

    t = Thresholds()
    d.add_argument("--min-records", type=int, default=t.min_records,
                   help=f"fewer sampled images than this is an error, not a verdict ({t.min_records})")
    d.add_argument("--class-tv", type=float, default=t.class_tv,
                   help=f"class-share total variation distance that counts as drift ({t.class_tv})")
    d.add_argument("--psi", type=float, default=t.psi,
                   help=f"population stability index of confidence/ood_score histograms ({t.psi})")
    d.add_argument("--abstain-delta", type=float, default=t.abstain_delta,
                   help=f"change of the abstain rate, absolute ({t.abstain_delta})")
    d.add_argument("--pixel-mean-std", type=float, default=t.pixel_mean_std,
                   help=f"pixel mean shift in reference standard deviations ({t.pixel_mean_std})")
    d.add_argument("--pixel-std-ratio", type=float, default=t.pixel_std_ratio,
                   help=f"pixel std ratio (either way) that counts as drift ({t.pixel_std_ratio})")
    d.add_argument("--p-value", type=float, default=t.p_value,
                   help=f"significance a change must also reach, all but the std ratio ({t.p_value})")

    s = sub.add_parser("stats", help="records per model version, time range and size on disk")
    common(s)

    r = sub.add_parser("prune", help="apply retention and the record bound now")
    common(r)
    r.add_argument("--retention-hours", type=float, default=settings.sample_retention_hours,
                   help=f"delete records older than this (GATEWAY_SAMPLE_RETENTION_HOURS, "
                   f"{settings.sample_retention_hours:g})")
    r.add_argument("--max-records", type=int, default=settings.sample_max_records,
                   help=f"keep at most this many (GATEWAY_SAMPLE_MAX_RECORDS, {settings.sample_max_records})")

    x = sub.add_parser("delete", help="erase one request's records, or the whole sample")
    common(x)
    which = x.add_mutually_exclusive_group(required=True)
    which.add_argument("--request-id", help="the X-Request-ID of the request to erase")
    which.add_argument("--all", action="store_true", help="erase every record (the empty files stay)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """0: done (drift: none found); 1: drift found; 2: an error, named on stderr."""
    args = _parse_args(argv)
    since = getattr(args, "since", None)
    if getattr(args, "since_hours", None) is not None:
        since = max(since or 0.0, time.time() - args.since_hours * 3600)
    until = getattr(args, "until", None)
    try:
        if args.command == "prune":
            with SampleStore(args.dir, create=False, max_records=args.max_records,
                             retention_hours=args.retention_hours) as store:  # fmt: skip
                print(f"deleted {store.prune()} record(s); {store.count()} kept in {store.path}")
            return 0
        with SampleStore(args.dir, create=False) as store:
            if args.command == "delete":
                deleted = store.delete(request_id=None if args.all else args.request_id)
                which = "(all of them)" if args.all else f"of request {args.request_id}"
                print(f"deleted {deleted} record(s) {which} from {store.path}")
                return 0
            if args.command == "stats":
                print(json.dumps(store.summary(), indent=2))
                return 0
            if args.command == "export":
                summary = export_image_folder(
                    store, args.out, test_fraction=args.test_fraction, model_version=args.model_version,
                    since=since, until=until, abstained_only=args.abstained_only, limit=args.limit,
                )  # fmt: skip
                print(f"exported {summary['records']} image(s) to {summary['out']} "
                      f"(train {summary['train']}, test {summary['test']}); manifest {summary['manifest']}")
                print(f"relabel by moving files between class folders, then: python -m trainer train "
                      f"--dataset imagefolder --data-dir {summary['out']}")
                return 0
            return _drift(store, args, since, until)
    except SampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as error:
        print(f"error: {args.dir}/{SAMPLE_FILE} could not be read ({error}); is it a prediction sample?",
              file=sys.stderr)
        return 2


def _drift(store: SampleStore, args: argparse.Namespace, since: float | None, until: float | None) -> int:
    from serving import drift

    thresholds = drift.Thresholds(
        min_records=args.min_records, class_tv=args.class_tv, psi=args.psi, abstain_delta=args.abstain_delta,
        pixel_mean_std=args.pixel_mean_std, pixel_std_ratio=args.pixel_std_ratio, p_value=args.p_value,
    )  # fmt: skip
    try:
        reference = drift.load_reference(args.model_dir, args.reference)
        training = drift.load_training_stats(args.run_dir) if args.run_dir else None
        version = None if args.any_version else drift.version_of(args.model_dir)
        records = list(store.records(model_version=version, since=since, until=until))
        report = drift.compare(records, reference, thresholds, training=training)
    except drift.DriftInputError as error:
        raise SampleError(str(error)) from None
    scope = [str(store.path), "all model versions" if version is None else f"model version {version}"]
    scope += [f"since {_iso(since)}"] if since is not None else []
    scope += [f"until {_iso(until)}"] if until is not None else []
    report.sample_scope = ", ".join(scope)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 1 if report.drifted else 0


if __name__ == "__main__":
    sys.exit(main())
