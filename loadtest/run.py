"""`make loadtest`: run Locust headless against a gateway, keep its CSV files, apply the gates.

    python -m loadtest.run                      # start a gateway (embedded model) and load it
    python -m loadtest.run --url http://host:port   # load an existing gateway
    python -m loadtest.run --model-base models --model-name cifar10   # serve that model

The gateway it starts wants an API key (a fresh one, minted into the results directory) and applies
a rate limit far above the load (--rate-limit), so the load goes through both as production's does;
a gateway given by --url gets the key of --api-key or $CIFAR10_API_KEY, if any. It also samples
predictions (--sample-rate, every request by default: the gates must hold with the sample's writes
in the worker processes) into RESULTS_DIR/samples, which `python -m serving.sampling` reads.
Without --url and without a published model under --model-base, it trains a small model on the
synthetic dataset and exports it into the results directory first (about a minute), so the command
works on a fresh checkout. Exits 0 when every gate in loadtest/gates.py passes, 1 with the reasons
otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from contract.versions import latest_version
from loadtest.gates import P99_GATE_MS, Verdict, evaluate
from loadtest.gateway_process import PROJECT_ROOT, running_gateway
from loadtest.payloads import API_KEY_ENV, MAX_IMAGES_ENV
from serving.auth import hash_key, new_key

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_RESULTS = PROJECT_ROOT / "loadtest-results"
# The gateway run.py starts refuses more images than this per request; the mix's "too many images"
# request sends one more.
GATEWAY_MAX_IMAGES = 32
# Far above what the load reaches (about 100 requests/s on 2 cores): the limiter is on the path of
# every request, as in production, without refusing the run's own traffic.
GATEWAY_RATE_LIMIT = "2000/second"
# Prediction sampling in the started gateway: every request, the most the sampler can be asked to write.
GATEWAY_SAMPLE_RATE = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="load this running gateway instead of starting one")
    p.add_argument("--users", type=int, default=8, help="concurrent Locust users (default 8)")
    p.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (default 4)")
    p.add_argument("--time", default="30s", help="run time, Locust syntax: 30s, 2m (default 30s)")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where the CSV files go")
    p.add_argument("--p99-gate-ms", type=float, default=P99_GATE_MS, help=f"p99 gate, ms ({P99_GATE_MS:.0f})")
    p.add_argument("--model-base", type=Path, help="serve the newest version under MODEL_BASE/<name>/")
    p.add_argument("--model-name", default="cifar10")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers of the started gateway")
    p.add_argument("--max-images", type=int, default=None,
                   help=f"images-per-request limit of the gateway under test (default {GATEWAY_MAX_IMAGES} "
                   "for a started one; pass the --url gateway's GATEWAY_MAX_IMAGES)")
    p.add_argument("--api-key", default=os.environ.get("CIFAR10_API_KEY"),
                   help="API key to send to the --url gateway (default $CIFAR10_API_KEY; none if unset)")
    p.add_argument("--rate-limit", default=GATEWAY_RATE_LIMIT,
                   help=f"GATEWAY_RATE_LIMIT of the started gateway (default {GATEWAY_RATE_LIMIT})")
    p.add_argument("--sample-rate", type=float, default=GATEWAY_SAMPLE_RATE,
                   help=f"GATEWAY_SAMPLE_RATE of the started gateway (default {GATEWAY_SAMPLE_RATE:g}; "
                   "0 turns prediction sampling off); the sample goes to RESULTS_DIR/samples")
    return p.parse_args(argv)


def mint_key(results_dir: Path) -> tuple[str, Path]:
    """A new API key for this run and the keys file (GATEWAY_API_KEYS_FILE) that admits it."""
    key = new_key()
    keys_file = results_dir / "api-keys"
    keys_file.write_text(f"# minted by loadtest/run.py for one run\nloadtest:{hash_key(key)}\n")
    return key, keys_file


def has_version(model_base: Path, name: str) -> bool:
    return latest_version(model_base / name) is not None


def ensure_model(results_dir: Path, name: str) -> Path:
    """A model base holding a published `name`: trained quickly on synthetic data when absent."""
    model_base = results_dir / "model"
    if has_version(model_base, name):
        return model_base
    run_dir = results_dir / "train-run"
    python = sys.executable
    steps = [
        # The load test needs a model that answers, not a good one: 2 epochs on 1500 images.
        [python, "-m", "trainer", "train", "--dataset", "synthetic", "--config", "configs/quick.yaml",
         "--epochs", "2", "--set", "data.num_train=1500", "--run-dir", str(run_dir), "--resume"],
        [python, "-m", "trainer", "export", "--run-dir", str(run_dir), "--model-base", str(model_base),
         "--model-name", name],
    ]
    for command in steps:
        print("==>", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=PROJECT_ROOT, check=True)
    return model_base


def run_locust(url: str, args: argparse.Namespace, prefix: Path, max_images: int, key: str | None) -> int:
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.time,
        "--csv", str(prefix), "--host", url, "--stop-timeout", "15", "--exit-code-on-error", "0",
    ]
    env = {**os.environ, MAX_IMAGES_ENV: str(max_images), API_KEY_ENV: key or ""}
    print(f"==> locust: {args.users} users for {args.time} against {url}"
          f"{' with an API key' if key else ''}", flush=True)
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env).returncode


def report(verdict: Verdict, gate_ms: float, prefix: Path) -> None:
    p99 = "n/a" if verdict.p99_ms is None else f"{verdict.p99_ms:.0f} ms"
    print(f"==> {verdict.requests} requests: good {verdict.good_requests} ({verdict.good_failures} failed), "
          f"bad inputs {verdict.bad_requests} ({verdict.bad_failures} wrong answers), p99 {p99} "
          f"(gate {gate_ms:.0f} ms); CSV files: {prefix}_*.csv")
    for problem in verdict.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if verdict.passed:
        print("PASS: all load gates met")


def report_sample(sample_dir: Path) -> None:
    from serving.sampling import SampleError, SampleStore

    try:
        with SampleStore(sample_dir, create=False) as store:
            print(f"==> prediction sample: {store.count()} image(s) in {store.path}", flush=True)
    except SampleError as error:
        print(f"==> prediction sample: none ({error})", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results_dir.resolve()
    results.mkdir(parents=True, exist_ok=True)
    prefix = results / time.strftime("load-%Y%m%d-%H%M%S")
    with ExitStack() as stack:
        url = args.url
        key = args.api_key if url else None
        max_images = args.max_images or GATEWAY_MAX_IMAGES
        if url is None:
            given = args.model_base
            model_base = given if given and has_version(given, args.model_name) else ensure_model(
                results, args.model_name
            )
            key, keys_file = mint_key(results)
            env = {
                "GATEWAY_MODEL_BASE_PATH": str(model_base.resolve()),
                "GATEWAY_MODEL_NAME": args.model_name,
                "GATEWAY_TFSERVING_ADDRESS": "",
                "GATEWAY_MAX_IMAGES": str(max_images),
                "GATEWAY_API_KEYS_FILE": str(keys_file),
                "GATEWAY_RATE_LIMIT": args.rate_limit,
                "GATEWAY_SAMPLE_RATE": str(args.sample_rate),
                "GATEWAY_SAMPLE_DIR": str(results / "samples"),
            }
            print(f"==> starting the gateway (embedded model from {model_base})", flush=True)
            gateway = stack.enter_context(running_gateway(env, workers=args.workers, log_dir=results))
            url = gateway.url
        rc = run_locust(url.rstrip("/"), args, prefix, max_images, key)
        # Failed requests leave the exit code 0 (--exit-code-on-error 0): the gates judge them.
        if rc != 0:
            print(f"FAIL: locust exited with {rc}", file=sys.stderr)
            return 1
    if args.url is None and args.sample_rate > 0:
        report_sample(results / "samples")
    verdict = evaluate(Path(f"{prefix}_stats.csv"), args.p99_gate_ms)
    report(verdict, args.p99_gate_ms, prefix)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
