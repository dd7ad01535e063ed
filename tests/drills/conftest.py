"""Gateways for the fault drills, started once for tests/drills/ and shared by the drills of one kind
(package scope: stopped when the drills are done, so their memory is not held through the rest of a run).

* `embedded_gateway`: gunicorn, 2 workers, embedded model read from a model base this session owns
  (a copy of `exported_model`), polled every 0.3 s so a publish shows within a second. Drills may
  add versions to it (always above the highest one), kill its workers and measure its memory.
* `tfserving_gateway`: gunicorn, 2 workers, backed by the TF Serving test double running in this
  process, so a drill can take the double down or make it slow; each drill restores it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from loadtest.gateway_process import GatewayProcess, running_gateway, wait_until
from tests.fixtures.exported import ExportedModel

POLL_INTERVAL_S = 0.3
DEADLINE_S = 1.5


@dataclass
class EmbeddedDrillGateway:
    gateway: GatewayProcess
    model_dir: Path  # MODEL_BASE/<name>: drills publish (or break) versions here
    run_dir: Path  # a run directory trainer.export.publish can publish as the next version

    @property
    def url(self) -> str:
        return self.gateway.url


@dataclass
class TFServingDrillGateway:
    gateway: GatewayProcess
    double: object  # tests.tfserving_double.TFServingDouble

    @property
    def url(self) -> str:
        return self.gateway.url


def copy_model_base(exported_model: ExportedModel, target: Path) -> Path:
    """A private MODEL_BASE holding the exported version as version 1; returns MODEL_BASE/<name>."""
    model_dir = target / exported_model.name
    model_dir.mkdir(parents=True)
    shutil.copytree(exported_model.path, model_dir / "1")
    return model_dir


@pytest.fixture(scope="package")
def embedded_gateway(
    exported_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedDrillGateway]:
    base = tmp_path_factory.mktemp("drill-embedded-base")
    model_dir = copy_model_base(exported_model, base)
    env = {
        "GATEWAY_MODEL_BASE_PATH": str(base),
        "GATEWAY_MODEL_NAME": exported_model.name,
        "GATEWAY_TFSERVING_ADDRESS": "",
        "GATEWAY_POLL_INTERVAL_S": str(POLL_INTERVAL_S),
    }
    with running_gateway(env, workers=2, log_dir=tmp_path_factory.mktemp("drill-embedded-log")) as gateway:
        yield EmbeddedDrillGateway(gateway, model_dir, exported_model.run_dir)


@pytest.fixture(scope="package")
def tfserving_gateway(
    exported_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TFServingDrillGateway]:
    from tests.tfserving_double import TFServingDouble

    base = tmp_path_factory.mktemp("drill-tfserving-base")
    copy_model_base(exported_model, base)
    with TFServingDouble(base, poll_interval_s=0.5) as double:
        env = {
            "GATEWAY_MODEL_NAME": exported_model.name,
            "GATEWAY_TFSERVING_ADDRESS": double.address,
            "GATEWAY_DEADLINE_S": str(DEADLINE_S),
        }
        log_dir = tmp_path_factory.mktemp("drill-tfserving-log")
        with running_gateway(env, workers=2, log_dir=log_dir) as gateway:
            yield TFServingDrillGateway(gateway, double)


@pytest.fixture
def healthy_double(tfserving_gateway: TFServingDrillGateway) -> Iterator[TFServingDrillGateway]:
    """The TF Serving gateway with its double up and fast before and after each drill."""
    tfserving_gateway.double.set_delay(0.0)
    tfserving_gateway.double.set_down(False)
    _wait_until_predictions_flow(tfserving_gateway.url)
    yield tfserving_gateway
    tfserving_gateway.double.set_delay(0.0)
    tfserving_gateway.double.set_down(False)
    _wait_until_predictions_flow(tfserving_gateway.url)


def _wait_until_predictions_flow(url: str) -> None:
    """A drill that stopped the double leaves a worker's circuit breaker open for its interval: the
    next drill starts once predictions answer 200 again (every connection new, so both workers) and
    no worker's breaker is still open."""
    from tests.drills.traffic import breaker_state, predict_once, small_png

    image = small_png(0)

    def ten_in_a_row() -> bool:
        with requests.Session() as session:
            ok = all(predict_once(session, url, image, fresh=True).status == 200 for _ in range(10))
        return ok and breaker_state(url) in (0, None)

    wait_until(ten_in_a_row, 30, "the gateway answering predictions after the drill, every breaker closed")
