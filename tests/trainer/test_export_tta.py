"""`export --tta flip`: every signature answers the mean over the image and its mirror; off by default."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.exported import CIFAR10_CLASSES, write_tiny_run_dir
from tests.tfserving_session import TFServingSession

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Export:
    base: Path
    path: Path
    session: TFServingSession


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The tiny untrained CNN: a conv block (so explain is exported) and no mirror symmetry.
    return write_tiny_run_dir(tmp_path_factory.mktemp("tta-run") / "run")


@pytest.fixture(scope="module")
def keras_model(run_dir: Path):
    import keras

    return keras.saving.load_model(run_dir / "model.keras", compile=False)


def _publish_through_cli(run_dir: Path, base: Path, *flags: str) -> Path:
    from trainer.export import cli

    assert cli.main(["--run-dir", str(run_dir), "--model-base", str(base), *flags]) == 0
    return base / "cifar10" / "1"


@pytest.fixture(scope="module")
def flip_export(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Export]:
    base = tmp_path_factory.mktemp("tta-flip")
    path = _publish_through_cli(run_dir, base, "--tta", "flip")  # publish() runs verify_export with flip
    with TFServingSession.load(path) as session:
        yield Export(base, path, session)


@pytest.fixture(scope="module")
def plain_export(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Export]:
    base = tmp_path_factory.mktemp("tta-none")
    path = _publish_through_cli(run_dir, base)
    with TFServingSession.load(path) as session:
        yield Export(base, path, session)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Random pixels: no image here equals its own mirror."""
    return np.random.default_rng(11).integers(0, 256, size=(6, 32, 32, 3)).astype(np.float32)


def _keras(model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(np.ascontiguousarray(images), training=False), dtype=np.float32)


def _png_batch(pixels: np.ndarray) -> np.ndarray:
    encoded = []
    for image in pixels.astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return np.array(encoded, dtype=object)


def test_flip_export_answers_the_mean_of_the_image_and_its_mirror(flip_export, keras_model, pixels):
    single = _keras(keras_model, pixels)
    expected = (single + _keras(keras_model, pixels[:, :, ::-1, :])) / 2
    out = flip_export.session.run("serving_default", {"images": pixels})
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5, rtol=0)
    # The mirror really was averaged in: the single view answers differently.
    assert np.max(np.abs(out["probabilities"] - single)) > 1e-3
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert [c.decode() for c in out["classes"][0]] == list(CIFAR10_CLASSES)


