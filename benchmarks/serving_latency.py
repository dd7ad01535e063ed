"""Serving latency and throughput: the naive Flask + `model.predict` app against the gateway.

Both run under gunicorn with the same settings (serving/gunicorn.conf.py, same worker count) and
the same model, and get the same closed-loop load: C clients each sending one request, waiting
for the answer, sending the next. Scenarios: single-image uploads at 1 and 16 clients for both,
then 64-image requests to the gateway, compared with the bare model's own batch throughput
(the SavedModel signature called in this process, no HTTP).

  python -m benchmarks.serving_latency [--run-dir RUN] [--duration 8] [--out results.json]

Without --run-dir an untrained model of the default architecture is built: speed does not depend
on what the weights learned. Clients and servers share this machine's CPUs, as they would on one host.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from contract.signatures import CHANNELS, IMAGES_KEY, INPUT_SIZE, PROBABILITIES_KEY, SERVING_DEFAULT
from loadtest.gateway_process import running_gateway  # the launcher the load test and drills use

BOUNDARY = "benchmark-boundary-7f3a"


def build_run_dir(directory: Path, arch: str, width: int | None = None) -> Path:
    """A run directory holding an untrained `arch` model: what export and the naive app read."""
    import keras

    from trainer.models import build_model

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]
    keras.utils.set_random_seed(0)
    model = build_model(arch, num_classes=len(classes), mean=mean, std=std, width=width)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / "model.keras")
    (directory / "dataset.json").write_text(json.dumps({"name": "benchmark", "class_names": classes}))
    (directory / "metrics.json").write_text(json.dumps({"test_accuracy": None}))
    return directory


def sample_pngs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (INPUT_SIZE, INPUT_SIZE, CHANNELS), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def multipart(field: str, images: list[bytes]) -> bytes:
    parts = []
    for i, data in enumerate(images):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def closed_loop(port: int, path: str, body: bytes, clients: int, duration_s: float) -> dict:
    """`clients` threads, each on its own keep-alive connection, for `duration_s` after a warmup."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_at = time.monotonic() + 1.0  # one second of warmup requests, not counted
    stop_at = start_at + duration_s

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                break
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                ok = False
            if sent >= start_at:
                if ok:
                    latencies[index].append(time.monotonic() - sent)
                else:
                    errors[index] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_latencies = sorted(x for per_client in latencies for x in per_client)
    if not all_latencies:
        return {"requests": 0, "errors": sum(errors), "rps": 0.0, "p50_ms": None, "p99_ms": None}
    quantiles = statistics.quantiles(all_latencies, n=100, method="inclusive")
    return {
        "requests": len(all_latencies),
        "errors": sum(errors),
        "rps": len(all_latencies) / duration_s,
        "p50_ms": 1000 * statistics.median(all_latencies),
        "p90_ms": 1000 * quantiles[89],
        "p99_ms": 1000 * quantiles[98],
    }


