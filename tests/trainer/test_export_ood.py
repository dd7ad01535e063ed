"""Out-of-distribution score and abstention built into the exported graph (trainer/export/ood.py, trust.py):
every signature returns ood_score and abstain; the threshold keeps the stated share of held-out
in-distribution images and flags out-of-class ones; reference_stats.json describes the held-out data;
models that cannot compute the chosen score still export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.signatures import ABSTAIN_KEY, OOD_SCORE_KEY, REFERENCE_STATS_PATH
from trainer.export.ood import KEEP_DEFAULT, auroc, read_photo_folder, threshold_for

# The held-out test split of the session's run has 200 images: the kept share's binomial standard
# deviation around 0.95 is 1.5 points; 5 points is over three of them.
KEPT_TOLERANCE = 0.05
# Uniform random pixels are out of every class; the stated rate the tiny session model must flag.
NOISE_FLAGGED_RATE = 0.95


def test_auroc_is_the_probability_an_outlier_scores_higher():
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=400), rng.normal(0.5, 1.0, size=300)
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score(np.r_[np.zeros(400), np.ones(300)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(expected, abs=1e-12)


def test_threshold_keeps_the_stated_share():
    scores = np.random.default_rng(1).normal(size=1000)
    for keep in (0.8, 0.95, 0.99):
        assert np.mean(scores <= threshold_for(scores, keep)) == pytest.approx(keep, abs=0.002)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        threshold_for(scores, 1.0)


def test_a_labelled_photo_folder_is_read_as_the_gateway_decodes_uploads(tmp_path: Path) -> None:
    """export --ood-photos: a phone photo (sideways with EXIF Orientation 6, large enough to decode
    reduced) must become the pixels the gateway would feed the model for the same file."""
    from tests.trainer.graph_image_cases import gateway_pixels, large_jpeg

    files = {"phone.jpg": large_jpeg((1100, 1030), "oriented"), "small.jpg": large_jpeg((90, 60), "420")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "labels.csv").write_text("file,label\nphone.jpg,cat\nsmall.jpg,dog\n")
    pixels, labels = read_photo_folder(tmp_path)
    assert labels == ["cat", "dog"]
    np.testing.assert_array_equal(pixels, gateway_pixels(list(files.values())).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("signature", ["serving_default", "serving_bytes", "explain", "explain_bytes"])
def test_every_signature_exposes_ood_score_and_abstain(exported_session, signature):
    from PIL import Image

    from tests.trainer.graph_image_cases import encode

    pixels = np.random.default_rng(3).integers(0, 256, size=(3, 32, 32, 3)).astype(np.uint8)
    inputs: dict[str, np.ndarray] = (
        {"images": pixels.astype(np.float32)}
        if not signature.endswith("bytes")
        else {"image_bytes": np.array([encode(Image.fromarray(p), "PNG") for p in pixels], dtype=object)}
    )
    if signature.startswith("explain"):
        inputs["class_index"] = np.full(3, -1, np.int32)
    out = exported_session.run(signature, inputs)
    assert out[OOD_SCORE_KEY].dtype == np.float32 and out[OOD_SCORE_KEY].shape == (3,)
    assert out[ABSTAIN_KEY].dtype == np.bool_ and out[ABSTAIN_KEY].shape == (3,)
    default = exported_session.run("serving_default", {"images": pixels.astype(np.float32)})
    np.testing.assert_allclose(out[OOD_SCORE_KEY], default[OOD_SCORE_KEY], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[ABSTAIN_KEY], default[ABSTAIN_KEY])


@pytest.fixture(scope="module")
def held_out_test_split(exported_model):
    from trainer import run_files

    dataset = run_files.load_run_dataset(run_files.read_config(exported_model.run_dir))
    return dataset.x_test  # the threshold was fitted on the validation split, never on these


@pytest.mark.slow
def test_abstain_keeps_in_distribution_and_flags_out_of_class(
    exported_model, exported_session, held_out_test_split
):
    card = json.loads((exported_model.path / "assets.extra" / "model_card.json").read_text())
    assert card["ood"]["fitted"] is True and card["ood"]["keep_target"] == KEEP_DEFAULT
    assert card["ood"]["score"] == "mahalanobis"  # the bn_cnn has a feature layer
    inside = exported_session.run("serving_default", {"images": held_out_test_split.astype(np.float32)})
    kept = float(np.mean(~inside[ABSTAIN_KEY]))
    assert abs(kept - KEEP_DEFAULT) <= KEPT_TOLERANCE, kept
    assert card["ood"]["in_distribution_kept"] == pytest.approx(kept, abs=1e-4)
    noise = np.random.default_rng(9).integers(0, 256, size=(200, 32, 32, 3)).astype(np.float32)
    flagged = float(np.mean(exported_session.run("serving_default", {"images": noise})[ABSTAIN_KEY]))
    assert flagged >= NOISE_FLAGGED_RATE, flagged
    # The report measured AUROC on real out-of-class pictures for every score the model computes.
    assert set(card["ood"]["auroc_by_score"]) == {"mahalanobis", "energy", "max_softmax"}
    for value in card["ood"]["auroc"].values():
        assert 0.0 <= value <= 1.0


@pytest.mark.slow
def test_reference_stats_describe_the_held_out_split(exported_model):
    stats = json.loads((exported_model.path / REFERENCE_STATS_PATH).read_text())
    assert set(stats) == {
        "class_share", "confidence_hist", "ood_score_hist", "abstain_rate", "pixel_mean", "pixel_std", "n",
    }  # fmt: skip
    assert list(stats["class_share"]) == list(exported_model.class_names)
    assert sum(stats["class_share"].values()) == pytest.approx(1.0, abs=1e-5)
    for hist in (stats["confidence_hist"], stats["ood_score_hist"]):
        assert len(hist["edges"]) == len(hist["counts"]) + 1
        assert sum(hist["counts"]) == stats["n"]
        assert hist["edges"] == sorted(hist["edges"])
    assert stats["confidence_hist"]["edges"][0] == 0.0 and stats["confidence_hist"]["edges"][-1] == 1.0
    assert 0.0 <= stats["abstain_rate"] <= 1.0 and stats["n"] == 200
    assert len(stats["pixel_mean"]) == 3 and len(stats["pixel_std"]) == 3
    assert all(0 < m < 255 for m in stats["pixel_mean"]) and all(s > 0 for s in stats["pixel_std"])


def _run_with_model(source: Path, dest: Path, model) -> Path:
    """A copy of run directory `source` (its config and dataset) holding `model` instead."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "reports"))
    (dest / "model.keras").unlink()
    model.save(dest / "model.keras")
    return dest


