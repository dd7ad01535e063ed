"""Run one config parameter over a list of values (the seeds' dropout sweep 0.0..0.9, made
automatic): one full training run per value under SWEEP_DIR/<param>=<value>/, then
summary.csv, summary.md and sweep.png comparing test and best validation accuracy.

A sweep is re-runnable: finished runs are kept, interrupted ones resume from their checkpoint.
Its runs can also be spread over separate processes or pods (k8s/training-sweep/, an Indexed Job):
`index` trains only values[index]; each run leaves its summary row in its run directory (ROW_FILE),
and the summary is rebuilt from every finished run's row under a file lock, so whichever run ends
last writes the complete table.
"""

from __future__ import annotations

import csv
import fcntl
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
ROW_FILE = "sweep_row.json"  # in each run directory: its summary row, what merge_summary reads
LOCK_FILE = ".summary.lock"  # in the sweep directory: one summary writer at a time


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


def merge_summary(sweep_dir: str | Path, param: str, values: Sequence[str]) -> list[dict[str, Any]]:
    """Rebuild summary.csv/.md/.png from the rows the finished runs of `values` left in their run
    directories (in the order of `values`; unfinished runs are left out). Takes an exclusive lock on
    the sweep directory, so runs ending at the same time in separate pods do not interleave: each
    writes its row before locking, so the last one to lock sees every row."""
    sweep_dir = Path(sweep_dir)
    with open(sweep_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        rows = []
        for value in values:
            row_file = sweep_dir / f"{param}={value}" / ROW_FILE
            if row_file.is_file():
                rows.append(json.loads(row_file.read_text()))
        if rows:
            write_summary(sweep_dir, param, rows)
    return rows


def sweep(
    base: Config,
    param: str,
    values: Sequence[str],
    sweep_dir: str | Path,
    *,
    index: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train `base` with `param` set to each of `values` (or only to values[index]); returns the
    summary rows (with `index`: those of every finished run of the sweep, merged)."""
    sweep_dir = Path(sweep_dir)
    if index is not None and not 0 <= index < len(values):
        raise config_mod.ConfigError(
            f"--index {index} is outside the {len(values)} values {list(values)}: an Indexed Job's "
            f"completions must equal the number of values"
        )
    # Fail on a bad parameter or value before any training starts.
    configs = [config_mod.apply_overrides(base, [f"{param}={v}"]) for v in values]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, (value, cfg) in enumerate(zip(values, configs, strict=True)):
        if index is not None and i != index:
            continue
        run_dir = sweep_dir / f"{param}={value}"
        log(f"=== sweep {param}={value} -> {run_dir}")
        started = time.perf_counter()
        result = train(cfg, run_dir, resume=True, log=log)
        metrics = result.metrics
        if metrics is None and (run_dir / ROW_FILE).is_file():
            row = json.loads((run_dir / ROW_FILE).read_text())  # finished earlier: its row, its time
        else:
            if metrics is None:  # finished earlier, before rows were kept: read what it wrote
                metrics = json.loads((run_dir / METRICS_FILE).read_text())
            row = {
                "value": value,
                "test_accuracy": float(metrics["test_accuracy"]),
                "test_loss": float(metrics["test_loss"]),
                "best_val_accuracy": float(result.best_val_accuracy),
                "best_epoch": int(result.best_epoch),
                "seconds": round(time.perf_counter() - started, 1),
                "run_dir": run_dir.name,
            }
            config_mod.write_json_atomic(run_dir / ROW_FILE, row)
        rows.append(row)
        if index is None:
            write_summary(sweep_dir, param, rows)  # after every run, so a killed sweep keeps its table
    if index is not None:
        rows = merge_summary(sweep_dir, param, values)
    log(f"sweep summary: {sweep_dir / 'summary.md'}")
    return rows
