"""Out-of-distribution answers (issue 17, item 2) from the gateway's side: `ood_score` and `abstain`
through both backends, /v1/predict, the page and the clients, on real SavedModels with and without
those outputs (tests/tfserving_double/tiny_model.py: a black or white image abstains, a grey one does
not), and `null` for a version exported before them, which the gateway must keep serving."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from contract.tensors import to_ndarray
from tests.tfserving_double.tiny_model import TINY_OOD_MAX, write_tiny_model

WITH_OOD = "trusty"  # exported with ood_score and abstain
OLD = "old"  # exported before them
# Pixel values of uniform test images and what the tiny model answers for them.
BLACK, GREY, WHITE = 0, 128, 255
EXPECTED_SCORE = {v: abs(v / 255 - 0.5) * 2 * TINY_OOD_MAX for v in (BLACK, GREY, WHITE)}
EXPECTED_ABSTAIN = {BLACK: True, GREY: False, WHITE: True}


def uniform(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, 32, 32, 3), value, np.uint8)


def png(value: int, size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def upload(*values: int) -> dict:
    return {"images": [(io.BytesIO(png(v)), f"{v}.png") for v in values]}


@pytest.fixture(scope="module")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ood-models")
    write_tiny_model(base, WITH_OOD, 1, seed=3, ood=True)
    write_tiny_model(base, OLD, 1, seed=3)
    return base


@pytest.fixture(scope="module")
def double(model_base: Path) -> Iterator[object]:
    from tests.tfserving_double import TFServingDouble

    with TFServingDouble(model_base) as server:
        yield server


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("ood-images")
    files = {}
    for value, name in ((BLACK, "black.png"), (GREY, "grey.png"), (WHITE, "white.png")):
        files[value] = folder / name
        files[value].write_bytes(png(value))
    return files


# -- the wire format ------------------------------------------------------------------------------


def test_abstain_decodes_from_both_forms_tf_serving_answers_in() -> None:
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3)])
    typed = tensor_pb2.TensorProto(dtype=types_pb2.DT_BOOL, tensor_shape=shape, bool_val=[True, False, True])
    packed = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_BOOL, tensor_shape=shape, tensor_content=np.array([1, 0, 1], np.bool_).tobytes()
    )
    for proto in (typed, packed):
        out = to_ndarray(tensor_pb2.TensorProto.FromString(proto.SerializeToString()))
        assert out.dtype == np.bool_ and out.tolist() == [True, False, True]


# -- backends -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_backend_returns_ood_score_and_abstain(model_base: Path) -> None:
    from serving.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(model_base, WITH_OOD, poll_interval_s=60)
    try:
        images = np.concatenate([uniform(BLACK), uniform(GREY, 2), uniform(WHITE)])
        prediction = backend.predict(images)
        assert prediction.ood_score.dtype == np.float32 and prediction.abstain.dtype == np.bool_
        expected = [EXPECTED_SCORE[v] for v in (BLACK, GREY, GREY, WHITE)]
        np.testing.assert_allclose(prediction.ood_score, expected, atol=1e-5)
        assert prediction.abstain.tolist() == [True, False, False, True]
        assert prediction.probabilities.shape == (4, 10)  # the label is still given
    finally:
        backend.close()


@pytest.mark.slow
def test_embedded_backend_serves_an_old_model_with_no_ood_fields(model_base: Path) -> None:
    from serving.backends.embedded import EmbeddedBackend

    backend = EmbeddedBackend(model_base, OLD, poll_interval_s=60)
    try:
        prediction = backend.predict(uniform(BLACK, 2))
        assert prediction.ood_score is None and prediction.abstain is None
        assert prediction.probabilities.shape == (2, 10)
    finally:
        backend.close()


@pytest.mark.slow
def test_requests_batched_together_each_get_their_own_rows(model_base: Path) -> None:
    """Concurrent requests share one model call (serving/batching.py); each must get back the ood
    outputs of its own images, not its neighbours'."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.backends.embedded import EmbeddedBackend
    from serving.batching import BatchingParameters

    # A 50 ms window gathers the requests; padding to 8 or 16 rows adds rows that must be cut off.
    batching = BatchingParameters(max_batch_size=16, batch_timeout_micros=50_000, allowed_batch_sizes=(8, 16))
    backend = EmbeddedBackend(model_base, WITH_OOD, poll_interval_s=60, batching=batching)
    try:
        values = [BLACK, GREY, WHITE, GREY, BLACK, GREY] * 3
        with ThreadPoolExecutor(len(values)) as pool:
            answers = list(pool.map(lambda v: backend.predict(uniform(v, 1 + v % 3)), values))
        for value, answer in zip(values, answers, strict=True):
            assert answer.abstain.tolist() == [EXPECTED_ABSTAIN[value]] * (1 + value % 3)
            np.testing.assert_allclose(answer.ood_score, EXPECTED_SCORE[value], atol=1e-5)
    finally:
        backend.close()


