"""The training image's entrypoint, run for real on this machine with the real trainer: a tiny
synthetic training goes through train -> evaluate -> export and lands as version 1 of the model base,
the layout TensorFlow Serving polls. (The argv-level checks for each deployment's environment are in
test_cli_contract.py; this proves the script drives the real CLI end to end.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import manifests

TINY_PROFILE = """\
data: {num_train: 300, num_test: 100, val_fraction: 0.1}
model: {arch: bn_cnn, width: 8, dropout: 0.0}
train: {epochs: 1, batch_size: 64, tensorboard: false, verbose: 0}
"""


@pytest.mark.slow
def test_entrypoint_trains_evaluates_and_publishes_version_1(tmp_path: Path) -> None:
    profile = tmp_path / "tiny.yaml"
    profile.write_text(TINY_PROFILE)
    run_dir, model_base = tmp_path / "runs" / "job-1", tmp_path / "models"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "RUN_DIR": str(run_dir),
        "MODEL_BASE": str(model_base),
        "MODEL_NAME": "cifar10",
        "TRAIN_DATASET": "synthetic",
        "TRAIN_CONFIG": str(profile),
        "EXPORT_MIN_ACCURACY": "0.0",
        "EXPORT_KEEP": "3",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    proc = subprocess.run(
        ["bash", str(manifests.ENTRYPOINT)], env=env, cwd=manifests.ROOT, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert (run_dir / "checkpoints").is_dir(), "training must leave checkpoints on the volume to resume from"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    # Hidden entries (the version high-water mark) are invisible to TF Serving; versions are the rest.
    versions = sorted(p.name for p in (model_base / "cifar10").iterdir() if not p.name.startswith("."))
    assert versions == ["1"], versions
    assert (model_base / "cifar10" / "1" / "saved_model.pb").is_file()
    # export prints the published path last: the Job log says which version went out.
    assert proc.stdout.strip().splitlines()[-1].endswith(str(Path("cifar10") / "1"))
