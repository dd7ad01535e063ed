"""`python -m tests.tfserving_double --model-base DIR --port N`: the double as its own process.

Prints `tfserving-double listening on HOST:PORT` once the models on disk are loaded, so a parent
can wait for that line. `--control FILE` lets the parent steer a running process: the file holds
JSON like {"down": true, "delay": 2.5} and is re-read whenever it changes.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from tests.tfserving_double.server import TFServingDouble


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.tfserving_double", description=__doc__)
    parser.add_argument("--model-base", required=True, type=Path, help="BASE/<name>/<version>/saved_model.pb")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between directory scans")
    parser.add_argument(
        "--all-versions", action="store_true", help="serve every version, not only the latest"
    )
    parser.add_argument(
        "--model-config-file", type=Path, help="TF Serving's models.config (policies, version_labels)"
    )
    parser.add_argument(
        "--allow-version-labels-for-unavailable-models",
        action="store_true",
        help="as the server flag: a new label may name a version that is not loaded yet",
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds every RPC waits before answering")
    parser.add_argument("--control", type=Path, help="JSON file with 'down' and 'delay', re-read on change")
    return parser.parse_args(argv)


def _follow_control(double: TFServingDouble, path: Path, stop: threading.Event) -> None:
    last = None
    while not stop.wait(0.1):
        try:
            stamp = path.stat().st_mtime_ns
            if stamp == last:
                continue
            settings = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # absent or half-written: the writer should os.replace, but be lenient
        last = stamp
        double.set_delay(float(settings.get("delay", 0.0)))
        double.set_down(bool(settings.get("down", False)))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not args.model_base.is_dir():
        print(f"error: --model-base {args.model_base} is not a directory", file=sys.stderr)
        return 2
    double = TFServingDouble(
        args.model_base,
        host=args.host,
        port=args.port,
        poll_interval_s=args.poll_interval,
        all_versions=args.all_versions,
        model_config=args.model_config_file,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
    )
    double.set_delay(args.delay)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    double.start()
    if args.control is not None:
        threading.Thread(target=_follow_control, args=(double, args.control, stop), daemon=True).start()
    print(f"tfserving-double listening on {double.address}", flush=True)
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