@pytest.mark.slow
def test_tfserving_backend_returns_the_same_fields_and_null_for_an_old_model(model_base, double) -> None:
    from serving.backends.embedded import EmbeddedBackend
    from serving.backends.tfserving import TFServingBackend

    images = np.concatenate([uniform(WHITE), uniform(GREY), uniform(BLACK)])
    embedded = EmbeddedBackend(model_base, WITH_OOD, poll_interval_s=60)
    remote = TFServingBackend(double.address, WITH_OOD, deadline_s=60)
    old = TFServingBackend(double.address, OLD, deadline_s=60)
    try:
        local, over_grpc = embedded.predict(images), remote.predict(images)
        assert over_grpc.ood_score.dtype == np.float32 and over_grpc.abstain.dtype == np.bool_
        np.testing.assert_allclose(over_grpc.ood_score, local.ood_score, atol=1e-6)
        assert over_grpc.abstain.tolist() == local.abstain.tolist() == [True, False, True]
        from_old = old.predict(images)
        assert from_old.ood_score is None and from_old.abstain is None
        assert from_old.probabilities.shape == (3, 10)
    finally:
        for backend in (embedded, remote, old):
            backend.close()


# -- /v1/predict ----------------------------------------------------------------------------------


def _check_trust_fields(body: dict, values: list[int]) -> None:
    for prediction, value in zip(body["predictions"], values, strict=True):
        assert prediction["abstain"] is EXPECTED_ABSTAIN[value]
        assert prediction["ood_score"] == pytest.approx(EXPECTED_SCORE[value], abs=1e-5)
        assert prediction["top_k"][0]["label"]  # abstaining still names the best guess


@pytest.mark.slow
def test_predict_responses_carry_ood_score_and_abstain_on_both_backends(model_base, double) -> None:
    from serving.app import create_app
    from serving.config import Settings
    from tests.fixtures.gateway import embedded_gateway

    values = [BLACK, GREY, WHITE]
    via_tfserving = create_app(Settings(tfserving_address=double.address, model_name=WITH_OOD))
    try:
        with embedded_gateway(model_base, WITH_OOD) as app:
            embedded = app.test_client().post("/v1/predict?top_k=2", data=upload(*values))
        remote = via_tfserving.test_client().post("/v1/predict?top_k=2", data=upload(*values))
    finally:
        via_tfserving.extensions["gateway.backend"].close()
    for response in (embedded, remote):
        assert response.status_code == 200, response.get_data(as_text=True)
        _check_trust_fields(response.get_json(), values)


@pytest.mark.slow
def test_an_old_model_answers_with_null_ood_fields(model_base) -> None:
    from tests.fixtures.gateway import embedded_gateway

    with embedded_gateway(model_base, OLD) as app:
        response = app.test_client().post("/v1/predict", data=upload(BLACK, GREY))
    assert response.status_code == 200
    for prediction in response.get_json()["predictions"]:
        # Present and null: "this model cannot say", not "sure".
        assert "ood_score" in prediction and prediction["ood_score"] is None
        assert "abstain" in prediction and prediction["abstain"] is None


