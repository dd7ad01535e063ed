"""The model in process: the highest published SavedModel version, called through its compiled
`serving_default` signature, swapped for a newer version when one is published.

With `MODEL_BASE/<name>/labels.json` (serving/canary.py) the labelled `stable` version is served
instead, and a `canary` version next to it takes a share of requests (split) or runs on copies of
them (shadow). Each served version has its own batching queue (a batch never mixes versions); a
version that stops being served keeps its queue until the requests in it are answered.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from contract.signatures import (
    CLASSES_KEY,
    IMAGES_KEY,
    PROBABILITIES_KEY,
    SAVED_MODEL_FILE,
    SERVING_DEFAULT,
)
from contract.versions import published_versions
from serving.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Explanation,
    ModelStatus,
    Prediction,
    ood_fields,
    served_detail,
)
from serving.backends.explain import explain_saved_model
from serving.backends.litert import (
    AUTO,
    LARGE_BATCH_ROWS,
    LITERT,
    PREDICTION_KEYS,
    RACE_ROWS,
    TENSORFLOW,
    LiteSignature,
    load_lite,
)
from serving.backends.litert_cache import ConversionCache, cache_key
from serving.batching import Batcher, BatchingParameters
from serving.canary import (
    CANARY,
    SHADOW,
    SPLIT,
    STABLE,
    Comparisons,
    Labels,
    LabelsFile,
    Router,
    active_canary,
    observe,
    record_agreement,
    rollout,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class LoadedModel:
    version: int
    signature: Any  # a ConcreteFunction: images float32 [N,32,32,3] -> {probabilities, classes}
    class_names: tuple[str, ...]
    saved_model: Any  # keeps the variables the signature reads alive
    # The same signature on LiteRT (serving/backends/litert.py), which predictions use when set;
    # None: they run on `signature` (GATEWAY_RUNTIME=tensorflow, or the version did not convert).
    lite: LiteSignature | None = None
    # Batches of at least this many rows run on `signature` even with `lite` set: TensorFlow was
    # the cheaper of the two (CPU) on a large batch at load (GATEWAY_RUNTIME=auto, litert.race). None: never.
    tensorflow_from_rows: int | None = None

    @property
    def runtime(self) -> str:
        return TENSORFLOW if self.lite is None else LITERT

    def runs_on(self, rows: int) -> str:
        """The runtime a batch of `rows` rows runs on."""
        if self.lite is None or (self.tensorflow_from_rows is not None and rows >= self.tensorflow_from_rows):
            return TENSORFLOW
        return LITERT

    @property
    def described(self) -> str:
        """Which runtime answers, for logs and readiness details."""
        if self.lite is not None and self.tensorflow_from_rows is not None:
            return f"LiteRT (TensorFlow for batches of {self.tensorflow_from_rows}+ images)"
        return _RUNTIME_NAMES[self.runtime]


@dataclass(eq=False)
class _Lane:
    """One served version's batching queue."""

    version: int
    batcher: Batcher[LoadedModel]
    retired_at: float | None = None  # when the version stopped being served
    closed: bool = False  # set before the batcher closes: a request that finds it closed re-routes


