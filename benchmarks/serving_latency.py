"""Serving throughput on the model users get: the bare model's limits, the gateway, the naive app.

One run, one machine, in this order:

1. The model: what the default profile trains (configs/default.yaml with the trainer's recipe resolved
   for full CIFAR-10, 50,000 images: bn_cnn width 64), untrained unless --run-dir names a trained run
   (speed does not depend on what the weights learned), published as `make serve` publishes it.
2. The bare model: the published SavedModel's `serving_default` signature called in this process, no
   HTTP, on TensorFlow and on its LiteRT conversion (the gateway's default runtime,
   serving/backends/litert.py): batch 1 (latency) and batches 2..64 (images/s). The faster runtime's
   best batched figure is the most this CPU gives for this model; every gateway figure is reported as
   a fraction of it.
3. The gateway under gunicorn as `make serve` starts it (loadtest.gateway_process.running_gateway,
   serving/gunicorn.conf.py), loaded by `hey` (Debian's /usr/bin/hey, a Go client, so the load
   generator takes little CPU from the servers): a closed loop of C clients for D seconds, each
   sending its next request when the answer to the last arrives. 1, 4, 16 and 64 clients posting
   one image each; 64-image requests at 1, 2 and 4 clients.
4. The naive app (benchmarks/naive_flask.py: Flask calling Keras `model.predict` per upload, the
   same model file) under the same gunicorn settings at 1, 16 and 64 clients.
5. LitServe (benchmarks/litserve_app.py: its dynamic batching over the same SavedModel on the
   gateway's runtime, the same decode and resize) at 1, 16 and 64 clients: the off-the-shelf server
   to lead.
6. The gateway with its TF Serving backend pointed at the test double (tests/tfserving_double, its
   own process, the same SavedModel) at 1 and 16 clients.
7. The lean app (benchmarks/lean_flask.py: a Flask route that only decodes the upload and runs the
   same LiteRT conversion on it, single-threaded) under the same gunicorn settings at 1 and 16
   clients: the least work per upload of a Flask-under-gunicorn server of this model, which says
   what the gateway's batching, limits, metrics and trust fields cost, and whether a target is within
   reach of an app built this way.
8. The same route with no model (lean_flask's model=False: parse, decode, resize, a fixed answer) at
   16 clients: the CPU per request that HTTP and Flask take before any model runs, which with the
   bare model's and hey's says what a target leaves for the gateway's own work (`cpu_budget`). Not a
   row of the table: it serves no model.

Latencies and status codes are hey's per-request CSV (-o csv); requests started in the first
--warmup seconds of each level are not counted. The targets of issue 14 are computed from the figures.

CPU: each level also records the CPU seconds of the server's processes (all of them: gunicorn's
master and workers, LitServe's API and inference processes, the TF Serving double) and of hey, per
answered request, and for the gateway the mean batch its model calls ran (its /metrics); the bare
model records its CPU per image. CPU per request moves far less than req/s when other processes
share the machine, and it says where the time of a request goes (`cpu_budget`).

  python -m benchmarks.serving_latency [--duration 8] [--warmup 1] [--quick] [--run-dir RUN]
      [--out benchmarks/results/serving_latency.json]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from benchmarks.machine import describe, load_average
from benchmarks.worker_startup import measure_startup
from contract.signatures import CHANNELS, IMAGES_KEY, INPUT_SIZE, PROBABILITIES_KEY, SERVING_DEFAULT
from loadtest.gateway_process import PROJECT_ROOT, running_gateway
from serving.backends.litert import LARGE_BATCH_ROWS

DEFAULT_PROFILE = Path("configs/default.yaml")
CIFAR10_TRAIN_IMAGES = 50_000  # what benchmarks.xla_step.profile_config resolves `auto` against
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]  # per channel, 0..255 pixels
MODEL_NAME = "cifar10"
BOUNDARY = "benchmark-boundary-7f3a"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
HEY = "/usr/bin/hey"

BARE_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # 2 and 4: the batches the gateway forms at 16 clients
GATEWAY_CLIENTS = (1, 4, 16, 64)  # one image per request
GATEWAY_BATCH_CLIENTS = (1, 2, 4)  # 64 images per request
NAIVE_CLIENTS = (1, 16, 64)
LITSERVE_CLIENTS = (1, 16, 64)
TFSERVING_CLIENTS = (1, 16)
LEAN_CLIENTS = (1, 16)
NO_MODEL_CLIENTS = 16
BATCH_IMAGES = 64

GATEWAY, NAIVE, TFSERVING, LITSERVE = "gateway", "naive", "gateway + TF Serving double", "LitServe"
LEAN = "lean Flask + LiteRT"
NO_MODEL = "Flask route, no model"

# Issue 14's targets, checked in check_targets().
TARGET_NAIVE_RATIO = 15.0  # 16 clients: gateway req/s over the naive app's
TARGET_P99_MS = 100.0  # 16 clients
TARGET_BARE_FRACTION = 0.70  # 16 clients: of the bare model's best batched images/s
TARGET_BATCH1_SLACK_MS = 3.0  # 1 client: p50 at most bare batch-1 latency + this
TARGET_BATCH64_FRACTION = 0.80  # 64-image requests: of the bare model's batch-64 images/s
TARGET_LITSERVE_RATIO = 1.0  # 16 clients: gateway req/s over LitServe's (the developers' guide: lead it)
# LitServe's batching as its docs write it: up to 64 rows, a 5 ms window, one inference worker: the
# best of those tried by hand at 16 clients on this 2-core machine (req/s: 1 worker with 1 ms 171,
# 5 ms 210, 10 ms 199; 2 workers with 5 ms 199).
LITSERVE_ARGS = ["--workers", "1", "--max-batch-size", "64", "--batch-timeout-s", "0.005"]


# -- the model ---------------------------------------------------------------------------------------


def default_profile_model(profile: Path = DEFAULT_PROFILE) -> tuple[Any, dict[str, Any]]:
    """(untrained Keras model, what it is) built as the trainer builds the profile's model (seed 0)."""
    import keras

    # The XLA benchmark resolves a profile as `trainer train` does (trainer.recipe); the same here.
    from benchmarks.xla_step import profile_config
    from trainer.models import build_model

    config = profile_config(profile)
    m = config.model
    keras.utils.set_random_seed(config.train.seed)
    model = build_model(
        m.arch, num_classes=len(CLASS_NAMES), mean=CIFAR10_MEAN, std=CIFAR10_STD,
        augmentation=config.augment, width=m.width, dropout=m.dropout,
        bn_momentum=config.optim.bn_momentum, init=m.init, head_bias=m.head_bias,
    )  # fmt: skip
    info = {
        "profile": str(profile), "arch": m.arch, "width": int(m.width), "params": int(model.count_params()),
        "num_train": int(config.data.num_train or CIFAR10_TRAIN_IMAGES), "class_names": CLASS_NAMES,
        "weights": "untrained (seed 0): speed does not depend on what the weights learned",
    }  # fmt: skip
    return model, info


