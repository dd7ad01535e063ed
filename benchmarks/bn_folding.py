"""Does a leaner served graph speed CPU inference? Batch-norm folding, freezing and XLA, side by side.

The model is the one the default profile trains (configs/default.yaml resolved for full CIFAR-10, as
benchmarks/serving_latency.py builds it; untrained weights: speed does not depend on what they
learned). Each variant is the `serving_default` signature the gateway's embedded backend calls:

  * unfolded: trainer/export/savedmodel.py's export with `fold_bn=False`, reloaded (the graph served
    before folding);
  * BN folded: the export as it is now, every batch norm folded into the convolution before it
    (trainer.export.savedmodel.fold_batch_norm);
  * + frozen: either signature with its variables turned into constants
    (convert_variables_to_constants_v2), so grappler's constant folding sees the weights;
  * XLA: the Keras model's inference in a `tf.function(jit_compile=True)` (the exported signature
    itself cannot be compiled: its string `classes` output has no XLA kernel).

Batches of 1 and 64 images. Variants are timed round-robin in one process, the order rotating every
round, so load from other processes slows all of them alike; the figures are the median wall-clock
and process CPU time per call. Each variant's probabilities are compared with the Keras model's
(parity within 1e-5). The export folds batch norms because this measured it faster; the verdict of
each run says whether that still holds on the machine it ran on.

  python -m benchmarks.bn_folding [--duration 10] [--quick] [--out benchmarks/results/bn_folding.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from benchmarks.machine import describe, load_average
from benchmarks.serving_latency import DEFAULT_PROFILE, default_profile_model, write_json
from contract.signatures import CHANNELS, IMAGES_KEY, INPUT_SIZE, PROBABILITIES_KEY, SERVING_DEFAULT

BATCHES = (1, 64)
PARITY_ATOL = 1e-5  # the export's own verification tolerance (trainer/export/savedmodel.py)
UNFOLDED = "unfolded"  # the baseline every variant is compared with
# A variant "helps" when its wall-clock median is at least HELPS faster than the unfolded graph's at
# one batch size and at most NOT_SLOWER slower at the other (timing noise), with parity.
HELPS = 0.05
NOT_SLOWER = 0.02


def _signature(export_dir: Path) -> tuple[Any, Any]:
    """(loaded SavedModel, its serving_default); the first keeps the variables alive."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))
    return loaded, loaded.signatures[SERVING_DEFAULT]


def _frozen(signature: Any) -> Callable[[Any], Any]:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(signature)
    # The frozen function answers a flat list: put it back into the signature's {name: tensor} form.
    return lambda images: tf.nest.pack_sequence_as(signature.structured_outputs, frozen(images))[
        PROBABILITIES_KEY
    ]


