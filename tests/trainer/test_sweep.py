"""`sweep`: one parameter over several values, a summary table and plot, re-runnable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures.training import tiny_config
from trainer.config import ConfigError
from trainer.sweep import parse_values, sweep


def test_bad_parameter_or_values_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.dropuot"):
        sweep(tiny_config(), "model.dropuot", ["0.1"], tmp_path / "s", log=lambda _m: None)
    with pytest.raises(ConfigError, match="model.dropout must be in"):
        sweep(tiny_config(), "model.dropout", ["0.1", "1.2"], tmp_path / "s", log=lambda _m: None)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_values(" , ")
    assert parse_values("0.0, 0.5,0.9") == ["0.0", "0.5", "0.9"]


@pytest.mark.slow
def test_dropout_sweep_writes_summary_and_is_rerunnable(tmp_path: Path) -> None:
    base = tiny_config(
        data={"num_train": 200, "num_test": 50}, model={"width": 4}, train={"epochs": 1, "batch_size": 50}
    )
    out = tmp_path / "sweep"
    rows = sweep(base, "model.dropout", ["0.0", "0.5"], out, log=lambda _m: None)
    assert [r["value"] for r in rows] == ["0.0", "0.5"]
    for row in rows:
        run = out / f"model.dropout={row['value']}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
        assert json.loads((run / "config.json").read_text())["model"]["dropout"] == float(row["value"])
    with (out / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["value"] for t in table] == ["0.0", "0.5"]
    assert float(table[1]["test_accuracy"]) == pytest.approx(rows[1]["test_accuracy"])
    md = (out / "summary.md").read_text()
    assert "| model.dropout |" in md and md.count("\n| 0.") == 2
    with Image.open(out / "sweep.png") as img:
        assert img.format == "PNG" and img.width > 300

    # Re-running keeps finished runs (no retraining) and rebuilds the same table.
    stamp = (out / "model.dropout=0.0" / "model.keras").stat().st_mtime_ns
    again = sweep(base, "model.dropout", ["0.0", "0.5"], out, log=lambda _m: None)
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]
    assert (out / "model.dropout=0.0" / "model.keras").stat().st_mtime_ns == stamp
