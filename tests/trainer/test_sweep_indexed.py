"""`sweep --index`: the runs of one sweep spread over separate processes (the pods of the Indexed Job
in k8s/training-sweep/), each training one value, and the summary merged from their run directories."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.training import tiny_config
from trainer.config import ConfigError, load
from trainer.sweep import ROW_FILE, sweep

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_an_index_outside_the_values_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="completions must equal the number of values"):
        sweep(tiny_config(), "train.seed", ["0", "1"], tmp_path / "s", index=2, log=lambda _m: None)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_separate_processes_each_train_one_index_and_the_summary_merges_them(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    tiny_config(data={"num_train": 300, "num_test": 100}, train={"epochs": 1}).save(config)
    sweep_dir = tmp_path / "sweep"

    def pod(index: int) -> subprocess.Popen[str]:
        argv = ["-m", "trainer", "sweep", "--config", str(config), "--param", "train.seed",
                "--values", "0,1", "--index", str(index), "--run-dir", str(sweep_dir)]  # fmt: skip
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
        return subprocess.Popen([sys.executable, *argv], cwd=PROJECT_ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip

    # Both at once, as the Job's pods run: they write one sweep directory and one summary.
    pods = [pod(0), pod(1)]
    for p in pods:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]

    for seed in (0, 1):
        run_dir = sweep_dir / f"train.seed={seed}"
        assert (run_dir / "metrics.json").is_file(), f"index {seed} trained nothing"
        assert json.loads((run_dir / ROW_FILE).read_text())["value"] == str(seed)
        assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == seed
    with open(sweep_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["value"] for r in rows] == ["0", "1"], "the last process to finish merges every run"
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert "| 0 |" in (sweep_dir / "summary.md").read_text() and (sweep_dir / "sweep.png").is_file()

    # A finished index run again only re-merges: its run is kept, the summary rebuilt from the rows.
    (sweep_dir / "summary.csv").unlink()
    row_file = sweep_dir / "train.seed=1" / ROW_FILE
    recorded = json.loads(row_file.read_text())
    rows = sweep(load(config), "train.seed", ["0", "1"], sweep_dir, index=1, log=lambda _m: None)
    assert [r["value"] for r in rows] == ["0", "1"] and (sweep_dir / "summary.csv").is_file()
    assert json.loads(row_file.read_text()) == recorded == rows[1], "the run's own row (and time) is kept"
