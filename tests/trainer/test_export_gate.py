"""The export gate compares like with like (trainer/export/gate.py), with real training, real exports
and the served SavedModel loaded and run by TensorFlow.

The baseline is the session's `exported_model` (version 1, the trained tiny bn_cnn). A worse candidate
is made deterministically: a copy of the same run whose `logits` layer has the columns of its two
best-recalled classes swapped, so it calls one of them the other. Its metrics.json is copied unchanged,
still claiming the original accuracy: only a gate that measures the candidate notices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.labels import read_labels
from contract.versions import published_versions
from tests.fixtures.exported import copy_model_base
from tests.fixtures.training import tiny_config
from trainer.export import labels
from trainer.export.gate import QualityGateError, content_hash
from trainer.export.model_card import read_model_card
from trainer.export.publish import publish

pytestmark = pytest.mark.slow

MODEL = "cifar10"


def make_worse_run(run_dir: Path, dest: Path) -> tuple[Path, tuple[str, str]]:
    """A copy of `run_dir` whose model swaps the outputs of its two best-recalled classes (returned);
    metrics.json is copied as it was."""
    import keras

    import trainer.models  # noqa: F401 - the custom layers load_model needs

    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "reports"))
    per_class = json.loads((dest / "metrics.json").read_text())["per_class"]
    names = list(json.loads((dest / "dataset.json").read_text())["class_names"])
    first, second = sorted(names, key=lambda n: per_class[n]["recall"], reverse=True)[:2]
    i, j = names.index(first), names.index(second)
    model = keras.saving.load_model(dest / "model.keras", compile=False)
    head = model.get_layer("logits")
    weights = [w.copy() for w in head.get_weights()]
    for w in weights:  # kernel [features, classes] and bias [classes]: swap along the class axis
        w[..., [i, j]] = w[..., [j, i]]
    head.set_weights(weights)
    model.save(dest / "model.keras")
    return dest, (first, second)


@pytest.fixture(scope="module")
def worse_run(trained_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    return make_worse_run(trained_run_dir, tmp_path_factory.mktemp("worse") / "run")


@pytest.fixture(scope="module")
def other_data_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A candidate really trained on other data: another draw of the synthetic shapes (seed 1), with a
    smaller test split; same classes."""
    from trainer.train import train

    run_dir = tmp_path_factory.mktemp("other-data") / "run"
    config = tiny_config(data={"num_train": 400, "num_test": 100}, train={"epochs": 1, "seed": 1})
    train(config, run_dir, log=lambda _msg: None)
    return run_dir


def _base(exported_model, tmp_path: Path, edit_card=None) -> Path:
    return copy_model_base(exported_model, tmp_path / "models", edit_card)


def _leftovers(model_dir: Path) -> list[str]:
    return [p.name for p in model_dir.iterdir() if p.name.startswith(".tmp-")]


def test_the_split_is_identified_by_its_content(exported_model):
    from trainer import run_files

    card = read_model_card(exported_model.path)
    dataset = run_files.load_run_dataset(run_files.read_config(exported_model.run_dir))
    expected = content_hash(dataset.x_test, dataset.y_test, dataset.class_names)
    assert card["evaluation_data"]["sha256"] == expected
    assert card["evaluation_data"]["n"] == len(dataset.y_test)
    assert card["evaluation_data"]["source"].startswith("synthetic")
    assert card["gate"] == {"verdict": "not_gated"}
    # One pixel, one label or one class name different: another split.
    pixels = dataset.x_test.copy()
    pixels[0, 0, 0, 0] ^= 1
    assert content_hash(pixels, dataset.y_test, dataset.class_names) != expected
    assert content_hash(dataset.x_test, np.roll(dataset.y_test, 1), dataset.class_names) != expected
    renamed = ("plane", *dataset.class_names[1:])
    assert content_hash(dataset.x_test, dataset.y_test, renamed) != expected


def test_same_model_passes_with_both_versions_measured_on_the_same_images(exported_model, tmp_path):
    base = _base(exported_model, tmp_path)
    floors = {"min_accuracy": 0.0, "max_regression": 0.0, "min_class_recall": 0.0}
    path = publish(exported_model.run_dir, base, MODEL, **floors)
    card = read_model_card(path)
    gate = card["gate"]
    assert gate["verdict"] == "passed" and gate["reasons"] == []
    assert gate["evaluation_data"] == card["evaluation_data"]["sha256"]
    assert gate["baseline"]["version"] == 1 and gate["baseline"]["chosen_by"] == "newest published version"
    # The served SavedModel really ran: the same weights on the same images give the same numbers.
    assert gate["baseline"]["accuracy"] == gate["candidate"]["accuracy"] and gate["regression"] == 0.0
    assert gate["baseline"]["per_class"] == gate["candidate"]["per_class"]
    recorded = json.loads((exported_model.run_dir / "metrics.json").read_text())
    n = card["evaluation_data"]["n"]
    # The export folds batch norm, which may flip a near tie or two.
    assert abs(gate["candidate"]["accuracy"] - recorded["test_accuracy"]) <= 2 / n
    assert set(gate["candidate"]["per_class"]) == set(exported_model.class_names)


