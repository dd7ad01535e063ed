"""The served signature on LiteRT: the SavedModel's pixel signature converted, at load, to a LiteRT
model run by XNNPACK's CPU kernels, and used for predictions only once it agrees with the signature.

Why: TensorFlow's runtime costs about 1.5 ms of CPU per call beside the arithmetic (op dispatch,
thread hand-offs), which at the batches of 1-4 a gateway forms is a third of the work; XNNPACK runs the
same convolutions with almost no per-call cost (docs/benchmarks.md, the serving section's bare-model
table: CPU per image flat across batch sizes; on an AVX2 CPU under TensorFlow's at every batch size,
on an AVX-512 one under it up to a batch of about 4).

The SavedModel stays the contract: the conversion is made from the published version itself (no
second artifact to keep in step), and before a version is served this way its outputs on probe images
are compared with the TensorFlow signature's (PARITY_ATOL, the parity tolerance training and serving
keep), also when the conversion is read from the machine's cache (litert_cache.py). With "auto" (the
default), batches of LARGE_BATCH_ROWS or more go to TensorFlow where a race at load found it cheaper
(race: AVX-512 CPUs, on which oneDNN beats XNNPACK once TensorFlow's per-call cost is spread over
dozens of rows), the outcome kept beside the cached conversion for this CPU. A version LiteRT
cannot convert (an op it lacks) or that disagrees runs on TensorFlow, with a log line saying why;
explanations (gradients) always run on TensorFlow.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.signatures import ABSTAIN_KEY, CLASSES_KEY, IMAGES_KEY, OOD_SCORE_KEY, PROBABILITIES_KEY
from serving.backends.litert_cache import ConversionCache

log = logging.getLogger(__name__)

AUTO = "auto"  # LiteRT, and TensorFlow for large batches where it measured cheaper at load
LITERT = "litert"
TENSORFLOW = "tensorflow"
RUNTIMES = (AUTO, LITERT, TENSORFLOW)
# Outputs a prediction carries ('classes' is read once at load, from the TensorFlow signature).
PREDICTION_KEYS = (PROBABILITIES_KEY, OOD_SCORE_KEY, ABSTAIN_KEY)
PARITY_ATOL = 1e-5  # max |difference| of any float output (probabilities are 0..1), relative for large ones
# Probe batches: sizes 1 and 5 (the interpreter resizes between them, as it does between batches),
# random pixels over the whole 0..255 range plus a black and a white image.
_PROBE_SEED = 20261206


# Large batches ("auto"): TensorFlow's per-call cost (about 1.5 ms) stops mattering at a few dozen
# rows, and where its oneDNN kernels beat XNNPACK's, large batches run faster on it. Which one wins
# depends on the CPU, so each worker times both at load. Measured with the default model, bare, 2
# threads, batch 64: 84.6 ms on TensorFlow vs 99.8 on LiteRT on an AVX-512 AMD EPYC (Zen 4), but
# 123.8 vs 104.6 on the AVX2 one of docs/benchmarks.md; at batch 4 LiteRT won on both (6.3 vs 8.4 ms).
LARGE_BATCH_ROWS = 16  # batches of at least this many rows may run on TensorFlow
RACE_ROWS = 32  # the batch both runtimes are timed on (~40-120 ms a call with the default model)
RACE_ROUNDS = 3  # timed calls of each, alternating, after one untimed call of each
RACE_MARGIN = 0.95  # TensorFlow takes large batches only when at least 5% cheaper than LiteRT
RACE_CLOCK = "process CPU"  # what the race measures (race); a note timed otherwise is raced again


MAX_DEFAULT_THREADS = 4  # a batch of a few 32x32 images gains nothing from more


def default_threads(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """XNNPACK threads per model: the CPUs this process may use, at most MAX_DEFAULT_THREADS. That is
    the smaller of its CPU affinity (a cpuset) and its cgroup's CPU quota rounded up (a Kubernetes
    CPU limit: a pod limited to 1 CPU on a 16-core node gets 1 thread, not 16 that would queue)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 file (cgroup v1, macOS): affinity alone
        pass
    return max(1, min(MAX_DEFAULT_THREADS, cpus))