def build_run_dir(directory: Path, profile: Path) -> tuple[Path, dict[str, Any]]:
    """A run directory holding the profile's untrained model: what publish and the naive app read."""
    model, info = default_profile_model(profile)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / "model.keras")
    (directory / "dataset.json").write_text(json.dumps({"name": "benchmark", "class_names": CLASS_NAMES}))
    (directory / "metrics.json").write_text(json.dumps({"test_accuracy": None}))
    return directory, info


def trained_run_info(run_dir: Path) -> dict[str, Any]:
    """What a trained run's model is (arch, width, parameters), from its files."""
    import keras

    import trainer.models  # noqa: F401 - registers the project's custom layers for loading

    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    def read(name: str) -> dict[str, Any]:
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    model_config = read("config.json").get("model", {})
    # recipe.json holds the width the run resolved (config.json may say "auto").
    width = read("recipe.json").get("width", model_config.get("width"))
    return {"profile": None, "arch": model_config.get("arch", "unknown"), "width": width,
            "params": int(model.count_params()), "weights": f"trained: {run_dir}"}  # fmt: skip


# -- request bodies ----------------------------------------------------------------------------------


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


# -- the bare model ----------------------------------------------------------------------------------


def measure_bare_model(model_path: Path, duration_s: float) -> dict[str, Any]:
    """The published SavedModel's serving_default called in this process at each of BARE_BATCHES, on
    both runtimes the embedded gateway has (serving/backends/litert.py): TensorFlow's signature, and
    its LiteRT conversion as the gateway makes it. The limit is the faster runtime's summary (its best
    batched images/s is the most this CPU gives for the model); both are kept under "runtimes"."""
    import tensorflow as tf

    from serving.backends import litert

    loaded = tf.saved_model.load(str(model_path))
    signature = loaded.signatures[SERVING_DEFAULT]
    conversion = litert.load_lite(loaded, signature)
    def on_tensorflow(rows: np.ndarray) -> np.ndarray:
        return signature(**{IMAGES_KEY: tf.constant(rows)})[PROBABILITIES_KEY].numpy()

    calls: dict[str, Any] = {litert.TENSORFLOW: on_tensorflow}
    if conversion.lite is not None:
        calls[litert.LITERT] = conversion.lite
    else:
        print(f"bare model: no LiteRT figures: {conversion.reason}", flush=True)
    summaries = []
    for runtime, call in calls.items():
        rows = []
        for batch in BARE_BATCHES:
            shape = (batch, INPUT_SIZE, INPUT_SIZE, CHANNELS)
            images = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
            for _ in range(3):
                call(images)
            times: list[float] = []
            cpu_start = time.process_time()  # every thread of this process: the runtime's pools included
            stop_at = time.perf_counter() + duration_s
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                call(images)
                times.append(time.perf_counter() - start)
            cpu_ms_per_image = 1000 * (time.process_time() - cpu_start) / (batch * len(times))
            median = float(np.median(times))
            rows.append({"batch": batch, "calls": len(times), "median_ms": 1000 * median,
                         "images_per_s": batch / median, "cpu_ms_per_image": cpu_ms_per_image})  # fmt: skip
            print(f"bare model ({runtime}), batch {batch:2}: {1000 * median:7.2f} ms per call, "
                  f"{batch / median:7.0f} images/s, CPU {cpu_ms_per_image:.2f} ms per image",
                  flush=True)  # fmt: skip
        summaries.append({"runtime": runtime, **bare_summary(rows)})
    best = max(summaries, key=lambda summary: summary["batched_images_per_s"])
    return {**best, "runtimes": summaries}


