"""A shifted input stream, served by a real gunicorn gateway with sampling on, is reported by the drift
command; an in-distribution stream is not.

The gateway (2 workers, the session's exported model, GATEWAY_SAMPLE_RATE=1) serves, one after the
other: an in-distribution stream (fresh synthetic shapes, the classes the model was trained on),
a darkened stream (the same kind of images at a third of their brightness: a camera or pipeline
change) and a one-class stream (only circles: a change in what users ask about). For each stream,
`python -m serving.sampling drift --since T0 --until T1` compares the sampled requests with the
model's reference statistics (assets.extra/reference_stats.json of the export); the in-distribution
stream must pass, each shifted one must fail naming what moved. /metrics must count every image.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from loadtest.gateway_process import GatewayProcess, running_gateway, wait_until
from serving.drift import REFERENCE_FILE, reference_from_predictions
from serving.sampling import SampleStore
from tests.fixtures.exported import ExportedModel

pytestmark = [pytest.mark.drill, pytest.mark.slow]

IMAGES_PER_REQUEST = 8
STREAM_IMAGES = 240


@dataclass
class SampledGateway:
    gateway: GatewayProcess
    samples: Path
    sent: int = 0  # images answered so far


@pytest.fixture(scope="module")
def sampled_gateway(
    exported_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SampledGateway]:
    samples = tmp_path_factory.mktemp("drift-samples")
    env = {
        "GATEWAY_MODEL_BASE_PATH": str(exported_model.base_path),
        "GATEWAY_MODEL_NAME": exported_model.name,
        "GATEWAY_TFSERVING_ADDRESS": "",
        "GATEWAY_SAMPLE_RATE": "1",
        "GATEWAY_SAMPLE_DIR": str(samples),
    }
    with running_gateway(env, workers=2, log_dir=tmp_path_factory.mktemp("drift-log")) as gateway:
        yield SampledGateway(gateway, samples)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def serve(drill: SampledGateway, images: np.ndarray, tag: str) -> tuple[float, float, list[dict]]:
    """Post `images` in requests of 8; returns (start, end) Unix times bracketing their samples and
    the answers."""
    start = time.time()
    answers = []
    with requests.Session() as session:
        for i in range(0, len(images), IMAGES_PER_REQUEST):
            files = [("images", (f"{tag}-{j}.png", png(p), "image/png"))
                     for j, p in enumerate(images[i:i + IMAGES_PER_REQUEST])]  # fmt: skip
            headers = {"X-Request-ID": f"{tag}-{i // IMAGES_PER_REQUEST}"}
            r = session.post(f"{drill.gateway.url}/v1/predict", files=files, headers=headers, timeout=60)
            assert r.status_code == 200, r.text
            answers += r.json()["predictions"]
    end = time.time()
    drill.sent += len(images)

    def stored() -> bool:
        with SampleStore(drill.samples, create=False) as store:
            return store.count() >= drill.sent

    # The workers' sampler threads write shortly after each answer.
    wait_until(lambda: (drill.samples / "samples.sqlite3").is_file() and stored(), 30, "samples stored")
    return start, end + 0.001, answers


def drift(drill: SampledGateway, window: tuple[float, float], model_args: list[str]) -> tuple[int, str]:
    command = [sys.executable, "-m", "serving.sampling", "drift", "--dir", str(drill.samples),
               "--since", repr(window[0]), "--until", repr(window[1]), *model_args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def moved(out: str, name: str) -> bool:
    return any(line.strip().startswith(name) and "MOVED" in line for line in out.splitlines())


@pytest.fixture(scope="module")
def reference_args(
    sampled_gateway: SampledGateway, exported_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    """How the drift command finds the reference: the export's reference_stats.json. For a model
    exported before the export wrote one, the same statistics taken from the served model's answers
    on held-out images (what the export computes), passed with --reference."""
    if (exported_model.path / REFERENCE_FILE).is_file():
        return ["--model-dir", str(exported_model.path)]
    from trainer.data import synthetic

    held_out, _ = synthetic.generate(600, seed=31337)
    _, _, answers = serve(sampled_gateway, held_out, "reference")
    names = exported_model.class_names
    probabilities = np.array([[a["probabilities"][c] for c in names] for a in answers])
    stats = reference_from_predictions(probabilities, names, held_out)
    path = tmp_path_factory.mktemp("reference") / "reference_stats.json"
    path.write_text(json.dumps(stats))
    return ["--model-dir", str(exported_model.path), "--reference", str(path)]


def test_in_distribution_traffic_is_not_reported(
    sampled_gateway: SampledGateway, reference_args: list[str]
) -> None:
    from trainer.data import synthetic

    images, _ = synthetic.generate(STREAM_IMAGES, seed=2024)
    window = serve(sampled_gateway, images, "normal")[:2]
    rc, out = drift(sampled_gateway, window, reference_args)
    print(out)
    assert rc == 0, out
    assert f"drift: {STREAM_IMAGES} sampled image(s)" in out and "no drift found" in out


def test_darkened_traffic_is_reported(sampled_gateway: SampledGateway, reference_args: list[str]) -> None:
    from trainer.data import synthetic

    images, _ = synthetic.generate(STREAM_IMAGES, seed=2025)
    dark = (images.astype(np.float32) * 0.35).astype(np.uint8)
    window = serve(sampled_gateway, dark, "dark")[:2]
    rc, out = drift(sampled_gateway, window, reference_args)
    print(out)
    assert rc == 1, out
    assert moved(out, "pixel mean (reference)"), out
    assert out.strip().splitlines()[-1].startswith("DRIFT:")


def test_one_class_traffic_is_reported(sampled_gateway: SampledGateway, reference_args: list[str]) -> None:
    from trainer.data import synthetic

    images, labels = synthetic.generate(STREAM_IMAGES * 10, seed=2026)
    circles = images[labels == 0][:STREAM_IMAGES]
    window = serve(sampled_gateway, circles, "circles")[:2]
    rc, out = drift(sampled_gateway, window, reference_args)
    print(out)
    assert rc == 1, out
    assert moved(out, "class share"), out


def test_metrics_count_every_served_image(sampled_gateway: SampledGateway, reference_args: list[str]) -> None:
    # After the streams above (the module's tests run in order); on its own, one short stream.
    if sampled_gateway.sent == 0:
        from trainer.data import synthetic

        serve(sampled_gateway, synthetic.generate(16, seed=7)[0], "metrics")
    text = requests.get(f"{sampled_gateway.gateway.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    predicted = sum(s.value for s in families["gateway_predicted_class"].samples if s.name.endswith("_total"))
    assert predicted == sampled_gateway.sent
    confidence = [s for s in families["gateway_prediction_confidence"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in confidence) == sampled_gateway.sent
    written = sum(s.value for s in families["gateway_sample_records"].samples if s.name.endswith("_total"))
    assert written == sampled_gateway.sent