def load_version(
    model_dir: Path,
    version: int,
    signature_name: str = SERVING_DEFAULT,
    *,
    runtime: str = AUTO,
    model_threads: int | None = None,
    litert_cache: ConversionCache | None = None,
) -> LoadedModel:
    """Load one version and run it once, so the first request does not pay for tracing; with
    runtime "litert" or "auto", also its LiteRT conversion when that converts and agrees (litert.py),
    read from `litert_cache` when a worker on this machine converted it before (litert_cache.py);
    with "auto", large batches go to whichever runtime ran one on less CPU here (litert.race)."""
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
    lite, tensorflow_from_rows = None, None
    if runtime != TENSORFLOW:
        key = cache_key(path, signature_name) if litert_cache is not None and litert_cache.usable else ""
        conversion = load_lite(
            saved_model,
            signature,
            model_threads,
            cache=litert_cache,
            key=key,
            race_large_batches=runtime == AUTO,  # both runtimes timed on a large batch
        )
        lite = conversion.lite
        if lite is None:
            log.warning("version %s runs on TensorFlow, not LiteRT: %s", version, conversion.reason)
        else:
            waited = conversion.waited
            log.info(
                "version %s runs on LiteRT (XNNPACK, %d threads; %s and checked in %.1f s%s, "
                "largest difference from the SavedModel %.2g)",
                version,
                lite.num_threads,
                "read from the conversion cache" if conversion.cached else "converted",
                conversion.seconds,
                f", after waiting {waited:.1f} s for another worker's conversion" if waited >= 0.1 else "",
                conversion.max_difference,
            )
        if lite is not None and conversion.race is not None:
            timed = conversion.race
            if timed.tensorflow_wins:
                tensorflow_from_rows = LARGE_BATCH_ROWS
            log.info(
                "version %s: batches of %d+ images run on %s (a batch of %d: TensorFlow %.1f ms of CPU, "
                "LiteRT %.1f ms%s)",
                version,
                LARGE_BATCH_ROWS,
                "TensorFlow" if timed.tensorflow_wins else "LiteRT",
                RACE_ROWS,
                timed.tensorflow_ms,
                timed.litert_ms,
                "; timed on this machine before" if timed.cached else "",
            )
    return LoadedModel(
        version=version,
        signature=signature,
        class_names=class_names,
        saved_model=saved_model,
        lite=lite,
        tensorflow_from_rows=tensorflow_from_rows,
    )


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
        runtime: str = AUTO,
        model_threads: int | None = None,
        litert_cache_dir: Path | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_dir = Path(model_base_path) / model_name
        self.poll_interval_s = poll_interval_s
        self.signature_name = signature_name
        self.deadline_s = deadline_s
        # "auto" (LiteRT where a version converts, TensorFlow for large batches where it measured
        # cheaper), "litert" (LiteRT where a version converts) or "tensorflow".
        self.runtime = runtime
        self.model_threads = model_threads  # LiteRT's threads per model; None: litert.default_threads()
        # Conversions shared by this machine's workers and kept across restarts (None: not cached).
        cached = litert_cache_dir is not None and runtime != TENSORFLOW
        self._litert_cache = ConversionCache(litert_cache_dir) if cached else None
        # Predictions from concurrent requests run together (serving/batching.py); explanations (a
        # backward pass each, rarer) run on their own small pool. Both give up at the deadline
        # (504) instead of waiting behind an overloaded CPU, and drop work still queued then.
        self._batching = batching
        self._lanes: dict[int, _Lane] = {}  # served version -> its queue, made on first use
        self._retired: list[_Lane] = []  # queues of versions no longer served, closed after a grace
        self._lanes_lock = threading.Lock()
        self._labels_file = LabelsFile(self.model_dir)
        self._labels: Labels | None = None  # the labels in force (None: newest version, no canary)
        self._canary: LoadedModel | None = None
        # The stable version before the last relabel, kept loaded (no traffic, no queue) so a rollback
        # swaps at once instead of loading from disk while requests wait: one extra model in memory.
        self._previous: LoadedModel | None = None
        self._label_problem = ""  # why the labels on disk are not fully served, for status()
        self._router = Router(rng)  # rng: seedable, for tests of the split
        self._comparisons = Comparisons()  # shadow runs and canary-vs-stable checks, bounded
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
        """Re-read labels.json and bring the served versions in line; True if they changed."""
        labels = self._labels_file.read()
        if labels is None:
            self._previous = None
            changed = self._refresh_latest()
            changed = self._set_canary(None) or changed
            self._label_problem = self._labels_file.error
        else:
            changed = self._refresh_labelled(labels)
        self._labels = labels
        self._retire_unused()
        return changed

    def _refresh_labelled(self, labels: Labels) -> bool:
        """Serve labels.stable (and labels.canary). A labelled version that is missing or fails to
        load is not served: the version served before keeps answering (availability first), and
        status() says why the labels are not in force."""
        problems = [self._labels_file.error] if self._labels_file.error else []
        published = set(published_versions(self.model_dir))
        changed = False
        current = self._current
        if current is None or current.version != labels.stable:
            loaded = self._labelled(labels.stable, STABLE, published, problems)
            if loaded is not None:
                self._current = loaded  # one reference assignment, as in _refresh_latest
                self._previous = current
                self._last_error = ""
                changed = True
                log.info("serving %s version %s as stable", self.model_name, loaded.version)
            elif current is None:
                self._last_error = problems[-1]
        wanted = active_canary(labels)
        if wanted is None:
            changed = self._set_canary(None) or changed
        elif self._canary is None or self._canary.version != wanted:
            changed = self._set_canary(self._labelled(wanted, CANARY, published, problems)) or changed
        self._label_problem = "; ".join(problems)
        return changed

    def _labelled(
        self, version: int, role: str, published: set[int], problems: list[str]
    ) -> LoadedModel | None:
        """A labelled version, reused when already loaded (promote, rollback), else loaded."""
        for model in (self._current, self._canary, self._previous):
            if model is not None and model.version == version:
                return model
        if version not in published:
            # No path here: status() shows it on /readyz (the log line below has the directory).
            problem = f"labels.json names {role} version {version}, which is not published"
        else:
            loaded = self._try_load(version)
            if loaded is not None:
                return loaded
            problem = f"{role} version {version} failed to load (details in the gateway log)"
        if problem != self._label_problem and problem not in self._label_problem:
            log.error("%s (model directory %s); it is not served", problem, self.model_dir)
        problems.append(problem)
        return None

    def _set_canary(self, model: LoadedModel | None) -> bool:
        previous = self._canary
        self._canary = model
        if (previous and previous.version) != (model and model.version):
            log.info("%s canary: %s", self.model_name, f"version {model.version}" if model else "none")
            return True
        return False

    def _retire_unused(self) -> None:
        """Queues of versions no longer served stop taking requests; each is closed (answering what
        it holds) once every request that could still be routed to it has passed its deadline."""
        live = {model.version for model in (self._current, self._canary) if model is not None}
        now = time.monotonic()
        with self._lanes_lock:
            for version in [v for v in self._lanes if v not in live]:
                lane = self._lanes.pop(version)
                lane.retired_at = now
                self._retired.append(lane)
            grace = self.deadline_s + self.poll_interval_s
            due = [lane for lane in self._retired if now - (lane.retired_at or now) > grace]
            self._retired = [lane for lane in self._retired if lane not in due]
        for lane in due:
            lane.closed = True
            lane.batcher.close()

    def _refresh_latest(self) -> bool:
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
            return load_version(
                self.model_dir,
                version,
                self.signature_name,
                runtime=self.runtime,
                model_threads=self.model_threads,
                litert_cache=self._litert_cache,
            )
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
        stable = self._loaded()  # no model: 503 now, not after a trip through the queue
        canary, labels = self._canary, self._labels  # read once: a relabel during this call is harmless
        batch = np.asarray(images, dtype=np.float32)
        timeout = self._timeout(timeout_s)
        chosen = canary is not None and labels is not None and self._router.canary_chosen(labels)
        if chosen and labels is not None and labels.mode == SPLIT:
            assert canary is not None
            prediction = self._predict_on(canary, CANARY, batch, timeout)
            # Agreement with stable for the canary's answer: stable runs on a copy, afterwards.
            self._compare_later(stable, batch, prediction, reference_is_background=True)
            return prediction
        prediction = self._predict_on(stable, STABLE, batch, timeout)
        if chosen:  # shadow: the canary runs on a copy after this answer; the user gets stable's
            assert canary is not None
            self._compare_later(canary, batch, prediction, reference_is_background=False)
        return prediction

    def _compare_later(
        self, model: LoadedModel, batch: np.ndarray, answered: Prediction, *, reference_is_background: bool
    ) -> None:
        """Run `model` on a copy of `batch` in the background (dropped under load) and record the
        top-1 agreement of the non-stable answer with stable's."""
        rows = batch.copy()

        def work() -> None:
            if reference_is_background:  # a canary answered; `model` is stable, not counted as traffic
                outputs, _ = self._submit(model, rows, self.deadline_s)
                stable_probabilities = outputs[PROBABILITIES_KEY]
                record_agreement(answered.model_version, CANARY, stable_probabilities, answered.probabilities)
            else:  # stable answered; `model` is the shadow canary
                shadow = self._predict_on(model, SHADOW, rows, self.deadline_s)
                record_agreement(shadow.model_version, SHADOW, answered.probabilities, shadow.probabilities)

        self._comparisons.submit(work)

    def _lane(self, model: LoadedModel) -> _Lane:
        version = model.version
        with self._lanes_lock:
            lane = self._lanes.get(version)
            if lane is None:
                batcher: Batcher[LoadedModel] = Batcher(
                    lambda: self._model_for(version, model),
                    # A lone request gets every LiteRT thread; a batch run while others wait, one.
                    lambda loaded, rows: _call_signature(loaded, rows, parallel=not batcher.busy),
                    self._batching,
                    name=f"{self.model_name}-v{version}-batch",
                )
                lane = self._lanes[version] = _Lane(version, batcher)
            return lane

    def _model_for(self, version: int, fallback: LoadedModel) -> LoadedModel:
        """The model a batch of `version`'s queue runs on, read per batch (the served object, which
        a reload may replace; the queue's own model once the version is no longer served)."""
        for model in (self._current, self._canary):
            if model is not None and model.version == version:
                return model
        return fallback

    def _submit(self, model: LoadedModel, batch: np.ndarray, timeout_s: float) -> tuple[Any, LoadedModel]:
        """`batch` through `model`'s queue. A queue closed under the request (its version was retired
        after a relabel, long ago) sends it to the served stable version instead: no request is lost."""
        for _ in range(3):
            if self._stop.is_set():
                raise BackendUnavailable("the gateway is shutting down; retry on another replica")
            lane = self._lane(model)
            try:
                return lane.batcher.submit(batch, timeout_s)
            except BackendUnavailable:
                if not lane.closed:
                    raise
            model = self._loaded()
        raise BackendUnavailable("the served model version changed repeatedly during this request; retry")

    def _predict_on(self, model: LoadedModel, role: str, batch: np.ndarray, timeout_s: float) -> Prediction:
        started = time.monotonic()
        ok = False
        try:
            outputs, model = self._submit(model, batch, timeout_s)
            ok = True
        finally:
            observe(model.version, role, time.monotonic() - started, ok)
        return Prediction(
            probabilities=outputs[PROBABILITIES_KEY],
            class_names=model.class_names,
            model_name=self.model_name,
            model_version=model.version,
            **ood_fields(outputs, len(batch)),  # ood_score and abstain, when the version has them
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
        model, canary, labels = self._current, self._canary, self._labels
        if model is None:
            return ModelStatus(False, self.model_name, None, None, self._last_error or "loading")
        failed = {v: e for v, e in sorted(self._broken_errors.items()) if v > model.version}
        served = f"version {model.version} on {model.described}"  # which runtime answers
        if labels is not None:
            served += " (stable)"
            if canary is not None:
                served += (
                    f"; canary version {canary.version} on {canary.described} at "
                    f"{labels.canary_percent:g}% ({labels.mode})"
                )
        if self._label_problem:
            served += f"; {self._label_problem}"
        detail = served_detail(served, failed)
        routed = rollout(labels, model.version, None if canary is None else canary.version)
        return ModelStatus(True, self.model_name, model.version, model.class_names, detail, failed, routed)

    def close(self) -> None:
        self._stop.set()
        self._comparisons.close()
        with self._lanes_lock:
            lanes = [*self._lanes.values(), *self._retired]
            self._lanes, self._retired = {}, []
        for lane in lanes:  # each answers what is queued: a worker stopping on SIGTERM loses no request
            lane.closed = True
            lane.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


_RUNTIME_NAMES = {LITERT: "LiteRT", TENSORFLOW: "TensorFlow"}


def _call_signature(model: LoadedModel, rows: np.ndarray, parallel: bool = True) -> dict[str, np.ndarray]:
    """One batch through the version's serving signature (float32 [N,32,32,3]), on LiteRT when the
    version has its conversion: the PREDICTION_KEYS outputs the version has (versions exported
    before issue 17 lack the out-of-distribution ones; `classes` stays on the graph, the names are
    read once at load). The batcher slices each per request. parallel: LiteRT may use all its threads
    (False when other requests wait: litert.LiteSignature)."""
    if model.runs_on(len(rows)) == LITERT:
        return model.lite(rows, parallel)
    outputs = model.signature(**{IMAGES_KEY: rows})
    return {key: outputs[key].numpy() for key in PREDICTION_KEYS if key in outputs}