class LiteSignature:
    """A converted signature: `__call__(rows, parallel)` takes float32 [N, 32, 32, 3] and returns the
    PREDICTION_KEYS outputs it has, as arrays the caller owns. One call at a time (an interpreter is
    not thread-safe).

    Two interpreters of the same model when num_threads > 1: one with num_threads XNNPACK threads
    for a request that has the CPU to itself (a lone request's latency halves on 2 cores), one with
    a single thread for calls made while other requests wait (parallel=False): then every core is
    already busy with another worker's or request's work, and threads that wait for each other only
    add CPU (measured at 16 clients on 2 cores, 2 workers: docs/benchmarks.md)."""

    def __init__(self, flatbuffer: bytes, num_threads: int) -> None:
        self.num_threads = num_threads
        self._parallel = _runner(flatbuffer, num_threads)
        self._single = self._parallel if num_threads == 1 else _runner(flatbuffer, 1)
        self.output_keys = tuple(k for k in PREDICTION_KEYS if k in self._single.get_output_details())
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray, parallel: bool = True) -> dict[str, np.ndarray]:
        runner = self._parallel if parallel else self._single
        with self._lock:  # the runner resizes its input to each batch's rows (measured: cheap)
            outputs = runner(**{IMAGES_KEY: np.ascontiguousarray(rows, dtype=np.float32)})
        return {key: outputs[key] for key in self.output_keys}


def _runner(flatbuffer: bytes, num_threads: int) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=num_threads)
    (name,) = interpreter.get_signature_list()  # convert() makes exactly one
    return interpreter.get_signature_runner(name)


@dataclass(frozen=True)
class Conversion:
    """What load_lite made of one version: the LiteSignature, or None and why not."""

    lite: LiteSignature | None
    reason: str  # why it runs on TensorFlow ("" when on LiteRT)
    max_difference: float = 0.0  # largest |difference| seen on the probes
    seconds: float = 0.0  # conversion (or cache read) and check, for the log
    cached: bool = False  # the flatbuffer came from the conversion cache
    waited: float = 0.0  # seconds spent waiting for another worker converting the same version
    race: Race | None = None  # both runtimes timed on a large batch (load_lite's race_large_batches)


def convert(saved_model: Any, signature: Any) -> bytes:
    """The LiteRT flatbuffer of a loaded SavedModel's signature (a ConcreteFunction reading its
    variables), builtin ops only (TensorFlow ops inside LiteRT would need the Flex delegate, which
    ai-edge-litert does not ship). Its one signature is named serving_default."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([signature], saved_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
    _release_freed_heap()
    return flatbuffer


def _release_freed_heap() -> None:
    """Give the converter's freed heap back to the system: glibc keeps it otherwise, and a worker
    would hold ~220 MiB more per converted version (measured on the default model: 216 MiB after a
    conversion, 41 after malloc_trim). A no-op where glibc is absent (musl, macOS)."""
    gc.collect()  # the converter leaves reference cycles holding its buffers
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def probes() -> list[np.ndarray]:
    rng = np.random.default_rng(_PROBE_SEED)
    mixed = rng.integers(0, 256, size=(5, 32, 32, 3)).astype(np.float32)
    mixed[3], mixed[4] = 0.0, 255.0
    return [mixed[:1], mixed]


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> tuple[float, str]:
    """(largest float difference, "" or what disagrees) between two runs' PREDICTION_KEYS outputs."""
    worst = 0.0
    for key in PREDICTION_KEYS:
        if key not in reference:
            continue
        if key not in candidate:
            return worst, f"output {key!r} is missing"
        want, got = np.asarray(reference[key]), np.asarray(candidate[key])
        if want.shape != got.shape:
            return worst, f"output {key!r} has shape {got.shape}, the signature's {want.shape}"
        if want.dtype == np.bool_:
            if not np.array_equal(want, got):
                return worst, f"output {key!r} differs"
            continue
        difference = np.abs(want.astype(np.float64) - got.astype(np.float64))
        worst = max(worst, float(difference.max(initial=0.0)))
        if not np.all(difference <= PARITY_ATOL * np.maximum(1.0, np.abs(want))):
            return worst, f"output {key!r} differs by up to {worst:.3g} (tolerance {PARITY_ATOL:g})"
    return worst, ""