@pytest.mark.slow
def test_answered_predictions_reach_the_drift_metrics(model_base) -> None:
    """/v1/predict hands each answer to serving/drift_metrics.py: abstentions show in /metrics."""
    from tests.fixtures.gateway import embedded_gateway
    from tests.fixtures.metrics import sample_values

    def abstained(client) -> float:  # the counter for version 1, 0 before any observation
        text = client.get("/metrics").get_data(as_text=True)
        return sum(sample_values(text, "gateway_abstained_total", version="1"))

    with embedded_gateway(model_base, WITH_OOD) as app:
        client = app.test_client()
        before = abstained(client)
        assert client.post("/v1/predict", data=upload(BLACK, GREY, WHITE)).status_code == 200
        assert abstained(client) == before + 2
        assert client.post("/v1/predict?top_k=99", data=upload(BLACK)).status_code == 400
        assert abstained(client) == before + 2  # a refused request is not an answer


@pytest.mark.slow
def test_the_openapi_document_describes_the_fields(model_base) -> None:
    from tests.fixtures.gateway import embedded_gateway

    with embedded_gateway(model_base, OLD) as app:
        spec = app.test_client().get("/v1/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    for item in (
        schemas["PredictResponse"]["properties"]["predictions"]["items"],
        schemas["ExplainResponse"]["properties"]["explanations"]["items"],
    ):
        assert {"ood_score", "abstain"} <= set(item["required"])
        assert item["properties"]["ood_score"]["type"] == "number"
        assert item["properties"]["abstain"]["type"] == "boolean"
        assert item["properties"]["abstain"]["nullable"] and item["properties"]["ood_score"]["nullable"]


# -- clients --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_http_client_exposes_ood_score_and_abstain(model_base, image_files) -> None:
    from client.http import HTTPClient
    from tests.fixtures.gateway import embedded_gateway, serve_in_thread

    paths = [image_files[v] for v in (BLACK, GREY)]
    with embedded_gateway(model_base, WITH_OOD) as app, serve_in_thread(app) as url:
        with HTTPClient(url) as client:
            black, grey = client.predict(paths, top_k=1).images
    assert black.abstain is True and black.not_sure and black.label
    assert black.ood_score == pytest.approx(EXPECTED_SCORE[BLACK], abs=1e-5)
    assert grey.abstain is False and not grey.not_sure
    assert black.to_dict()["abstain"] is True and grey.to_dict()["ood_score"] == grey.ood_score
    with embedded_gateway(model_base, OLD) as app, serve_in_thread(app) as url:
        with HTTPClient(url) as client:
            (old,) = client.predict(paths[:1], top_k=1).images
    assert old.ood_score is None and old.abstain is None and not old.not_sure


@pytest.mark.slow
def test_grpc_client_exposes_ood_score_and_abstain(double, image_files) -> None:
    from client.grpc import GRPCClient

    paths = [image_files[v] for v in (WHITE, GREY)]
    for use_bytes in (False, True):
        with GRPCClient(double.address, WITH_OOD) as client:
            white, grey = client.predict(paths, top_k=1, use_bytes=use_bytes).images
        assert white.abstain is True and grey.abstain is False
        assert white.ood_score == pytest.approx(EXPECTED_SCORE[WHITE], abs=1e-3)
        with GRPCClient(double.address, OLD) as client:
            (old,) = client.predict(paths[:1], top_k=1, use_bytes=use_bytes).images
        assert old.ood_score is None and old.abstain is None and old.label


@pytest.mark.slow
def test_cli_table_says_not_sure(model_base, double, image_files, capsys) -> None:
    from client.cli import main
    from tests.fixtures.gateway import embedded_gateway, serve_in_thread

    paths = [str(image_files[v]) for v in (BLACK, GREY)]
    with embedded_gateway(model_base, WITH_OOD) as app, serve_in_thread(app) as url:
        assert main(["predict", *paths, "--url", url, "--top-k", "1"]) == 0
    via_gateway = capsys.readouterr().out.splitlines()
    assert main(["predict", *paths, "--grpc", double.address, "--model", WITH_OOD, "--top-k", "1"]) == 0
    via_grpc = capsys.readouterr().out.splitlines()
    for lines in (via_gateway, via_grpc):
        assert "SURE" in lines[1]
        black, grey = lines[2:]
        assert black.startswith("black.png") and "not sure" in black and "%" in black
        assert grey.startswith("grey.png") and "not sure" not in grey
    assert main(["predict", paths[0], "--grpc", double.address, "--model", OLD]) == 0
    old = capsys.readouterr().out.splitlines()
    assert "SURE" not in old[1] and "not sure" not in old[2]


