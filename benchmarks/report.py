"""Write docs/benchmarks.md from the JSON results of the training and serving benchmarks.

`make bench` runs both benchmarks (each writes benchmarks/results/*.json with its own command,
machine and figures) and then this, so the document always shows the figures of the last run
next to how they were obtained. Figures are side-by-side ratios from one run: this machine is
shared and noisy, and absolute numbers move with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path("benchmarks/results")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def training_section(data: dict) -> list[str]:
    lines = [
        "## Training throughput (`make bench-train`)",
        "",
        f"Command: `{data['command'].strip()}`; load average at start "
        f"{data['machine']['load_average_1m']:.1f}; GPUs: {data['machine']['gpus']}; "
        f"Keras {data['versions']['keras']} on {data['versions']['backend']}.",
        "Bare step: `train_on_batch` on one fixed in-memory batch. Full path: `fit` with shuffling, the",
        "augmentation layers and the input pipeline. Target: the pipeline adds at most 20% to the bare step.",
        "",
        "| arch (width) | params | batch | bare images/s | full images/s | pipeline overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        lines.append(
            f"| {r['arch']} ({r['width']}) | {r['params']:,} | {r['batch_size']} "
            f"| {r['bare_images_per_s']:.1f} | {r['full_images_per_s']:.1f} | {100 * r['overhead']:.1f}% |"
        )
    met = data["max_overhead"] <= data["target_max_overhead"]
    lines += [
        "",
        f"Largest overhead {100 * data['max_overhead']:.1f}%: target {'met' if met else 'MISSED'}.",
        "",
    ]
    return lines


def serving_section(data: dict) -> list[str]:
    s = data["settings"]
    width = f", width {s['width']}" if s.get("width") else ""
    lines = [
        "## Serving latency (`make bench-serve`)",
        "",
        "Command: `python -m benchmarks.serving_latency "
        f"--duration {s['duration_s']:g} --workers {s['workers']}`"
        f" (model: {s['run_dir'] or 'untrained ' + s['arch'] + width}). Both apps run under gunicorn with",
        "the same worker count on this machine; each client sends a request, waits for the answer and sends",
        "the next (closed loop). The naive app is the tutorial approach: a Flask route calling Keras",
        "`model.predict` on each upload.",
        "",
        "| app | scenario | clients | req/s | images/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["scenarios"]:
        lines.append(
            f"| {r['app']} | {r['scenario']} | {r['clients']} | {r['rps']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
        )
    bare = data["bare_model"]
    lines.append(
        f"| bare model | 64 images, in process | - | - | {bare['batch64_images_per_s']:.0f} | "
        f"{bare['batch64_ms']:.2f} | - | - | - |"
    )
    lines.append(
        f"| bare model | 1 image, in process | - | - | - | {bare['single_image_ms']:.2f} | - | - | - |"
    )
    rows = {(r["app"], r["scenario"], r["clients"]): r for r in data["scenarios"]}
    naive16, gate16 = rows[("naive", "1 image", 16)], rows[("gateway", "1 image", 16)]
    lines += [
        "",
        f"At 16 clients the gateway answers {gate16['rps'] / max(naive16['rps'], 1e-9):.1f}x the naive app's "
        "requests per second.",
        "",
        "| target | result |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'met' if met else 'MISSED'} |" for name, met in data["targets"].items()]
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`benchmarks/report.py`) from the last run's results in",
        "`benchmarks/results/`. Every comparison is side by side in one run on one machine; these",
        "machines are shared, so read the ratios, not the absolute figures.",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu_model()}), no GPU, {platform.platform()}, "
        f"Python {platform.python_version()}. Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    for name, section in (
        ("train_throughput.json", training_section),
        ("serving_latency.json", serving_section),
    ):
        path = args.results / name
        if path.is_file():
            lines += section(json.loads(path.read_text()))
        else:
            lines += [f"({path} is missing: run `make bench` to produce it.)", ""]
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
