"""benchmarks/serving_latency.py measures the bare model on both embedded runtimes and takes the faster."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import serving_latency as bench
from tests.tfserving_double.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # saves, loads and converts a SavedModel


def test_the_bare_limit_is_the_faster_of_tensorflow_and_litert(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path, "cifar10", 1, ood=True)
    bare = bench.measure_bare_model(path, 0.05)
    runtimes = {summary["runtime"]: summary for summary in bare["runtimes"]}
    assert set(runtimes) == {"tensorflow", "litert"}
    for summary in runtimes.values():
        assert [row["batch"] for row in summary["batches"]] == list(bench.BARE_BATCHES)
        assert all(row["calls"] > 0 and row["cpu_ms_per_image"] > 0 for row in summary["batches"])
    fastest = max(runtimes.values(), key=lambda summary: summary["batched_images_per_s"])
    assert bare["runtime"] == fastest["runtime"]
    assert bare["batched_images_per_s"] == fastest["batched_images_per_s"]
    assert bare["batch1_ms"] == fastest["batch1_ms"]


def test_litserve_runs_the_runtime_the_gateway_gives_one_image_requests() -> None:
    """LitServe is started with this (its --runtime has no "auto")."""
    from benchmarks.serving_latency import gateway_runtime_at

    chose_tf = ["batches of 16+ images run on TensorFlow (a batch of 32: TensorFlow 5.0 ms of CPU, "
                "LiteRT 9.0 ms)"]
    for runtime, want in (("auto", "litert"), ("litert", "litert"), ("tensorflow", "tensorflow")):
        results = {"settings": {"gateway_runtime": runtime}, "gateway_large_batches": chose_tf}
        assert gateway_runtime_at(results, 1) == want