def load_lite(
    saved_model: Any,
    signature: Any,
    num_threads: int | None = None,
    *,
    cache: ConversionCache | None = None,
    key: str = "",
    race_large_batches: bool = False,
) -> Conversion:
    """Convert `signature` (of `saved_model`), or read its conversion from `cache` under `key`
    (litert_cache.py), and check the result against the signature itself on the probes; never
    raises (a version that cannot run on LiteRT runs on TensorFlow). With `race_large_batches`,
    also time both runtimes on a large batch (race), or read the time this machine's CPU gave."""
    started = time.monotonic()
    threads = num_threads or default_threads()
    store = cache if cache is not None and cache.usable and key else None
    # Under the entry's lock: the machine's other workers wait, so the race runs on idle cores.
    with store.locked(key) if store else contextlib.nullcontext():
        locked = time.monotonic()  # after waiting for the lock: another worker may have been converting
        conversion = _converted(saved_model, signature, threads, store, key)
        checked = time.monotonic()
        if race_large_batches and conversion.lite is not None:
            conversion = dataclasses.replace(conversion, race=_raced(conversion.lite, signature, store, key))
    return dataclasses.replace(conversion, seconds=checked - locked, waited=locked - started)


def _converted(
    saved_model: Any, signature: Any, threads: int, store: ConversionCache | None, key: str
) -> Conversion:
    if store and (flatbuffer := store.read(key)) is not None:
        conversion = _checked(flatbuffer, signature, threads, cached=True)
        if conversion.lite is not None:
            return conversion
        log.warning("the cached LiteRT conversion %s… fails its check (%s); converting again",
                    key[:12], conversion.reason)  # fmt: skip
        store.discard(key)  # a damaged entry: converted again below
    try:
        flatbuffer = convert(saved_model, signature)
    except Exception as error:  # an op LiteRT lacks, a converter bug: TensorFlow serves it
        return Conversion(None, f"LiteRT conversion failed ({_first_line(error)})")
    conversion = _checked(flatbuffer, signature, threads)
    if store and conversion.lite is not None:
        store.write(key, flatbuffer)
    return conversion


def _raced(lite: LiteSignature, signature: Any, store: ConversionCache | None, key: str) -> Race:
    """The race of this version on this CPU with these threads: from the cache's note when one was
    run here before (by another worker, or before a restart), else run now and noted."""
    if store is None:  # nowhere to keep it: every worker races
        return race(lite, signature)
    machine = cpu_fingerprint(lite.num_threads)
    if note := store.read_note(key):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            kept = json.loads(note)
            if kept["machine"] == machine:
                return Race(float(kept["litert_ms"]), float(kept["tensorflow_ms"]), cached=True)
    timed = race(lite, signature)
    store.write_note(key, json.dumps({"machine": machine, "litert_ms": timed.litert_ms,
                                      "tensorflow_ms": timed.tensorflow_ms}))  # fmt: skip
    return timed