def _xla(model: keras.Model) -> Callable[[Any], Any]:
    """The Keras model's inference compiled by XLA (the exported signature itself cannot be: its
    string `classes` output has no XLA kernel)."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def call(images: tf.Tensor) -> tf.Tensor:
        return tf.cast(model(images, training=False), tf.float32)

    return call


def build_variants(model: Any, class_names: list[str], work: Path) -> tuple[dict[str, Callable], list]:
    """The callables to compare (images tensor -> probabilities tensor) and the objects keeping them alive."""
    from trainer.export.savedmodel import export_savedmodel

    unfolded_loaded, unfolded = _signature(
        export_savedmodel(model, class_names, work / "unfolded", fold_bn=False)
    )
    folded_loaded, folded = _signature(export_savedmodel(model, class_names, work / "folded"))
    variants: dict[str, Callable] = {
        UNFOLDED: lambda images: unfolded(**{IMAGES_KEY: images})[PROBABILITIES_KEY],
        "BN folded (the export)": lambda images: folded(**{IMAGES_KEY: images})[PROBABILITIES_KEY],
        "unfolded + frozen": _frozen(unfolded),
        "BN folded + frozen": _frozen(folded),
        "XLA (Keras model, jit_compile)": _xla(model),
    }
    return variants, [unfolded_loaded, folded_loaded]


def parity(model: Any, variants: dict[str, Callable]) -> dict[str, dict[str, Any]]:
    """Largest |variant - Keras model| probability on 16 random images, or the error a variant raised."""
    import tensorflow as tf

    pixels = (
        np.random.default_rng(1).integers(0, 256, (16, INPUT_SIZE, INPUT_SIZE, CHANNELS)).astype(np.float32)
    )
    expected = np.asarray(model(pixels, training=False))
    result: dict[str, dict[str, Any]] = {}
    for name, call in variants.items():
        try:
            got = call(tf.constant(pixels)).numpy()
        except Exception as exc:  # a variant TensorFlow cannot build (e.g. XLA): recorded, not fatal
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            continue
        difference = float(np.max(np.abs(got - expected)))
        result[name] = {"max_abs_difference": difference, "within_atol": difference <= PARITY_ATOL}
    return result


def time_variants(
    variants: dict[str, Callable], batch: int, duration_s: float, calls_per_turn: int
) -> dict[str, dict[str, float]]:
    """Median ms per call of each variant at `batch`, timed round-robin for `duration_s` in total."""
    import tensorflow as tf

    shape = (batch, INPUT_SIZE, INPUT_SIZE, CHANNELS)
    images = tf.constant(np.random.default_rng(0).integers(0, 256, shape).astype(np.float32))
    for call in variants.values():  # trace, compile, warm the caches
        for _ in range(3):
            call(images).numpy()
    times: dict[str, list[float]] = {name: [] for name in variants}
    # CPU seconds of this process (all of TensorFlow's threads) per call as well: less moved than the
    # wall clock by other processes on a shared machine, though still not immune (caches, memory bus).
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    stop_at = time.perf_counter() + duration_s
    while time.perf_counter() < stop_at:
        for name in order:
            for _ in range(calls_per_turn):
                start, start_cpu = time.perf_counter(), time.process_time()
                variants[name](images).numpy()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        order = order[1:] + order[:1]  # no variant always runs first or last in a round
    return {
        name: {"calls": len(t), "median_ms": 1000 * float(np.median(t)),
               "images_per_s": batch / float(np.median(t)),
               "median_cpu_ms": 1000 * float(np.median(cpu[name]))}
        for name, t in times.items()
    }  # fmt: skip


def verdict(timings: dict[int, dict[str, dict[str, float]]], checks: dict[str, dict[str, Any]]) -> dict:
    """Each variant's speed-up over the unfolded graph at every batch, and whether it helps (see HELPS)."""
    out: dict[str, Any] = {}
    for name in checks:
        if name == UNFOLDED or "error" in checks[name]:
            continue
        speedups = {str(b): timings[b][UNFOLDED]["median_ms"] / timings[b][name]["median_ms"]
                    for b in timings}  # fmt: skip
        cpu = {str(b): timings[b][UNFOLDED]["median_cpu_ms"] / max(timings[b][name]["median_cpu_ms"], 1e-9)
               for b in timings}  # fmt: skip
        out[name] = {
            "speedup": speedups,
            "cpu_speedup": cpu,  # shown beside the wall-clock verdict: a shared machine's wall clock lies
            "helps": max(speedups.values()) >= 1 + HELPS
            and min(speedups.values()) >= 1 - NOT_SLOWER
            and checks[name]["within_atol"],
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile", type=Path, default=DEFAULT_PROFILE, help="the profile whose model is timed"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of timing per batch size")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 s per batch size")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration = 2.0 if args.quick else args.duration
    model, info = default_profile_model(args.profile)
    print(
        f"model: {info['arch']} width {info['width']}, {info['params']:,} parameters ({info['weights']})",
        flush=True,
    )
    results: dict[str, Any] = {
        "command": "python -m benchmarks.bn_folding " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**describe(), "load_average_1m": load_average()},
        "model": info,
        "duration_s": duration,
        "parity_atol": PARITY_ATOL,
        "helps_threshold": HELPS,
    }
    with tempfile.TemporaryDirectory(prefix="bn-folding-") as tmp:
        variants, _keep = build_variants(model, info["class_names"], Path(tmp))
        checks = parity(model, variants)
        working = {name: call for name, call in variants.items() if "error" not in checks[name]}
        timings = {b: time_variants(working, b, duration, 1 if b == 64 else 10) for b in BATCHES}
    results["parity"] = checks
    results["timings"] = {str(b): t for b, t in timings.items()}
    results["verdict"] = verdict(timings, checks)
    results["machine"]["load_average_1m_end"] = load_average()
    print_table(results)
    if args.out:
        write_json(results, args.out)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print("\n| variant | parity (max abs diff) | "
          + " | ".join(f"batch {b} ms (CPU ms)" for b in BATCHES) + " | speed-up | helps |")  # fmt: skip
    print("|---|---:|" + "---:|" * len(BATCHES) + "---|---|")
    for name, check in results["parity"].items():
        if "error" in check:
            print(f"| {name} | failed: {check['error'][:80]} |" + " - |" * len(BATCHES) + " - | - |")
            continue
        timed = [results["timings"][str(b)][name] for b in BATCHES]
        ms = " | ".join(f"{t['median_ms']:.2f} ({t['median_cpu_ms']:.1f})" for t in timed)
        v = results["verdict"].get(name)
        speed = "-"
        if v:
            cpu = v["cpu_speedup"]
            speed = ", ".join(f"{s:.2f}x @{b} (CPU {cpu[b]:.2f}x)" for b, s in v["speedup"].items())
        print(f"| {name} | {check['max_abs_difference']:.1e} | {ms} | {speed} | "
              f"{('yes' if v['helps'] else 'no') if v else '-'} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