def test_flip_export_bytes_signature_mirrors_the_decoded_image(flip_export, pixels):
    """A lossless 32x32 PNG decodes to the same pixels, so serving_bytes must average like serving_default."""
    from_bytes = flip_export.session.run("serving_bytes", {"image_bytes": _png_batch(pixels)})
    from_pixels = flip_export.session.run("serving_default", {"images": pixels})
    np.testing.assert_allclose(from_bytes["probabilities"], from_pixels["probabilities"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(from_bytes["classes"], from_pixels["classes"])


def test_flip_export_explain_scores_like_serving_default_and_explains_the_image_as_given(
    flip_export, plain_export, pixels
):
    count = len(pixels)
    served = flip_export.session.run("serving_default", {"images": pixels})["probabilities"]
    top = flip_export.session.run("explain", {"images": pixels, "class_index": np.full(count, -1, np.int32)})
    np.testing.assert_allclose(top["probabilities"], served, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(top["explained_class"], served.argmax(axis=1))
    from_bytes = flip_export.session.run(
        "explain_bytes", {"image_bytes": _png_batch(pixels), "class_index": np.full(count, -1, np.int32)}
    )
    np.testing.assert_allclose(from_bytes["probabilities"], served, atol=1e-5, rtol=0)
    # For a given class the heatmap is the single view's: the same as the plain export's.
    chosen = np.arange(count, dtype=np.int32) % len(served[0])
    flip_map = flip_export.session.run("explain", {"images": pixels, "class_index": chosen})["heatmap"]
    plain_map = plain_export.session.run("explain", {"images": pixels, "class_index": chosen})["heatmap"]
    np.testing.assert_allclose(flip_map, plain_map, atol=1e-5, rtol=0)


def test_default_export_is_the_single_view(plain_export, keras_model, pixels):
    out = plain_export.session.run("serving_default", {"images": pixels})
    np.testing.assert_allclose(out["probabilities"], _keras(keras_model, pixels), atol=1e-5, rtol=0)
    explain = plain_export.session.run(
        "explain", {"images": pixels, "class_index": np.full(len(pixels), -1, np.int32)}
    )
    np.testing.assert_allclose(explain["probabilities"], out["probabilities"], atol=1e-5, rtol=0)


def test_model_card_and_gateway_summary_say_which(flip_export, plain_export):
    from serving.model_card import card_summary
    from trainer.export.model_card import read_model_card

    flip_card, plain_card = read_model_card(flip_export.path), read_model_card(plain_export.path)
    assert flip_card["test_time_augmentation"] == "flip" and flip_card["model_evaluations_per_image"] == 2
    assert plain_card["test_time_augmentation"] == "none" and plain_card["model_evaluations_per_image"] == 1
    meaning = flip_card["input_contract"]["outputs"]["probabilities"]["meaning"]
    assert "mirror" in meaning and "twice the model's compute" in meaning
    assert plain_card["input_contract"]["outputs"]["probabilities"]["meaning"] == (
        "softmax of logits / calibration.temperature"
    )
    assert card_summary(flip_export.base, "cifar10", 1)["test_time_augmentation"] == "flip"
    assert card_summary(plain_export.base, "cifar10", 1)["test_time_augmentation"] == "none"


def test_flip_export_warms_up_the_same_requests(flip_export, plain_export):
    from contract.signatures import WARMUP_PATH

    assert (flip_export.path / WARMUP_PATH).read_bytes() == (plain_export.path / WARMUP_PATH).read_bytes()


def test_verification_rejects_an_export_checked_for_the_other_augmentation(
    flip_export, plain_export, keras_model
):
    from trainer.export.savedmodel import ExportVerificationError, verify_export

    names = list(CIFAR10_CLASSES)
    verify_export(keras_model, names, flip_export.path, tta="flip")
    with pytest.raises(ExportVerificationError, match="differ from the Keras model"):
        verify_export(keras_model, names, flip_export.path)
    with pytest.raises(ExportVerificationError, match="differ from the Keras model"):
        verify_export(keras_model, names, plain_export.path, tta="flip")


def test_tta_flag_defaults_to_none_reaches_publish_and_refuses_unknown_values(monkeypatch, tmp_path, capsys):
    from trainer.cli import build_parser
    from trainer.export import cli

    seen = {}

    def fake_publish(*args, **kwargs):
        seen.update(kwargs)
        return tmp_path / "models" / "cifar10" / "1"

    import trainer.export.publish as publish_module  # cli.run imports publish when it runs

    monkeypatch.setattr(publish_module, "publish", fake_publish)
    flags = ["--run-dir", str(tmp_path), "--model-base", str(tmp_path / "models")]
    assert cli.main(flags) == 0 and seen["tta"] == "none"
    assert cli.main([*flags, "--tta", "flip"]) == 0 and seen["tta"] == "flip"
    assert build_parser().parse_args(["export", *flags, "--tta", "flip"]).tta == "flip"
    with pytest.raises(SystemExit):
        cli.main([*flags, "--tta", "rotate"])
    assert "invalid choice" in capsys.readouterr().err


def test_publish_refuses_an_unknown_augmentation_before_writing(tmp_path):
    from trainer.export.publish import publish

    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        publish(tmp_path / "run", tmp_path / "models", tta="rotate")
    assert not (tmp_path / "models").exists()
