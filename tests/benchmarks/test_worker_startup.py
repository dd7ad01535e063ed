"""benchmarks/worker_startup.py times real gunicorn starts and tells conversions from cache reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.worker_startup import measure_startup
from tests.tfserving_double.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # three gunicorn starts


def test_off_cold_and_warm_starts_are_told_apart(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "base", "cifar10", 1, ood=True)
    env = {"GATEWAY_MODEL_BASE_PATH": str(tmp_path / "base"), "GATEWAY_MODEL_NAME": "cifar10",
           "GATEWAY_TFSERVING_ADDRESS": ""}  # fmt: skip
    startup = measure_startup(env, 1, tmp_path / "work")
    cases = {case["cache"]: case for case in startup["cases"]}
    assert list(cases) == ["off", "cold", "warm"]
    assert (cases["off"]["converted"], cases["off"]["from_cache"]) == (1, 0)
    assert (cases["cold"]["converted"], cases["cold"]["from_cache"]) == (1, 0)
    assert (cases["warm"]["converted"], cases["warm"]["from_cache"]) == (0, 1)  # the restart read it
    for case in cases.values():
        assert case["seconds"] > 0 and len(case["worker_rss_mib"]) == 1 and case["worker_rss_mib"][0] > 50
        assert len(case["load_s"]) == 1