@pytest.mark.slow
def test_a_model_without_logits_or_features_exports_with_the_max_softmax_score(trained_run_dir, tmp_path):
    import keras
    import tensorflow as tf

    from trainer.export.publish import publish

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Softmax()(keras.layers.Dense(10, name="head")(x))  # no named logits
    run = _run_with_model(trained_run_dir, tmp_path / "run", keras.Model(inputs, outputs))
    path = publish(run, tmp_path / "base")
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    assert card["ood"]["score"] == "max_softmax" and card["ood"]["fitted"] is True
    assert set(card["ood"]["auroc_by_score"]) == {"max_softmax"}
    out = tf.saved_model.load(str(path)).signatures["serving_default"](images=tf.zeros([2, 32, 32, 3]))
    assert out[OOD_SCORE_KEY].shape == (2,) and out[ABSTAIN_KEY].dtype == tf.bool


@pytest.mark.slow
def test_an_mlp_exports_with_all_outputs(trained_run_dir, tmp_path):
    import tensorflow as tf

    from trainer.export.publish import publish
    from trainer.models import build_model

    dataset = json.loads((trained_run_dir / "dataset.json").read_text())
    mlp = build_model("mlp", num_classes=10, mean=dataset["mean"], std=dataset["std"], augmentation=None)
    run = _run_with_model(trained_run_dir, tmp_path / "run", mlp)
    path = publish(run, tmp_path / "base")
    loaded = tf.saved_model.load(str(path))
    assert "explain" not in loaded.signatures  # no conv block, as before
    out = loaded.signatures["serving_default"](images=tf.zeros([2, 32, 32, 3]))
    assert out[OOD_SCORE_KEY].shape == (2,) and out[ABSTAIN_KEY].shape == (2,)
    assert (path / REFERENCE_STATS_PATH).is_file()


@pytest.mark.slow
def test_a_run_without_held_out_data_exports_uncalibrated_and_never_abstains(tmp_path):
    import tensorflow as tf

    from tests.fixtures.exported import write_tiny_run_dir
    from trainer.export.publish import publish

    path = publish(write_tiny_run_dir(tmp_path / "run"), tmp_path / "base")
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    assert card["calibration"]["fitted"] is False and "no data section" in card["calibration"]["reason"]
    assert card["ood"]["threshold"] is None
    assert not (path / REFERENCE_STATS_PATH).exists()
    noise = tf.constant(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32))
    out = tf.saved_model.load(str(path)).signatures["serving_default"](images=noise)
    assert not out[ABSTAIN_KEY].numpy().any()


@pytest.mark.slow
def test_ood_keep_flag_moves_the_threshold(trained_run_dir, tmp_path):
    from trainer.export.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    assert main(["--run-dir", str(run), "--model-base", str(tmp_path / "base"), "--ood-keep", "0.8"]) == 0
    card = json.loads((tmp_path / "base" / "cifar10" / "1" / "assets.extra" / "model_card.json").read_text())
    assert card["ood"]["keep_target"] == 0.8
    assert abs(card["ood"]["in_distribution_kept"] - 0.8) <= 0.08
    with pytest.raises(SystemExit):  # argparse refuses a share of 1: nothing could ever be flagged
        main(["--run-dir", str(run), "--model-base", str(tmp_path / "b2"), "--ood-keep", "1"])
