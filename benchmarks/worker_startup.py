"""How long a gateway takes to serve on LiteRT, and how much memory its workers then hold, with the
conversion cache off, cold (the first start on a machine) and warm (a restart): the cost the
cache (serving/backends/litert_cache.py) exists to cut. Part of `make bench-serve`, or on its own:

    python -m benchmarks.worker_startup --model-base models --model-name cifar10
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.gateway_process import running_gateway, wait_until

# The embedded backend's log line once a worker's version serves on LiteRT (serving/backends/embedded.py).
_ON_LITERT = re.compile(r"runs on LiteRT \(XNNPACK, \d+ threads; (converted|read from the conversion cache) "
                        r"and checked in ([0-9.]+) s")  # fmt: skip
CASES = ("off", "cold", "warm")  # warm: the same directory as cold, after it


def start_once(env: dict[str, str], workers: int, timeout_s: float = 240.0) -> dict[str, Any]:
    """Seconds from starting gunicorn until every worker logged its version on LiteRT, then each
    worker's RSS and how it got its conversion."""
    started = time.monotonic()
    with running_gateway(env, workers=workers, startup_timeout=timeout_s) as gateway:
        wait_until(lambda: len(_ON_LITERT.findall(gateway.log())) >= workers, timeout_s, "workers on LiteRT")
        seconds = time.monotonic() - started
        rss = [worker.memory_info().rss / 2**20 for worker in gateway.workers()]
        loads = _ON_LITERT.findall(gateway.log())
    return {
        "seconds": round(seconds, 2),
        "worker_rss_mib": sorted(round(r) for r in rss),
        "converted": sum(how == "converted" for how, _ in loads),
        "from_cache": sum(how != "converted" for how, _ in loads),
        "load_s": sorted(float(s) for _, s in loads),
    }


def measure_startup(env: dict[str, str], workers: int, work: Path) -> dict[str, Any]:
    """The three cases, each a fresh gunicorn with `env` (model base and name set)."""
    cache = work / "litert-cache"
    cases = []
    for case in CASES:
        cache_env = {**env, "GATEWAY_LITERT_CACHE_DIR": "off" if case == "off" else str(cache)}
        cases.append({"cache": case, **start_once(cache_env, workers)})
    return {"workers": workers, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base", type=Path, required=True)
    parser.add_argument("--model-name", default="cifar10")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    env = {"GATEWAY_MODEL_BASE_PATH": str(args.model_base), "GATEWAY_MODEL_NAME": args.model_name,
           "GATEWAY_TFSERVING_ADDRESS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        print(json.dumps(measure_startup(env, args.workers, Path(tmp)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
