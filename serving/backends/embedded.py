"""The model in process: the highest published SavedModel version, called through its compiled
`serving_default` signature, swapped for a newer version when one is published."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from contract.signatures import CLASSES_KEY, IMAGES_KEY, PROBABILITIES_KEY, SAVED_MODEL_FILE, SERVING_DEFAULT
from contract.versions import published_versions
from serving.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Explanation,
    ModelStatus,
    Prediction,
    served_detail,
)
from serving.backends.explain import explain_saved_model
from serving.batching import Batcher, BatchingParameters

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class LoadedModel:
    version: int
    signature: Any  # a ConcreteFunction: images float32 [N,32,32,3] -> {probabilities, classes}
    class_names: tuple[str, ...]
    saved_model: Any  # keeps the variables the signature reads alive


def load_version(model_dir: Path, version: int, signature_name: str = SERVING_DEFAULT) -> LoadedModel:
    """Load one version and run it once, so the first request does not pay for tracing."""
    import tensorflow as tf  # imported here so the gateway's TF Serving mode need not load it eagerly

    path = model_dir / str(version)
    saved_model = tf.saved_model.load(str(path))
    if signature_name not in saved_model.signatures:
        raise BackendError(
            f"version {version} has no signature {signature_name!r} "
            f"(it has {sorted(saved_model.signatures)}); export it with trainer/export"
        )
    signature = saved_model.signatures[signature_name]
    outputs = signature(**{IMAGES_KEY: tf.zeros([1, 32, 32, 3], tf.float32)})
    class_names = tuple(c.decode("utf-8") for c in outputs[CLASSES_KEY].numpy()[0])
    return LoadedModel(version=version, signature=signature, class_names=class_names, saved_model=saved_model)


class EmbeddedBackend:
    kind = "embedded"

    def __init__(
        self,
        model_base_path: Path,
        model_name: str,
        *,
        poll_interval_s: float = 2.0,
        signature_name: str = SERVING_DEFAULT,
        deadline_s: float = 5.0,
        batching: BatchingParameters | None = None,
        explain_threads: int = 2,
    ) -> None:
        self.model_name = model_name
        self.model_dir = Path(model_base_path) / model_name
        self.poll_interval_s = poll_interval_s
        self.signature_name = signature_name
        self.deadline_s = deadline_s
        # Predictions from concurrent requests run together (serving/batching.py); explanations (a
        # backward pass each, rarer) run on their own small pool. Both give up at the deadline
        # (504) instead of waiting behind an overloaded CPU, and drop work still queued then.
        self._batcher: Batcher[LoadedModel] = Batcher(
            self._loaded, _call_signature, batching, name=f"{model_name}-batch"
        )
        self._pool = ThreadPoolExecutor(max_workers=explain_threads, thread_name_prefix="explain")
        self._current: LoadedModel | None = None
        self._last_error = ""
        # Versions that failed to load, with their saved_model.pb's mtime: retried only if the file
        # changes, so a broken version costs one traceback, not one per poll per worker forever.
        self._broken: dict[int, float] = {}
        self._broken_errors: dict[int, str] = {}  # the same versions' load errors, for status()
        self._stop = threading.Event()
        self.refresh()  # load now so a ready worker answers its first request at full speed
        self._poller = threading.Thread(target=self._poll, name="model-version-poller", daemon=True)
        self._poller.start()

    def refresh(self) -> bool:
        """Serve the newest loadable version; True if the served version changed.

        A broken newest version is skipped in favour of the next one down, so a worker that starts
        while a bad version sits on disk still serves the newest good one. A served version that
        is deleted is replaced by the newest one left (rollback by removal, as TF Serving's
        `latest` policy does); with none left the backend is not ready.
        """
        current = self._current
        published = published_versions(self.model_dir)
        removed = current is not None and current.version not in published
        if removed:  # keep answering with it (it is in memory) until its successor has loaded
            log.warning("%s version %s was removed; loading another", self.model_name, current.version)
        candidates = [v for v in published if current is None or removed or v > current.version]
        if not candidates:
            if removed:
                self._current = None
            if self._current is None:
                self._last_error = "no published version in the model directory yet"
            return removed
        for version in candidates:
            loaded = self._try_load(version)
            if loaded is None:
                continue
            # One reference assignment: requests that already read the old model keep using it.
            self._current = loaded
            self._last_error = ""
            log.info("serving %s version %s", self.model_name, version)
            return True
        if removed:  # every version left is broken: not ready, rather than serve a deleted one
            self._current = None
            return True
        return False

    def _try_load(self, version: int) -> LoadedModel | None:
        """`version` loaded, or None when it fails to load (now, or before with the same saved_model.pb)."""
        marker = self._saved_model_mtime(version)
        if self._broken.get(version) == marker:
            return None
        try:
            return load_version(self.model_dir, version, self.signature_name)
        except Exception as error:  # a broken version must not take the served one down
            self._broken[version] = marker
            # What clients and /readyz see names no path and no exception text (it would show the
            # server's file layout); the full error is in the log line below.
            self._broken_errors[version] = f"{type(error).__name__}: the SavedModel could not be loaded"
            self._last_error = f"version {version} failed to load (details in the gateway log)"
            log.exception("loading %s version %s failed; it will not be served", self.model_name, version)
            return None

    def _saved_model_mtime(self, version: int) -> float:
        try:
            return (self.model_dir / str(version) / SAVED_MODEL_FILE).stat().st_mtime
        except OSError:
            return -1.0

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # keep polling whatever happens on the file system
                log.exception("polling %s failed", self.model_dir)

    def _loaded(self) -> LoadedModel:
        model = self._current  # read once: a swap during this call does not affect it
        if model is None:
            raise BackendUnavailable(
                f"model {self.model_name!r} is not loaded: {self._last_error or 'still loading'}",
                retry_after_s=max(1, round(self.poll_interval_s)),
            )
        return model

    def _timeout(self, timeout_s: float | None) -> float:
        return self.deadline_s if timeout_s is None else min(self.deadline_s, timeout_s)

    def _run(self, call: Callable[[], T], timeout_s: float) -> T:
        """`call()` on the explain pool, given up at the deadline."""
        future = self._pool.submit(call)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()
            raise BackendTimeout(
                f"the model did not answer within {timeout_s:g}s (the server is overloaded); "
                "retry later or send fewer images per request"
            ) from None

    def predict(self, images: np.ndarray, *, timeout_s: float | None = None) -> Prediction:
        self._loaded()  # no model: 503 now, not after a trip through the queue
        batch = np.asarray(images, dtype=np.float32)
        probabilities, model = self._batcher.submit(batch, self._timeout(timeout_s))
        return Prediction(
            probabilities=probabilities,
            class_names=model.class_names,
            model_name=self.model_name,
            model_version=model.version,
        )

    def explain(
        self, images: np.ndarray, class_index: int | None = None, *, timeout_s: float | None = None
    ) -> Explanation:
        """Grad-CAM heatmaps from the served version's `explain` signature (class_index None = top)."""
        model = self._loaded()
        return self._run(
            lambda: explain_saved_model(
                model.saved_model,
                images,
                class_index,
                model_name=self.model_name,
                model_version=model.version,
            ),
            self._timeout(timeout_s),
        )

    def status(self) -> ModelStatus:
        model = self._current
        if model is None:
            return ModelStatus(False, self.model_name, None, None, self._last_error or "loading")
        failed = {v: e for v, e in sorted(self._broken_errors.items()) if v > model.version}
        detail = served_detail(f"version {model.version}", failed)
        return ModelStatus(True, self.model_name, model.version, model.class_names, detail, failed)

    def close(self) -> None:
        self._stop.set()
        self._batcher.close()  # answers what is queued: a worker stopping on SIGTERM loses no request
        self._pool.shutdown(wait=False, cancel_futures=True)


def _call_signature(model: LoadedModel, rows: np.ndarray) -> np.ndarray:
    """One batch through the version's compiled serving signature (float32 [N,32,32,3])."""
    return model.signature(**{IMAGES_KEY: rows})[PROBABILITIES_KEY].numpy()
