"""Run one config parameter over a list of values (the seeds' dropout sweep 0.0..0.9, made
automatic): one full training run per value under SWEEP_DIR/<param>=<value>/, then
summary.csv, summary.md and sweep.png comparing test and best validation accuracy.

A sweep is re-runnable: finished runs are kept, interrupted ones resume from their checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainer import config as config_mod
from trainer.config import Config
from trainer.reports import plt, save_figure
from trainer.run_files import METRICS_FILE
from trainer.train import train

COLUMNS = ("value", "test_accuracy", "test_loss", "best_val_accuracy", "best_epoch", "seconds", "run_dir")


def parse_values(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise config_mod.ConfigError(f"--values needs a comma-separated list (e.g. 0.0,0.1), got {text!r}")
    return values


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_summary(sweep_dir: Path, param: str, rows: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    _write_text_atomic(sweep_dir / "summary.csv", buf.getvalue())

    best = max(rows, key=lambda r: r["test_accuracy"])
    lines = [
        f"# Sweep of `{param}`",
        "",
        f"Best: `{param}={best['value']}` with test accuracy {best['test_accuracy']:.4f}.",
        "",
        f"| {param} | test accuracy | test loss | best val accuracy | best epoch | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['value']} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | "
            f"{r['best_val_accuracy']:.4f} | {r['best_epoch']} | {r['seconds']:.1f} |"
        )
    _write_text_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    plot(sweep_dir / "sweep.png", param, rows)


def plot(path: Path, param: str, rows: Sequence[dict[str, Any]]) -> Path:
    labels = [str(r["value"]) for r in rows]
    try:
        xs: list[Any] = [float(v) for v in labels]
    except ValueError:
        xs = list(range(len(labels)))  # categorical values (e.g. architectures)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [r["test_accuracy"] for r in rows], "-o", label="test accuracy")
    ax.plot(xs, [r["best_val_accuracy"] for r in rows], "--s", label="best validation accuracy")
    ax.set_xticks(xs, labels=labels)
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Sweep of {param}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def sweep(
    base: Config,
    param: str,
    values: Sequence[str],
    sweep_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train `base` with `param` set to each of `values`; returns the summary rows."""
    sweep_dir = Path(sweep_dir)
    # Fail on a bad parameter or value before any training starts.
    configs = [config_mod.apply_overrides(base, [f"{param}={v}"]) for v in values]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for value, cfg in zip(values, configs, strict=True):
        run_dir = sweep_dir / f"{param}={value}"
        log(f"=== sweep {param}={value} -> {run_dir}")
        started = time.perf_counter()
        result = train(cfg, run_dir, resume=True, log=log)
        metrics = result.metrics
        if metrics is None:  # finished earlier: read what it wrote
            metrics = json.loads((run_dir / METRICS_FILE).read_text())
        rows.append({
            "value": value,
            "test_accuracy": float(metrics["test_accuracy"]),
            "test_loss": float(metrics["test_loss"]),
            "best_val_accuracy": float(result.best_val_accuracy),
            "best_epoch": int(result.best_epoch),
            "seconds": round(time.perf_counter() - started, 1),
            "run_dir": run_dir.name,
        })
        write_summary(sweep_dir, param, rows)  # after every run, so a killed sweep keeps its table
    log(f"sweep summary: {sweep_dir / 'summary.md'}")
    return rows