# -- the page, in a real browser ------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_shows_not_sure_for_an_abstained_image(model_base, image_files) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.fixtures.gateway import embedded_gateway, serve_in_thread
    from tests.serving.test_page import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent; install Debian's chromium package")
    with (
        embedded_gateway(model_base, WITH_OOD) as app,
        serve_in_thread(app) as url,
        embedded_gateway(model_base, OLD) as old_app,
        serve_in_thread(old_app) as old_url,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.set_input_files("#file-input", [str(image_files[BLACK]), str(image_files[GREY])])
            cards = page.locator(".result")
            expect(cards).to_have_count(2, timeout=20_000)
            black, grey = cards.nth(0), cards.nth(1)
            # A visible badge in words, and the label kept as a best guess.
            badge = black.locator(".not-sure")
            expect(badge).to_be_visible()
            expect(badge.locator(".badge")).to_have_text("Not sure")
            expect(badge).to_contain_text("best guess")
            expect(black.locator("h2")).to_contain_text("black.png: not sure (best guess ")
            assert badge.evaluate("e => getComputedStyle(e).display") != "none"
            expect(grey.locator(".not-sure")).to_have_count(0)
            expect(grey.locator("h2")).not_to_contain_text("not sure")
            expect(grey.locator(".bar-row")).to_have_count(10)
            # A model exported without the outputs: no badge, whatever the image.
            page.goto(old_url)
            page.set_input_files("#file-input", str(image_files[BLACK]))
            expect(page.locator(".result")).to_have_count(1, timeout=20_000)
            expect(page.locator(".result .not-sure")).to_have_count(0)
        finally:
            browser.close()


# -- the trainer's real export ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_real_export_answers_the_same_trust_fields_on_every_path(
    gateway_app, tfserving_double, exported_model, cifar_sample
) -> None:
    """The session's trained and exported model (trainer/export): /v1/predict through the embedded
    backend and through TF Serving, and /v1/explain, give each image the same ood_score and abstain,
    and abstain is ood_score over the threshold its model card states."""
    import json

    from serving.app import create_app
    from serving.config import Settings

    paths = [path for path, _ in cifar_sample[:6]]

    def post(app, route: str) -> list[dict]:
        data = {"images": [(io.BytesIO(p.read_bytes()), p.name) for p in paths]}
        response = app.test_client().post(route, data=data)
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        return body.get("predictions") or body["explanations"]

    via_tfserving = create_app(
        Settings(tfserving_address=tfserving_double.address, model_name=exported_model.name, deadline_s=60)
    )
    try:
        answers = {
            "embedded": post(gateway_app, "/v1/predict"),
            "tfserving": post(via_tfserving, "/v1/predict"),
            "explain": post(gateway_app, "/v1/explain?top_k=1"),
        }
    finally:
        via_tfserving.extensions["gateway.backend"].close()
    card = json.loads((exported_model.path / "assets.extra" / "model_card.json").read_text())
    threshold = card["ood"]["threshold"]
    reference = answers["embedded"]
    for name, items in answers.items():
        for item, expected in zip(items, reference, strict=True):
            assert isinstance(item["ood_score"], float) and isinstance(item["abstain"], bool), name
            assert item["ood_score"] == pytest.approx(expected["ood_score"], rel=1e-4, abs=1e-4), name
            if abs(item["ood_score"] - threshold) > 1e-5 * max(1.0, abs(threshold)):  # float32 vs JSON
                assert item["abstain"] == (item["ood_score"] > threshold), name