def cpu_fingerprint(threads: int, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What a race's outcome depends on besides the model: the CPU's model and instruction sets
    (AVX-512 or not), the cores, LiteRT's threads and both runtimes' versions."""
    import tensorflow as tf

    described = ""
    with contextlib.suppress(OSError):
        lines = cpuinfo.read_text(errors="replace").splitlines()
        wanted = ("model name", "flags", "cpu family", "model\t")
        described = "\n".join(sorted({line for line in lines if line.startswith(wanted)}))
    text = (f"{described}\n{os.cpu_count()} cpus\n{threads} threads\ntf {tf.__version__}\n{_litert_version()}"
            f"\nrace {RACE_CLOCK}")  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _litert_version() -> str:
    try:
        from importlib.metadata import version

        return f"ai-edge-litert {version('ai-edge-litert')}"
    except Exception:  # not installed as a distribution: the fingerprint then leaves its version out
        return "ai-edge-litert unknown"


@dataclass(frozen=True)
class Race:
    """Both runtimes timed on one RACE_ROWS batch at load: the process CPU ms of the cheapest of
    RACE_ROUNDS calls each."""

    litert_ms: float
    tensorflow_ms: float
    cached: bool = False  # read from the conversion cache's note, run on this machine before

    @property
    def tensorflow_wins(self) -> bool:
        return self.tensorflow_ms < RACE_MARGIN * self.litert_ms


def race(lite: LiteSignature, signature: Any, rows: int = RACE_ROWS, rounds: int = RACE_ROUNDS) -> Race:
    """Time `lite` (all its threads, as a lone large request gets) against the TensorFlow
    `signature` on one batch of `rows` random images, in CPU time of this process (every runtime
    thread included): what a call costs the cores, which decides throughput once they are busy, and
    which another process cannot inflate. Wall time can: beside one busy core the default model's
    TensorFlow/LiteRT ratio went from 0.89 to 1.22 in wall time (TensorFlow's pool waits for the
    busy core) while CPU time stayed at 0.85-0.87 (5 races each, this module's RACE_ROWS, AVX-512).
    The calls alternate and the cheapest call of each counts (interference only adds)."""
    import tensorflow as tf

    images = np.random.default_rng(_PROBE_SEED).integers(0, 256, (rows, 32, 32, 3)).astype(np.float32)
    tensor = tf.constant(images)
    calls = {
        LITERT: lambda: lite(images, True),
        # As the gateway calls it (embedded._call_signature): the prediction outputs, as arrays.
        TENSORFLOW: lambda: {k: v.numpy() for k, v in signature(**{IMAGES_KEY: tensor}).items()
                             if k in PREDICTION_KEYS},  # fmt: skip
    }
    best = {name: math.inf for name in calls}
    for round_ in range(rounds + 1):  # round 0 is untimed: first calls at a new size set buffers up
        for name, call in calls.items():
            started = time.process_time()
            call()
            if round_:
                best[name] = min(best[name], 1000 * (time.process_time() - started))
    return Race(litert_ms=best[LITERT], tensorflow_ms=best[TENSORFLOW])


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _checked(flatbuffer: bytes, signature: Any, threads: int, cached: bool = False) -> Conversion:
    """The flatbuffer on LiteRT if it agrees with `signature` on every probe, on both interpreters."""
    import tensorflow as tf

    try:
        lite = LiteSignature(flatbuffer, threads)
    except Exception as error:  # a damaged cache entry, an op this LiteRT build lacks
        return Conversion(None, f"LiteRT could not load the conversion ({_first_line(error)})")
    worst = 0.0
    for rows in probes():
        outputs = signature(**{IMAGES_KEY: tf.constant(rows)})
        reference = {k: outputs[k].numpy() for k in PREDICTION_KEYS if k in outputs}
        if CLASSES_KEY not in outputs:
            return Conversion(None, f"the signature has no {CLASSES_KEY!r} output")
        for parallel in (True, False):  # both interpreters
            difference, problem = compare(reference, lite(rows, parallel))
            worst = max(worst, difference)
            if problem:
                return Conversion(None, f"LiteRT disagrees with the SavedModel: {problem}", worst)
    _release_freed_heap()  # again: the probes' TensorFlow calls freed some more
    return Conversion(lite, "", worst, cached=cached)
