"""`make serve`'s script on an empty machine state: train, export, start the gateway, answer a photo;
and on a second start, serve what is published without training again."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.fixtures.gateway import free_port

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = """
data: {num_train: 400, num_test: 100}
model: {arch: bn_cnn, width: 8}
train: {epochs: 1, batch_size: 32, tensorboard: false}
"""


def start(tmp_path: Path, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PY": sys.executable,
        "RUN_DIR": str(tmp_path / "run"),
        "MODEL_BASE": str(tmp_path / "models"),
        "PORT": str(port),
        "DATASET": "synthetic",
        "TRAIN_CONFIG": str(tmp_path / "tiny.yaml"),
        "WORKERS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    (tmp_path / "metrics").mkdir(exist_ok=True)
    return subprocess.Popen(
        ["bash", "scripts/serve.sh"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve.sh exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_serve_trains_exports_and_serves_then_reuses_the_published_model(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    process = start(tmp_path, port, log)
    try:
        wait_ready(process, url, log)
        photo = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(photo, "PNG")
        files = {"images": ("red.png", photo.getvalue())}
        answer = requests.post(f"{url}/v1/predict", files=files, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == {"name": "cifar10", "version": 1}
    finally:
        stop(process)
    output = log.read_text()
    # Each step says what it does and how long it took.
    assert "==> train (synthetic" in output and "==> export" in output and "==> start the gateway" in output
    assert output.count("    done: ") == 2
    assert (tmp_path / "models" / "cifar10" / "1" / "saved_model.pb").is_file()

    # Second start: the published version is served as it is, no training.
    log2 = tmp_path / "serve2.log"
    process = start(tmp_path, port, log2)
    try:
        wait_ready(process, url, log2)
    finally:
        stop(process)
    output = log2.read_text()
    assert "version 1 is already published" in output and "==> train" not in output
    assert sorted(p.name for p in (tmp_path / "models" / "cifar10").iterdir() if p.name.isdigit()) == ["1"]