def bare_model_call(model_path: Path, batch: int, duration_s: float) -> tuple[float, float]:
    """(images per second, median ms per call) of the SavedModel's serving_default signature, in process."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(model_path)).signatures[SERVING_DEFAULT]
    shape = (batch, INPUT_SIZE, INPUT_SIZE, CHANNELS)
    inputs = {IMAGES_KEY: tf.constant(np.random.default_rng(0).integers(0, 256, shape).astype(np.float32))}
    for _ in range(3):
        signature(**inputs)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        call = time.perf_counter()
        signature(**inputs)[PROBABILITIES_KEY].numpy()
        times.append(time.perf_counter() - call)
    return len(times) * batch / (time.perf_counter() - start), 1000 * statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, help="a trained run directory (default: untrained model)")
    parser.add_argument("--arch", default="bn_cnn", help="architecture when no --run-dir is given")
    parser.add_argument(
        "--width", type=int, default=16, help="channel width when no --run-dir is given (16: what "
        "configs/quick.yaml, the model `make serve` trains, uses)"
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per scenario")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for both apps")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def new_results(args: argparse.Namespace) -> dict:
    """The results document before any measurement: this machine and the settings of the run."""
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {"duration_s": args.duration, "workers": args.workers, "arch": args.arch,
                     "width": args.width, "run_dir": str(args.run_dir) if args.run_dir else None},
        "scenarios": [],
    }  # fmt: skip


def measure(
    results: dict, app: str, port: int, path: str, field: str, images: list[bytes],
    clients: tuple[int, ...], duration_s: float,
) -> None:
    """Closed-loop load at each client count; one row per count in results["scenarios"]."""
    body = multipart(field, images)
    scenario = "1 image" if len(images) == 1 else f"{len(images)} images"
    for count in clients:
        measured = closed_loop(port, path, body, count, duration_s)
        results["scenarios"].append({
            "app": app, "scenario": scenario, "clients": count,
            "images_per_request": len(images), **measured,
            "images_per_s": measured["rps"] * len(images),
        })  # fmt: skip
        p50, p99 = measured["p50_ms"] or float("nan"), measured["p99_ms"] or float("nan")
        print(
            f"{app:8} {scenario:10} c={count:<3} rps={measured['rps']:8.1f} "
            f"p50={p50:8.2f} ms p99={p99:8.2f} ms errors={measured['errors']}",
            flush=True,
        )


def measure_naive_app(results: dict, run_dir: Path, args: argparse.Namespace) -> None:
    """The naive Flask app under gunicorn: single-image uploads at 1 and 16 clients."""
    env = {"NAIVE_RUN_DIR": str(run_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    # The naive app has no health route: a GET on its POST-only /predict answers 405 once up.
    with running_gateway(
        env,
        workers=args.workers,
        app="benchmarks.naive_flask:create_app()",
        probe_path="/predict",
        probe_statuses=(405,),
        startup_timeout=180,
    ) as naive:
        measure(results, "naive", naive.port, "/predict", "file", sample_pngs(1), (1, 16), args.duration)


def measure_gateway(results: dict, model_base: Path, args: argparse.Namespace) -> None:
    """The gateway (embedded backend) under gunicorn: single images at 1 and 16 clients, then 64-image
    requests at 1 and 4."""
    env = {
        "GATEWAY_MODEL_BASE_PATH": str(model_base),
        "GATEWAY_MODEL_NAME": "cifar10",
        "GATEWAY_TFSERVING_ADDRESS": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    with running_gateway(env, workers=args.workers, startup_timeout=180) as gateway:
        measure(results, "gateway", gateway.port, "/v1/predict", "images", sample_pngs(1), (1, 16),
                args.duration)
        measure(results, "gateway", gateway.port, "/v1/predict", "images", sample_pngs(64), (1, 4),
                args.duration)


def measure_bare_model(model_path: Path, duration_s: float) -> dict:
    """The SavedModel called in this process, no HTTP: the ceiling for 64-image requests."""
    bare, bare64_ms = bare_model_call(model_path, 64, duration_s)
    _, bare1_ms = bare_model_call(model_path, 1, min(duration_s, 3.0))
    print(f"bare model in process: batch of 64 {bare:.0f} images/s; one image {bare1_ms:.2f} ms", flush=True)
    return {"batch64_images_per_s": bare, "batch64_ms": bare64_ms, "single_image_ms": bare1_ms}


def scenario_rows(results: dict) -> dict[tuple[str, str, int], dict]:
    """The measured rows by (app, scenario, clients)."""
    return {(r["app"], r["scenario"], r["clients"]): r for r in results["scenarios"]}


def check_targets(results: dict) -> dict[str, bool]:
    """Each target the gateway is built to meet, and whether this run met it."""
    rows = scenario_rows(results)
    naive16, gate16 = rows[("naive", "1 image", 16)], rows[("gateway", "1 image", 16)]
    gate1 = rows[("gateway", "1 image", 1)]
    best64 = max(rows[("gateway", "64 images", c)]["images_per_s"] for c in (1, 4))
    return {
        "16 clients: gateway rps >= 10x naive": gate16["rps"] >= 10 * naive16["rps"],
        "16 clients: gateway p99 < 100 ms": (gate16["p99_ms"] or 1e9) < 100,
        "1 client: gateway p50 < 5 ms": (gate1["p50_ms"] or 1e9) < 5,
        "64-image requests >= 0.5x bare model batch throughput":
            best64 >= 0.5 * results["bare_model"]["batch64_images_per_s"],
    }  # fmt: skip


def print_summary(results: dict) -> None:
    """The results as a Markdown table, the speed-up at 16 clients, and each target met or missed."""
    bare = results["bare_model"]
    print()
    print("| app | scenario | clients | req/s | images/s | p50 ms | p90 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["scenarios"]:
        print(
            f"| {r['app']} | {r['scenario']} | {r['clients']} | {r['rps']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
        )
    print(f"| bare model | 64 images, in process | - | - | {bare['batch64_images_per_s']:.0f} | "
          f"{bare['batch64_ms']:.2f} | - | - | - |")
    print(f"| bare model | 1 image, in process | - | - | - | {bare['single_image_ms']:.2f} | - | - | - |")
    rows = scenario_rows(results)
    naive16, gate16 = rows[("naive", "1 image", 16)], rows[("gateway", "1 image", 16)]
    print(f"\nspeed-up at 16 clients: {gate16['rps'] / max(naive16['rps'], 1e-9):.1f}x requests/s")
    for name, met in results["targets"].items():
        print(f"{'MET ' if met else 'MISSED'}  {name}")


def write_json(results: dict, out: Path) -> None:
    """Atomically: a report reading `out` never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2))
    os.replace(tmp_out, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.export.publish import publish

    results = new_results(args)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        run_dir = args.run_dir or build_run_dir(work / "run", args.arch, args.width)
        model_path = publish(run_dir, work / "models", "cifar10")
        print(f"model: {run_dir / 'model.keras'} published as {model_path}", flush=True)
        measure_naive_app(results, run_dir, args)
        measure_gateway(results, work / "models", args)
        results["bare_model"] = measure_bare_model(model_path, args.duration)
    results["targets"] = check_targets(results)
    print_summary(results)
    if args.out:
        write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
