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
            f"{path} has no signature {signature_name!r} (it has {sorted(saved_model.signatures)}); "
            "export it with trainer/export"
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
        model_threads: int = 4,
    ) -> None:
        self.model_name = model_name
        self.model_dir = Path(model_base_path) / model_name
        self.poll_interval_s = poll_interval_s
        self.signature_name = signature_name
        self.deadline_s = deadline_s
        # Model calls run on a small pool so a request can give up at its deadline (504) instead of
        # waiting behind an overloaded CPU; calls still queued at the deadline are cancelled unrun.
        self._pool = ThreadPoolExecutor(max_workers=model_threads, thread_name_prefix="model")
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
        """Load the newest loadable version if it is newer than the served one; True if swapped.

        A broken newest version is skipped in favour of the next one down, so a worker that starts
        while a bad version sits on disk still serves the newest good one.
        """
        current = self._current
        candidates = [v for v in published_versions(self.model_dir) if current is None or v > current.version]
        if not candidates:
            if current is None:
                self._last_error = f"no published version under {self.model_dir} yet"
            return False
        for version in candidates:
            loaded = self._try_load(version)
            if loaded is None:
                continue
            # One reference assignment: requests that already read the old model keep using it.
            self._current = loaded
            self._last_error = ""
            log.info("serving %s version %s", self.model_name, version)
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
            self._broken_errors[version] = f"{type(error).__name__}: {error}"[:500]
            self._last_error = f"version {version} under {self.model_dir} failed to load: {error}"
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

    def _run(self, call: Callable[[], T]) -> T:
        """`call()` on the model pool, given up at the deadline."""
        future = self._pool.submit(call)
        try:
            return future.result(timeout=self.deadline_s)
        except FutureTimeout:
            future.cancel()
            raise BackendTimeout(
                f"the model did not answer within {self.deadline_s:g}s (the server is overloaded); "
                "retry later or send fewer images per request"
            ) from None

    def predict(self, images: np.ndarray) -> Prediction:
        model = self._loaded()
        batch = np.asarray(images, dtype=np.float32)
        probabilities = self._run(lambda: model.signature(**{IMAGES_KEY: batch})[PROBABILITIES_KEY].numpy())
        return Prediction(
            probabilities=probabilities,
            class_names=model.class_names,
            model_name=self.model_name,
            model_version=model.version,
        )

    def explain(self, images: np.ndarray, class_index: int | None = None) -> Explanation:
        """Grad-CAM heatmaps from the served version's `explain` signature (class_index None = top)."""
        model = self._loaded()
        return self._run(
            lambda: explain_saved_model(
                model.saved_model,
                images,
                class_index,
                model_name=self.model_name,
                model_version=model.version,
            )
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
        self._pool.shutdown(wait=False, cancel_futures=True)