def bare_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_batch = {r["batch"]: r for r in rows}
    batched = max((r for r in rows if r["batch"] > 1), key=lambda r: r["images_per_s"])
    return {
        "batches": rows,
        "batch1_ms": by_batch[1]["median_ms"],
        "batch1_images_per_s": by_batch[1]["images_per_s"],
        "batched_images_per_s": batched["images_per_s"],
        "batched_best_batch": batched["batch"],
        "batched_cpu_ms_per_image": batched.get("cpu_ms_per_image"),
        "batch64_images_per_s": by_batch[BATCH_IMAGES]["images_per_s"],
    }


def bare_cpu_at(bare: dict[str, Any], batch: float) -> float | None:
    """The bare model's CPU ms per image at the measured batch size nearest `batch` (on a log scale)."""
    rows = [r for r in bare["batches"] if r.get("cpu_ms_per_image") is not None]
    if not rows or batch <= 0:
        return None
    return min(rows, key=lambda r: abs(math.log(r["batch"] / batch)))["cpu_ms_per_image"]


# -- hey ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One request as hey recorded it."""

    latency_s: float
    status: int
    offset_s: float  # when it was sent, from hey's start


def parse_hey_csv(text: str) -> list[Answer]:
    """hey's `-o csv` rows: response-time, ..., status-code, offset (seconds). hey lists only requests
    that got an HTTP answer: a connection error or a client timeout (-t) leaves no row."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"response-time", "status-code", "offset"} <= set(reader.fieldnames):
        raise ValueError(f"not hey's CSV output (header {reader.fieldnames}); is /usr/bin/hey hey 0.1.4+?")
    return [Answer(float(r["response-time"]), int(r["status-code"]), float(r["offset"])) for r in reader]


def _quantile_ms(sorted_s: list[float], q: float) -> float:
    """Nearest-rank quantile in ms: the smallest latency with at least q of the requests at or below it."""
    return 1000 * sorted_s[max(0, math.ceil(q * len(sorted_s)) - 1)]


def summarize(answers: list[Answer], warmup_s: float, duration_s: float, images_per_request: int) -> dict:
    """Figures over the requests sent in [warmup_s, warmup_s + duration_s): throughput counts the
    answers with status 200; every other status is an error; latencies are the 200s'."""
    counted = [a for a in answers if warmup_s <= a.offset_s < warmup_s + duration_s]
    ok = sorted(a.latency_s for a in counted if a.status == 200)
    statuses = Counter(a.status for a in counted)
    summary = {
        "requests": len(counted),
        "ok": len(ok),
        "errors": len(counted) - len(ok),
        "status_codes": {str(code): n for code, n in sorted(statuses.items())},
        "rps": len(ok) / duration_s,
        "images_per_s": len(ok) * images_per_request / duration_s,
        # Slowest answer of the whole level, warm-up included: the deadline check reads it.
        "max_ms": 1000 * max((a.latency_s for a in answers), default=0.0),
    }
    for name, q in (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99)):
        summary[name] = _quantile_ms(ok, q) if ok else None
    return summary


def run_hey(url: str, body: Path, clients: int, seconds: float, timeout_s: int) -> list[Answer]:
    """A closed loop of `clients` hey workers POSTing `body` to `url` for `seconds`."""
    command = [HEY, "-z", f"{seconds:g}s", "-c", str(clients), "-m", "POST", "-D", str(body),
               "-T", CONTENT_TYPE, "-t", str(timeout_s), "-o", "csv", url]  # fmt: skip
    # hey lets every request in flight finish after -z ends: allow for the slowest one.
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse_hey_csv(done.stdout)


# -- CPU accounting ----------------------------------------------------------------------------------


def tree_cpu_s(roots: list[psutil.Process]) -> float:
    """User + system CPU seconds of `roots` and every process below them, so far."""
    total = 0.0
    for root in roots:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue  # ended between the listing and the reading: its time is lost, not guessed
            total += times.user + times.system
    return total


def children_cpu_s() -> float:
    """CPU seconds of this process's ended and waited-for children (hey, once run_hey returns)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def batch_totals(url: str) -> tuple[float, float] | None:
    """(images, model calls) the gateway's batchers ran so far, from its /metrics; None without them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_batch_size":
            for sample in family.samples:
                totals[sample.name] += sample.value
    if "gateway_batch_size_count" not in totals:
        return None
    return totals["gateway_batch_size_sum"], totals["gateway_batch_size_count"]


@dataclass(frozen=True)
class Server:
    """What a level loads: its processes (for their CPU) and, for the gateway, its base URL (/metrics)."""

    processes: list[psutil.Process]
    metrics_url: str | None = None


