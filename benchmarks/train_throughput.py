"""Training throughput per architecture: the bare model step vs the full training path.

bare: `train_on_batch` on one fixed float32 batch already in memory, augmentation layers off,
      i.e. just forward + backward + optimizer update.
full: `model.fit` as trainer/train.py runs it: ShuffledBatches (uint8 -> float32 batches,
      reshuffled per epoch) feeding the model with its augmentation layers on.
overhead = full time per image / bare time per image - 1: what the input pipeline and the
augmentation add to the model step (target <= 20%). Bare and full steps alternate within one
run and the medians are compared, so a busy shared machine slows both alike.

Then XLA on vs off (benchmarks/xla_step.py): the model configs/default.yaml trains (bn_cnn width 64,
translate 4, flip, cutout 8, its optimizer recipe and batch), its training step compiled with
jit_compile=True and with False, steps interleaved the same way; recorded under "xla", with the
`jit_compile` the compiled model really kept.

    python -m benchmarks.train_throughput [--archs bn_cnn,resnet9,plain_cnn] [--steps 12]
        [--batch-size 128] [--xla-profile configs/default.yaml] [--xla-batch-size N] [--no-xla]
        [--out benchmarks/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from benchmarks import machine
from benchmarks.xla_step import DEFAULT_PROFILE, measure_xla
from trainer.accelerator import count_gpus
from trainer.config import Config, apply_overrides
from trainer.data import synthetic
from trainer.models import build_model
from trainer.pipeline import ShuffledBatches
from trainer.train import SmoothedSparseCrossentropy, make_optimizer

# CPU-sized widths (the GPU profiles use 64): large enough that the step is real work.
DEFAULT_WIDTHS = {"bn_cnn": 32, "resnet9": 16, "plain_cnn": 32}
AUGMENT = {"translate": 4, "flip": True, "cutout": 8}


class _Interleaved(keras.callbacks.Callback):
    """Times full-path steps and bare steps alternately inside one fit, so both see the same
    machine load (a shared CPU makes back-to-back measurements incomparable).

    After each full step it runs one bare step. A full step's time is from the end of the
    previous bare step to the end of this step: fetching the batch through the pipeline (minus
    what prefetching overlapped, as in real training) plus the augmented model step.
    """

    def __init__(self, bare: keras.Model, xb: np.ndarray, yb: np.ndarray) -> None:
        super().__init__()
        self.bare, self.xb, self.yb = bare, xb, yb
        self.full: list[float] = []
        self.bare_times: list[float] = []
        self._mark = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.full.append(time.perf_counter() - self._mark)
        start = time.perf_counter()
        self.bare.train_on_batch(self.xb, self.yb)
        self._mark = time.perf_counter()
        self.bare_times.append(self._mark - start)


def _model(arch: str, width: int, augment: bool, config: Config, steps: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = build_model(
        arch, num_classes=10, mean=(120.0, 120.0, 120.0), std=(60.0, 60.0, 60.0),
        augmentation=AUGMENT if augment else {"enabled": False}, width=width, dropout=0.1,
    )
    model.compile(optimizer=make_optimizer(config, steps), loss=SmoothedSparseCrossentropy(0.1),
                  metrics=["accuracy"], jit_compile=False)
    return model


def measure(arch: str, width: int, batch_size: int, steps: int, warmup: int = 3) -> dict[str, Any]:
    config = apply_overrides(Config(), [f"train.batch_size={batch_size}", "train.epochs=1"])
    n = batch_size * (steps + warmup)
    x, y = synthetic.generate(n, seed=0)

    bare = _model(arch, width, augment=False, config=config, steps=steps)
    xb, yb = x[:batch_size].astype(np.float32), y[:batch_size]
    full = _model(arch, width, augment=True, config=config, steps=steps)
    stream = ShuffledBatches(x, y, batch_size, seed=0)
    timer = _Interleaved(bare, xb, yb)
    full.fit(stream, epochs=1, steps_per_epoch=steps + warmup, shuffle=False, verbose=0, callbacks=[timer])
    # Medians of the steady-state steps: robust to load spikes from other processes.
    bare_s = float(np.median(timer.bare_times[warmup:]))
    full_s = float(np.median(timer.full[warmup:]))

    return {
        "arch": arch,
        "width": width,
        "params": int(bare.count_params()),
        "batch_size": batch_size,
        "steps": steps,
        "bare_images_per_s": round(batch_size / bare_s, 1),
        "full_images_per_s": round(batch_size / full_s, 1),
        "bare_ms_per_step": round(bare_s * 1000, 1),
        "full_ms_per_step": round(full_s * 1000, 1),
        "overhead": round(full_s / bare_s - 1.0, 3),
    }


def print_xla(xla: dict[str, Any]) -> None:
    print(f"{xla['profile']}: {xla['arch']} width {xla['width']}, batch {xla['batch_size']}")
    for name in ("off", "on"):
        if name in xla:
            r = xla[name]
            print(f"  XLA {name:<3} (model.jit_compile={r['jit_compile']}): {r['images_per_s']:.1f} img/s, "
                  f"first step {r['first_step_s']:.1f} s")
    if xla["xla_error"]:
        print(f"  XLA refused: {xla['xla_error']}")
    elif "speedup" in xla:
        print(f"  XLA on / off: {xla['speedup']:.2f}x" + ("" if xla["xla_kept"] else " (Keras dropped XLA)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", default="bn_cnn,resnet9,plain_cnn")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--xla-profile", type=Path, default=DEFAULT_PROFILE,
                        help="profile whose model is timed with XLA on and off")
    parser.add_argument("--xla-batch-size", type=int, default=None,
                        help="batch for the XLA comparison (default: the profile's)")
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA on/off comparison")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")

    load_start = machine.load_average()
    rows = []
    print(f"{'arch':<10} {'width':>5} {'params':>9} {'bare img/s':>11} {'full img/s':>11} {'overhead':>9}")
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        row = measure(arch, DEFAULT_WIDTHS.get(arch, 32), args.batch_size, args.steps)
        rows.append(row)
        print(f"{arch:<10} {row['width']:>5} {row['params']:>9} {row['bare_images_per_s']:>11.1f} "
              f"{row['full_images_per_s']:>11.1f} {row['overhead']:>8.1%}", flush=True)
    worst = max(r["overhead"] for r in rows)
    print(f"pipeline + augmentation overhead: at most {worst:.1%} of the bare step (target <= 20%)")
    xla = None if args.no_xla else measure_xla(args.xla_profile, args.steps, args.xla_batch_size)
    if xla is not None:
        print_xla(xla)
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "command": " ".join(["python -m benchmarks.train_throughput", *given]),
        "machine": {
            **machine.describe(),
            "load_average_1m": load_start,  # at the start of the run
            "load_average_1m_end": machine.load_average(),
            "gpus": count_gpus(),
        },
        "versions": {"keras": keras.__version__, "backend": keras.backend.backend(),
                     "numpy": np.__version__},
        "results": rows,
        "max_overhead": worst,
        "target_max_overhead": 0.20,
        "xla": xla,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