def test_a_worse_candidate_is_refused_even_though_it_clears_the_minimum(exported_model, worse_run, tmp_path):
    worse, swapped = worse_run
    base = _base(exported_model, tmp_path)
    served = read_model_card(exported_model.path)["metrics"]["test_accuracy"]
    # What the run claims is the served model's figure: a gate reading metrics.json would pass it.
    assert json.loads((worse / "metrics.json").read_text())["test_accuracy"] == served
    floor = max(0.0, served - 0.4)  # two classes of ten cannot cost more than about 0.25
    with pytest.raises(QualityGateError) as refused:
        publish(worse, base, MODEL, min_accuracy=floor, max_regression=0.02)
    message, record = str(refused.value), refused.value.record
    assert "regresses" in message and "below --min-accuracy" not in message
    assert record["candidate"]["accuracy"] >= floor
    assert record["baseline"]["accuracy"] - record["candidate"]["accuracy"] > 0.02
    baseline = record["baseline"]
    assert f"version 1 (newest published version), {baseline['accuracy']:.4f} on the same" in message
    for name in swapped:
        assert record["candidate"]["per_class"][name]["recall"] < baseline["per_class"][name]["recall"]
    assert published_versions(base / MODEL) == [1] and _leftovers(base / MODEL) == []


def test_per_class_minimums_name_the_classes_that_miss_them(worse_run, tmp_path):
    worse, swapped = worse_run
    base = tmp_path / "models"
    with pytest.raises(QualityGateError, match=r"recall below --min-class-recall 0\.3000 for") as refused:
        publish(worse, base, MODEL, min_class_recall=0.3, min_class_f1=0.3)
    recall, f1 = str(refused.value).split("; ")[:2]
    for name in swapped:
        assert name in recall and name in f1
    assert f1.startswith("f1 below --min-class-f1 0.3000")
    assert refused.value.record["baseline"] is None  # nothing published: nothing to compare with
    assert published_versions(base / MODEL) == []


def test_a_candidate_trained_on_other_data_is_refused(exported_model, other_data_run, tmp_path):
    base = _base(exported_model, tmp_path)
    with pytest.raises(QualityGateError, match="refusing to compare with the served version") as refused:
        publish(other_data_run, base, MODEL, max_regression=0.05)
    message = str(refused.value)
    # Both datasets are named, with their sizes, and the way out.
    assert "version 1 was validated on synthetic" in message and "(n=200" in message
    assert "the candidate on synthetic" in message and "(n=100" in message
    assert "--force-new-baseline" in message
    assert published_versions(base / MODEL) == [1] and _leftovers(base / MODEL) == []

    # Publishing it anyway is a deliberate act, recorded; later candidates on its data compare with it.
    path = publish(other_data_run, base, MODEL, max_regression=0.05, force_new_baseline=True)
    gate = read_model_card(path)["gate"]
    assert gate["verdict"] == "new_baseline" and "not compared" in gate["notes"][0]
    again = read_model_card(publish(other_data_run, base, MODEL, max_regression=0.05))["gate"]
    assert again["verdict"] == "passed" and again["baseline"]["version"] == 2 and again["regression"] == 0.0


def test_a_served_version_with_other_classes_is_not_compared(exported_model, tmp_path):
    other_classes = [f"c{i}" for i in range(10)]
    base = _base(exported_model, tmp_path, edit_card=lambda card: card.update(class_names=other_classes))
    with pytest.raises(QualityGateError, match="a different class set"):
        publish(exported_model.run_dir, base, MODEL, max_regression=0.05)
    assert published_versions(base / MODEL) == [1]


def test_a_version_published_before_the_gate_is_measured_on_the_candidates_split(exported_model, tmp_path):
    # Its card has no evaluation_data: the upgrade must not stop the nightly publish, and both
    # versions are measured on the candidate's own split, which the card says.
    base = _base(exported_model, tmp_path, edit_card=lambda card: card.pop("evaluation_data"))
    gate = read_model_card(publish(exported_model.run_dir, base, MODEL, max_regression=0.05))["gate"]
    assert gate["verdict"] == "passed" and gate["regression"] == 0.0
    assert "compared on the candidate's split" in gate["notes"][0]


def test_the_baseline_is_the_stable_label_and_export_can_publish_a_canary(
    exported_model, worse_run, tmp_path
):
    worse, _ = worse_run
    base = _base(exported_model, tmp_path)
    model_dir = base / MODEL
    assert publish(worse, base, MODEL).name == "2"  # ungated: version 2, the worse one, is the newest
    labels.promote(model_dir, 1)
    # Stable 1 is what users get: the worse candidate is compared with it, not with the newest.
    with pytest.raises(QualityGateError, match=r"regresses .* from version 1 \(labels.json stable\)"):
        publish(worse, base, MODEL, max_regression=0.02)
    labels.promote(model_dir, 2)
    path = publish(worse, base, MODEL, max_regression=0.02, as_canary=True, canary_percent=10.0)
    gate = read_model_card(path)["gate"]
    assert (gate["baseline"]["version"], gate["baseline"]["chosen_by"]) == (2, "labels.json stable")
    assert read_labels(model_dir) == labels.Labels(stable=2, canary=3, canary_percent=10.0, mode="split")