# -- the levels --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    duration_s: float
    warmup_s: float
    timeout_s: int  # hey's per-request timeout: beyond the gateway's deadline, so it never cuts first


def measure_levels(
    results: dict,
    app: str,
    url: str,
    body: Path,
    images_per_request: int,
    clients: tuple[int, ...],
    load: Load,
    server: Server,
) -> None:
    """One hey run per client count; one row each in results["runs"]."""
    for count in clients:
        batches = batch_totals(server.metrics_url) if server.metrics_url else None
        server_cpu, client_cpu, started = tree_cpu_s(server.processes), children_cpu_s(), time.monotonic()
        answers = run_hey(url, body, count, load.warmup_s + load.duration_s, load.timeout_s)
        row = {"app": app, "images_per_request": images_per_request, "clients": count,
               **summarize(answers, load.warmup_s, load.duration_s, images_per_request),
               **cpu_figures(answers, tree_cpu_s(server.processes) - server_cpu,
                             children_cpu_s() - client_cpu, time.monotonic() - started)}  # fmt: skip
        after = batch_totals(server.metrics_url) if batches else None
        if batches and after and after[1] > batches[1]:
            row["mean_batch"] = (after[0] - batches[0]) / (after[1] - batches[1])
        results["runs"].append(row)
        print(f"{app:28} {images_per_request:2} img  c={count:<3} req/s={row['rps']:8.1f} "
              f"img/s={row['images_per_s']:7.0f} p50={_ms(row['p50_ms'])} p99={_ms(row['p99_ms'])} "
              f"errors={row['errors']} {row['status_codes']} CPU ms/request: server "
              f"{_ms(row['server_cpu_ms_per_request'])} hey {_ms(row['client_cpu_ms_per_request'])}",
              flush=True)  # fmt: skip


def cpu_figures(answers: list[Answer], server_s: float, client_s: float, wall_s: float) -> dict[str, Any]:
    """CPU per answered request over the whole hey run (warm-up included: CPU cannot be split by
    request), and the cores the server kept busy."""
    answered = sum(1 for a in answers if a.status == 200)
    return {
        "server_cpu_ms_per_request": 1000 * server_s / answered if answered else None,
        "client_cpu_ms_per_request": 1000 * client_s / answered if answered else None,
        "server_cores": server_s / wall_s if wall_s > 0 else None,
    }


def _ms(value: float | None) -> str:
    return f"{value:8.2f} ms" if value is not None else "       - ms"


