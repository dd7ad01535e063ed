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

Then data on the device vs fed from the host (trainer/device_data.py, train.data_on_device), per
profile (--profiles; default: the default profile and airbench94): the profile's model, optimizer
recipe and XLA setting as `trainer train` builds them here, trained by `fit` on synthetic images,
once from ShuffledBatches (host: float32 batches built by NumPy each step) and once from
DeviceBatches (uint8 set held by the backend, one gather per epoch, steps_per_execution as
training sets it), the same batches in the same order. Whole epochs are timed (steps_per_execution
hides single steps), host and device epochs alternating after one warm-up epoch each; medians
compared. Recorded under "data_on_device". On a CPU both paths share the same memory, so this shows
the host-side cost the device path removes, not a GPU's gain (not measured on a GPU).

    python -m benchmarks.train_throughput [--archs bn_cnn,resnet9,plain_cnn] [--steps 12]
        [--batch-size 128] [--xla-profile configs/default.yaml] [--xla-batch-size N] [--no-xla]
        [--profiles configs/default.yaml,configs/airbench94.yaml] [--data-batch-size 64]
        [--data-steps 8] [--data-rounds 2] [--no-device-data]
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
from benchmarks.xla_step import DEFAULT_PROFILE, measure_xla, profile_config
from trainer import accelerator
from trainer.accelerator import count_gpus
from trainer.config import Config, apply_overrides
from trainer.data import load_dataset, synthetic
from trainer.device_data import DeviceBatches
from trainer.models import build_model
from trainer.models.airbench import lookahead_callbacks
from trainer.pipeline import ShuffledBatches
from trainer.train import SmoothedSparseCrossentropy, make_model, make_optimizer

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


class _EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch of a fit (steps_per_execution > 1 hides the single steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def measure_device_data(profile: Path, batch_size: int, steps: int, rounds: int = 2) -> dict[str, Any]:
    """Images/s of `profile`'s training by fit, data fed from the host vs held on the device.

    Both models are built alike (same seed) by the trainer's make_model; each fit runs whole epochs
    of `steps` batches of the same stream (the same images in the same order). After one warm-up
    epoch each (tracing, compiling), `rounds` timed epochs alternate host, device, device, host, ...
    """
    if not profile.is_file():
        return {"profile": str(profile), "error": f"profile {profile} not found (not written yet?); skipped"}
    config = profile_config(profile, batch_size)
    batch = int(config.train.batch_size)
    accel = accelerator.setup(config.train.mixed_precision, config.train.jit_compile)
    dataset = load_dataset("synthetic", val_fraction=0.0, num_train=batch * steps, num_test=10, seed=0)
    args = (dataset.x_train, dataset.y_train, batch)
    streams = {"host": ShuffledBatches(*args, seed=config.train.seed),
               "device": DeviceBatches(*args, seed=config.train.seed)}  # fmt: skip
    models: dict[str, keras.Model] = {}
    for name, stream in streams.items():
        keras.utils.set_random_seed(config.train.seed)
        models[name] = make_model(config, dataset, stream.steps_per_epoch, accel.jit_compile)
    # As trainer/train.py: steps_per_execution on the device path, aligned with per-step callbacks.
    callbacks = lookahead_callbacks(config.train, steps)
    spe = streams["device"].configure(models["device"], align=[c.every_steps for c in callbacks])
    timers = {name: _EpochTimer() for name in streams}
    epoch = {name: 0 for name in streams}

    def run(name: str) -> None:
        # One fit per timed epoch, the stream starting at that epoch (as a resumed run does).
        e = epoch[name]
        data = (streams["device"].for_fit(initial_epoch=e) if name == "device"
                else ShuffledBatches(*args, seed=config.train.seed, initial_epoch=e))
        models[name].fit(data, epochs=e + 1, initial_epoch=e, steps_per_epoch=streams[name].steps_per_epoch,
                         shuffle=False, verbose=0,
                         callbacks=[*lookahead_callbacks(config.train, steps), timers[name]])
        epoch[name] += 1

    order = ["host", "device"]
    for _ in range(1 + rounds):
        for name in order:
            run(name)
        order.reverse()
    keras.mixed_precision.set_global_policy("float32")  # what the rest of this process expects
    result: dict[str, Any] = {
        "profile": str(profile),
        "arch": config.model.arch,
        "width": config.model.width,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "timed_epochs": rounds,
        "steps_per_execution": spe,
        "jit_compile": bool(models["device"].jit_compile),
        "dtype_policy": accel.dtype_policy,
    }
    for name, timer in timers.items():
        seconds = float(np.median(timer.times[1:]))  # epoch 0 traces and compiles
        result[f"{name}_images_per_s"] = round(batch * steps / seconds, 1)
        result[f"{name}_first_epoch_s"] = round(timer.times[0], 2)
    result["speedup"] = round(result["device_images_per_s"] / result["host_images_per_s"], 3)
    return result


def print_device_data(rows: list[dict[str, Any]]) -> None:
    print(f"{'profile':<26} {'arch':<9} {'batch':>5} {'spe':>4} {'host img/s':>11} {'device img/s':>13} "
          f"{'device/host':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['profile']:<26} {r['error']}")
            continue
        print(f"{r['profile']:<26} {r['arch']:<9} {r['batch_size']:>5} {r['steps_per_execution']:>4} "
              f"{r['host_images_per_s']:>11.1f} {r['device_images_per_s']:>13.1f} {r['speedup']:>10.2f}x")


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
    parser.add_argument("--profiles", default="configs/default.yaml,configs/airbench94.yaml",
                        help="profiles timed with the data on the device vs fed from the host")
    parser.add_argument("--data-batch-size", type=int, default=64,
                        help="batch for the device/host comparison (CPU-sized; lr scaled as the recipe says)")
    parser.add_argument("--data-steps", type=int, default=8, help="steps per timed epoch, device/host")
    parser.add_argument("--data-rounds", type=int, default=2, help="timed epochs per path, device/host")
    parser.add_argument("--no-device-data", action="store_true", help="skip the device/host comparison")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if args.data_steps < 1 or args.data_rounds < 1:
        parser.error("--data-steps and --data-rounds must be >= 1")

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
    device_rows = []
    if not args.no_device_data:
        for profile in [Path(p.strip()) for p in args.profiles.split(",") if p.strip()]:
            device_rows.append(
                measure_device_data(profile, args.data_batch_size, args.data_steps, args.data_rounds)
            )
        print(f"data on the device vs fed from the host ({keras.backend.backend()}, "
              f"{'GPU' if count_gpus() else 'CPU'}):")
        print_device_data(device_rows)
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
        "data_on_device": None if args.no_device_data else {
            "data": "synthetic shapes (trainer.data.synthetic, seed 0), batch * steps images",
            "method": "fit epochs alternating host/device after one warm-up epoch each; median epoch time",
            "results": device_rows,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