def gateway_env(model_base: Path, tfserving_address: str = "") -> dict[str, str]:
    return {
        "GATEWAY_MODEL_BASE_PATH": str(model_base),
        "GATEWAY_MODEL_NAME": MODEL_NAME,
        "GATEWAY_TFSERVING_ADDRESS": tfserving_address,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


# "...; timed on this machine before" (a worker that read the race) is left out: the same race.
_LARGE_BATCHES = re.compile(r"version \d+: (batches of \d+\+ images run on \w+ \([^);]*)[^)]*\)")


def measure_gateway(results: dict, model_base: Path, bodies: dict[int, Path], args: argparse.Namespace,
                    load: Load) -> None:  # fmt: skip
    with running_gateway(gateway_env(model_base), workers=args.workers, startup_timeout=180) as gateway:
        url, server = gateway.url + "/v1/predict", Server([gateway.master], gateway.url)
        measure_levels(results, GATEWAY, url, bodies[1], 1, GATEWAY_CLIENTS, load, server)
        measure_levels(results, GATEWAY, url, bodies[BATCH_IMAGES], BATCH_IMAGES, GATEWAY_BATCH_CLIENTS, load,
                       server)  # fmt: skip
        # GATEWAY_RUNTIME=auto: which runtime each worker gave large batches, and the race that decided.
        results["gateway_large_batches"] = sorted({f"{m})" for m in _LARGE_BATCHES.findall(gateway.log())})


def measure_naive_app(results: dict, run_dir: Path, body: Path, args: argparse.Namespace, load: Load,
                      clients: tuple[int, ...] = NAIVE_CLIENTS) -> None:  # fmt: skip
    env = {"NAIVE_RUN_DIR": str(run_dir)}
    app = "benchmarks.naive_flask:create_app()"
    _measure_flask_route(results, NAIVE, app, env, body, clients, args, load)


def measure_lean_app(
    results: dict, model_path: Path, body: Path, args: argparse.Namespace, load: Load
) -> None:
    env = {"LEAN_MODEL_DIR": str(model_path)}
    _measure_flask_route(results, LEAN, "benchmarks.lean_flask:create_app()", env, body, LEAN_CLIENTS,
                         args, load)  # fmt: skip


def measure_no_model_route(
    results: dict, model_path: Path, body: Path, args: argparse.Namespace, load: Load
) -> None:
    """The lean app's route without its model call, at NO_MODEL_CLIENTS: kept as results["no_model"],
    outside the table's runs (a fraction of the bare model means nothing for it)."""
    scratch: dict[str, list] = {"runs": []}
    app, env = "benchmarks.lean_flask:create_app(model=False)", {"LEAN_MODEL_DIR": str(model_path)}
    _measure_flask_route(scratch, NO_MODEL, app, env, body, (NO_MODEL_CLIENTS,), args, load)
    results["no_model"] = scratch["runs"][0]


def _measure_flask_route(results: dict, name: str, app: str, env: dict[str, str], body: Path,
                         clients: tuple[int, ...], args: argparse.Namespace, load: Load) -> None:  # fmt: skip
    """A one-route Flask app (POST /predict) under the gateway's gunicorn settings, one image per request."""
    env = {**env, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # No health route: a GET on its POST-only /predict answers 405 once the app is built.
    with running_gateway(env, workers=args.workers, app=app, probe_path="/predict", probe_statuses=(405,),
                         startup_timeout=180) as served:  # fmt: skip
        server = Server([served.master])
        measure_levels(results, name, served.url + "/predict", body, 1, clients, load, server)


def measure_litserve(results: dict, model_path: Path, body: Path, work: Path, load: Load) -> None:
    """LitServe on the published version (benchmarks/litserve_app.py), its own processes."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = work / "litserve.log"
    # The runtime the gateway gives batches of one-image requests (LiteRT under "auto").
    arguments = [*LITSERVE_ARGS, "--runtime", gateway_runtime_at(results, 1)]
    command = [sys.executable, "-m", "benchmarks.litserve_app", "--model", str(model_path),
               "--port", str(port), *arguments]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not _answers(url + "/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"LitServe did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        results["settings"]["litserve"] = " ".join(arguments)
        server = Server([psutil.Process(process.pid)])
        measure_levels(results, LITSERVE, url + "/predict", body, 1, LITSERVE_CLIENTS, load, server)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited (a bad argument)
            os.killpg(process.pid, signal.SIGTERM)  # LitServe's API server and inference workers
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def tfserving_double(model_base: Path, log_path: Path) -> Iterator[tuple[str, int]]:
    """The TF Serving test double (`python -m tests.tfserving_double`) as its own process; yields its
    host:port and process id. (tests/fixtures/tfserving.py's ProcessDouble does the same for the test
    suite, but importing it needs pytest, which `make bench-serve` does not install.)"""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.tfserving_double", "--model-base", str(model_base), "--port", "0"],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip
    try:
        assert process.stdout is not None
        address = None
        for line in process.stdout:  # the double prints this line once its models are loaded
            if line.startswith("tfserving-double listening on "):
                address = line.rsplit(" ", 1)[1].strip()
                break
        # Keep reading what it prints, so a full pipe never blocks it mid-benchmark.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        if address is None:
            raise RuntimeError(
                f"the TF Serving double exited ({process.wait()}):\n{log_path.read_text()[-3000:]}"
            )
        yield address, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure_tfserving(results: dict, model_base: Path, body: Path, work: Path, args: argparse.Namespace,
                      load: Load) -> None:  # fmt: skip
    with (
        tfserving_double(model_base, work / "tfserving-double.log") as (address, double_pid),
        running_gateway(
            gateway_env(model_base, address), workers=args.workers, startup_timeout=180
        ) as gateway,
    ):
        server = Server([gateway.master, psutil.Process(double_pid)])  # the gateway and the model server
        url = gateway.url + "/v1/predict"
        measure_levels(results, TFSERVING, url, body, 1, TFSERVING_CLIENTS, load, server)


# -- ratios and targets ------------------------------------------------------------------------------


def add_ratios(results: dict) -> None:
    """Each run's images/s as a fraction of the bare model's (batch 64 for 64-image requests, the
    best batch otherwise) and its req/s over the naive app's at the same clients (single images)."""
    bare = results["bare_model"]
    naive = {r["clients"]: r for r in results["runs"] if r["app"] == NAIVE}
    litserve = {r["clients"]: r for r in results["runs"] if r["app"] == LITSERVE}
    for r in results["runs"]:
        limit = (
            bare["batch64_images_per_s"]
            if r["images_per_request"] == BATCH_IMAGES
            else bare["batched_images_per_s"]
        )
        r["fraction_of_bare"] = r["images_per_s"] / limit
        base = naive.get(r["clients"]) if r["images_per_request"] == 1 and r["app"] != NAIVE else None
        r["vs_naive"] = r["rps"] / base["rps"] if base and base["rps"] > 0 else None
        lit = litserve.get(r["clients"]) if r["images_per_request"] == 1 and r["app"] != LITSERVE else None
        r["vs_litserve"] = r["rps"] / lit["rps"] if lit and lit["rps"] > 0 else None


def gateway_runtime_at(results: dict, batch: float) -> str:
    """The runtime the gateway ran batches of `batch` images on: LiteRT under "auto" and "litert",
    TensorFlow for batches of LARGE_BATCH_ROWS+ where its workers' race chose it."""
    chosen = results.get("settings", {}).get("gateway_runtime", "tensorflow")
    if chosen == "tensorflow":
        return "tensorflow"
    large = any("run on TensorFlow" in line for line in results.get("gateway_large_batches") or [])
    return "tensorflow" if chosen == "auto" and large and batch >= LARGE_BATCH_ROWS else "litert"


def cpu_budget(results: dict) -> dict[str, Any] | None:
    """Where a request's CPU goes at 16 clients, beside what the 70% target allows: on this machine's
    cores, TARGET_BARE_FRACTION of the bare model's batched images/s leaves `allowed_ms` of CPU per
    request for everything (model, gateway, hey); the bare model takes its CPU per image, hey its
    share, and the rest is what the gateway may spend beside the model. None without CPU figures."""
    bare, g16 = results["bare_model"], _row(results, GATEWAY, 1, 16)
    cores = results.get("machine", {}).get("cpu_count")
    model_best = bare.get("batched_cpu_ms_per_image")
    if not g16 or g16.get("server_cpu_ms_per_request") is None or model_best is None or not cores:
        return None
    mean_batch = g16.get("mean_batch")
    runtime = gateway_runtime_at(results, mean_batch or 1)
    on_runtime = next((r for r in bare.get("runtimes", []) if r.get("runtime") == runtime), bare)
    model_at_batch = bare_cpu_at(on_runtime, mean_batch) if mean_batch else None
    allowed = cores * 1000 / (TARGET_BARE_FRACTION * bare["batched_images_per_s"])
    client = g16["client_cpu_ms_per_request"] or 0.0
    gateway = g16["server_cpu_ms_per_request"]
    allowed_beside_model = allowed - model_best - client  # for the gateway's own work, at the model's best
    # Both apps saturate the cores at 16 clients, so their req/s ratio is about the inverse ratio of
    # their CPU per request (hey's included): TARGET_NAIVE_RATIO x the naive app's req/s leaves the
    # gateway the naive app's CPU per request / TARGET_NAIVE_RATIO, less hey's.
    n16 = _row(results, NAIVE, 1, 16)
    naive = (n16["server_cpu_ms_per_request"] + (n16["client_cpu_ms_per_request"] or 0.0)
             if n16 and n16.get("server_cpu_ms_per_request") is not None else None)  # fmt: skip
    return {
        "cores": cores,
        "allowed_ms": allowed,  # CPU ms per request, all processes, at the target's rate
        "model_best_ms": model_best,  # bare model CPU ms per image at its best batch
        "mean_batch": mean_batch,  # images per model call in the gateway at 16 clients
        "model_at_mean_batch_ms": model_at_batch,  # bare CPU ms per image at the nearest measured batch
        "model_at_mean_batch_runtime": on_runtime.get("runtime", runtime),  # the gateway's at that batch
        "gateway_ms": gateway,  # the gateway's processes, CPU ms per request
        "client_ms": client,  # hey, CPU ms per request
        "gateway_beside_model_ms": gateway - (model_at_batch if model_at_batch is not None else model_best),
        "allowed_beside_model_ms": allowed_beside_model,
        "naive_ratio": TARGET_NAIVE_RATIO,
        "naive_ms": naive,  # the naive app's processes and hey, CPU ms per request at 16 clients
        "allowed_for_naive_ratio_ms": naive / TARGET_NAIVE_RATIO - client if naive is not None else None,
        **_lean_figures(results, g16),
        **_no_model_figures(results, allowed_beside_model),
    }


def _no_model_figures(results: dict, allowed_beside_model: float) -> dict[str, Any]:
    """The Flask route with no model: its CPU per request, and what the 70% target then leaves for
    the gateway's own work (batching, limits, metrics, trust fields) beside the model and hey.
    Empty when it was not run."""
    row = results.get("no_model")
    if not row or row.get("server_cpu_ms_per_request") is None:
        return {}
    return {
        "no_model_ms": row["server_cpu_ms_per_request"],
        "no_model_rps": row["rps"],
        "allowed_beside_http_ms": allowed_beside_model - row["server_cpu_ms_per_request"],
    }


def _lean_figures(results: dict, g16: dict) -> dict[str, Any]:
    """The lean app at 16 clients beside the gateway: its CPU per request, its fractions of the
    targets, and the gateway's req/s over its. Empty when it was not run."""
    l16 = _row(results, LEAN, 1, 16)
    if not l16 or l16.get("server_cpu_ms_per_request") is None:
        return {}
    return {
        "lean_ms": l16["server_cpu_ms_per_request"],  # the lean app's processes, CPU ms per request
        "lean_rps": l16["rps"],
        "lean_fraction_of_bare": l16["fraction_of_bare"],
        "lean_vs_naive": l16["vs_naive"],
        "gateway_vs_lean": g16["rps"] / l16["rps"] if l16["rps"] > 0 else None,
    }


def _row(results: dict, app: str, images: int, clients: int) -> dict | None:
    return next((r for r in results["runs"] if (r["app"], r["images_per_request"], r["clients"]) ==
                 (app, images, clients)), None)  # fmt: skip


def check_targets(results: dict) -> list[dict[str, Any]]:
    """Issue 14's targets, each with what was measured and whether it was met (a missing level: not met)."""
    bare = results["bare_model"]
    g16, g1 = _row(results, GATEWAY, 1, 16), _row(results, GATEWAY, 1, 1)
    n16 = _row(results, NAIVE, 1, 16)
    batch_rows = [
        r for r in results["runs"] if r["app"] == GATEWAY and r["images_per_request"] == BATCH_IMAGES
    ]
    gateway_rows = [r for r in results["runs"] if r["app"] in (GATEWAY, TFSERVING)]
    deadline_ms = 1000 * results["settings"]["request_deadline_s"]
    targets = []

    def target(name: str, measured: float | None, met: bool, text: str) -> None:
        targets.append({"name": name, "measured": measured, "met": bool(met), "text": text})

    ratio = g16["rps"] / n16["rps"] if g16 and n16 and n16["rps"] > 0 else None
    target(
        f"16 clients: gateway req/s >= {TARGET_NAIVE_RATIO:g}x the naive app's",
        ratio,
        ratio is not None and ratio >= TARGET_NAIVE_RATIO,
        f"{ratio:.1f}x" if ratio is not None else "not measured",
    )
    l16 = _row(results, LITSERVE, 1, 16)
    lit_ratio = g16["rps"] / l16["rps"] if g16 and l16 and l16["rps"] > 0 else None
    target(
        f"16 clients: gateway req/s >= {TARGET_LITSERVE_RATIO:g}x LitServe's (its dynamic batching)",
        lit_ratio,
        lit_ratio is not None and lit_ratio >= TARGET_LITSERVE_RATIO,
        f"{lit_ratio:.2f}x ({g16['rps']:.0f} vs {l16['rps']:.0f} req/s)" if lit_ratio is not None
        else "not measured",
    )
    p99 = g16["p99_ms"] if g16 else None
    target(
        f"16 clients: gateway p99 < {TARGET_P99_MS:g} ms",
        p99,
        p99 is not None and p99 < TARGET_P99_MS,
        f"{p99:.1f} ms" if p99 is not None else "not measured",
    )
    fraction = g16["fraction_of_bare"] if g16 else None
    target(
        f"16 clients: gateway images/s >= {TARGET_BARE_FRACTION:.0%} of the bare model's batched images/s",
        fraction,
        fraction is not None and fraction >= TARGET_BARE_FRACTION,
        f"{fraction:.0%} ({g16['images_per_s']:.0f} of {bare['batched_images_per_s']:.0f})"
        if g16
        else "not measured",
    )
    p50 = g1["p50_ms"] if g1 else None
    limit = bare["batch1_ms"] + TARGET_BATCH1_SLACK_MS
    target(
        f"1 client: gateway p50 <= bare batch-1 latency + {TARGET_BATCH1_SLACK_MS:g} ms",
        p50,
        p50 is not None and p50 <= limit,
        f"{p50:.2f} ms vs {limit:.2f} ms" if p50 is not None else "not measured",
    )
    best = max(batch_rows, key=lambda r: r["images_per_s"], default=None)
    fraction64 = best["fraction_of_bare"] if best else None
    target(
        f"64-image requests: images/s >= {TARGET_BATCH64_FRACTION:.0%} of the bare model's batch-64 images/s",
        fraction64,
        fraction64 is not None and fraction64 >= TARGET_BATCH64_FRACTION,
        f"{fraction64:.0%} ({best['images_per_s']:.0f} of {bare['batch64_images_per_s']:.0f}, "
        f"{best['clients']} client{'s' if best['clients'] > 1 else ''})"
        if best
        else "not measured",
    )
    errors = sum(r["errors"] for r in gateway_rows)
    target(
        "no error at any gateway load level",
        errors,
        bool(gateway_rows) and errors == 0,
        f"{errors} errors in {sum(r['requests'] for r in gateway_rows)} requests",
    )
    slowest = max((r["max_ms"] for r in gateway_rows), default=None)
    target(
        f"no answer later than the request deadline ({deadline_ms / 1000:g} s)",
        slowest,
        slowest is not None and slowest <= deadline_ms,
        f"slowest {slowest:.0f} ms" if slowest is not None else "not measured",
    )
    return targets  # fmt: skip


def print_summary(results: dict) -> None:
    m, bare = results["model"], results["bare_model"]
    print(f"\nmodel: {m['arch']} width {m['width']}, {m['params']:,} parameters, {m['weights']}")
    print(
        f"bare model ({bare.get('runtime', 'tensorflow')}): batch 1 {bare['batch1_ms']:.2f} ms; best batched "
        f"{bare['batched_images_per_s']:.0f} "
        f"images/s (batch {bare['batched_best_batch']}); batch 64 {bare['batch64_images_per_s']:.0f} images/s"
    )
    print("\n| app | images/request | clients | req/s | images/s | of bare | vs naive | p50 ms | p99 ms "
          "| errors |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        vs = f"{r['vs_naive']:.1f}x" if r["vs_naive"] is not None else "-"
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
        print(
            f"| {r['app']} | {r['images_per_request']} | {r['clients']} | {r['rps']:.1f} "
            f"| {r['images_per_s']:.0f} | {r['fraction_of_bare']:.0%} | {vs} | {p50} | {p99} "
            f"| {r['errors']} |"
        )
    print()
    for t in results["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'}  {t['name']}: {t['text']}")  # fmt: skip
    budget = results.get("cpu_budget")
    if budget:
        print(f"\nCPU per request at 16 clients: gateway {budget['gateway_ms']:.2f} ms (beside the model "
              f"{budget['gateway_beside_model_ms']:.2f}), hey {budget['client_ms']:.2f}; the 70% target "
              f"allows {budget['allowed_ms']:.2f} in all, {budget['allowed_beside_model_ms']:.2f} beside the "
              "model")  # fmt: skip
        if budget.get("lean_ms") is not None:
            print(f"lean app at 16 clients: {budget['lean_rps']:.1f} req/s, {budget['lean_ms']:.2f} ms CPU "
                  f"per request, {budget['lean_fraction_of_bare']:.0%} of bare; gateway "
                  f"{budget['gateway_vs_lean']:.2f}x its req/s")  # fmt: skip
        if budget.get("no_model_ms") is not None:
            print(f"Flask route with no model at 16 clients: {budget['no_model_ms']:.2f} ms CPU per request; "
                  f"the 70% target leaves {budget['allowed_beside_http_ms']:.2f} ms beside it, the model "
                  "and hey")  # fmt: skip


# -- main --------------------------------------------------------------------------------------------


def write_json(results: dict, out: Path) -> None:
    """Atomically: a report reading `out` never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2))
    os.replace(tmp_out, out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, help="a trained run directory (default: the profile's "
                        "model, untrained)")  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, default=DEFAULT_PROFILE, help="the profile whose model is served"
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per load level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of each level not counted")
    parser.add_argument("--bare-duration", type=float, default=3.0, help="seconds per bare-model batch size")
    parser.add_argument(
        "--workers", type=int, default=2, help="gunicorn workers, as `make serve` (WORKERS=2)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 s per level, 0.5 s warm-up, "
                        "0.5 s per bare batch size; the figures mean little")  # fmt: skip
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["naive", "litserve", "tfserving", "startup", "lean"],
        help="leave out the naive app, LitServe, the TF Serving double run, the start-up timing or the "
        "lean app (and its route with no model)",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.bare_duration = 2.0, 0.5, 0.5
    return args


def check_hey() -> None:
    if not (os.path.isfile(HEY) and os.access(HEY, os.X_OK)):
        raise SystemExit(
            f"{HEY} is missing: the benchmark's load generator. Install it with "
            "`apt-get install -y hey` (Debian/Ubuntu)."
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_hey()
    from serving.config import Settings
    from trainer.export.publish import publish

    started = time.monotonic()
    settings = Settings.from_env({**os.environ, **gateway_env(Path("models"))})
    load = Load(args.duration, args.warmup, timeout_s=math.ceil(settings.request_deadline_s) + 10)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.serving_latency " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**describe(), "load_average_1m": load_average()},
        "settings": {"quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup,
                     "bare_duration_s": args.bare_duration, "workers": args.workers,
                     "client": f"hey ({HEY}), closed loop, -t {load.timeout_s} s",
                     "request_deadline_s": settings.request_deadline_s,
                     "gateway_runtime": settings.runtime},
        "runs": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        if args.run_dir:
            run_dir, info = args.run_dir, trained_run_info(args.run_dir)
        else:
            run_dir, info = build_run_dir(work / "run", args.profile)
        results["model"] = {k: v for k, v in info.items() if k != "class_names"}
        print(f"model: {info['arch']} width {info['width']}, {info['params']:,} parameters "
              f"({info['weights']})", flush=True)  # fmt: skip
        model_path = publish(run_dir, work / "models", MODEL_NAME)
        results["bare_model"] = measure_bare_model(model_path, args.bare_duration)
        bodies = {n: work / f"body-{n}.multipart" for n in (1, BATCH_IMAGES)}
        for n, path in bodies.items():
            path.write_bytes(multipart("images", sample_pngs(n)))
        measure_gateway(results, work / "models", bodies, args, load)
        if "startup" not in args.skip:
            results["startup"] = measure_startup(gateway_env(work / "models"), args.workers, work)
        if "naive" not in args.skip:
            naive_body = work / "naive-body.multipart"
            naive_body.write_bytes(multipart("file", sample_pngs(1)))
            measure_naive_app(results, run_dir, naive_body, args, load)
        if "litserve" not in args.skip:
            measure_litserve(results, model_path, bodies[1], work, load)
        if "tfserving" not in args.skip:
            measure_tfserving(results, work / "models", bodies[1], work, args, load)
        if "lean" not in args.skip:
            measure_lean_app(results, model_path, bodies[1], args, load)
            measure_no_model_route(results, model_path, bodies[1], args, load)
    results["machine"]["load_average_1m_end"] = load_average()
    results["wall_s"] = round(time.monotonic() - started, 1)
    add_ratios(results)
    results["targets"] = check_targets(results)
    results["cpu_budget"] = cpu_budget(results)
    print_summary(results)
    print(f"\nwall time {results['wall_s']:.0f} s")
    if args.out:
        write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
