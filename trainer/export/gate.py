"""The export's quality gate: the candidate and the served version, measured on the same data.

A figure stored in a model card says nothing unless it was measured on the same images as the one it
is compared with (a synthetic run's 98% and a CIFAR-10 run's 88% do not compare). So, like TFX's
Evaluator blessing a candidate against a baseline, the gate:

* rebuilds the candidate's test split from its run directory (config.json: same data, seed, split) and
  identifies it by a content hash, sha256 over the uint8 pixels, the labels and the class names
  (`evaluation_data` in the model card);
* runs the candidate's exported SavedModel (`serving_default`, what users get, --tta and all) on it;
* for `--max-regression`, loads the baseline, the version users get today (labels.json's `stable`,
  else the newest published version), with tf.saved_model.load and runs its `serving_default` on the
  same pixels. The comparison is refused when the baseline's own card records other evaluation data
  or other class names, or none at all: then the operator decides, with `--force-new-baseline`;
* checks per-class minimums (`--min-class-recall`, `--min-class-f1`) beside `--min-accuracy`.

The verdict and the numbers go into the candidate's model card (`gate`), passed or not: a refused
candidate is never published, so its numbers are in the error message and the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.labels import LabelsError, read_labels
from contract.signatures import IMAGES_KEY, PROBABILITIES_KEY, SERVING_DEFAULT
from contract.versions import published_versions
from trainer.evaluate import confusion_matrix, per_class_metrics

log = logging.getLogger(__name__)

HASH_SCHEME = "sha256(uint8 pixels NHWC C-order, int32 little-endian labels, JSON class names)"
PASSED, FAILED, NEW_BASELINE, NOT_GATED = "passed", "failed", "new_baseline", "not_gated"
EVAL_BATCH = 256


class QualityGateError(RuntimeError):
    """The candidate model is not good enough to publish (or cannot be compared); nothing was written."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = record  # the gate's numbers, for the log


@dataclass(frozen=True)
class GateCriteria:
    """The export flags that make up the gate; all None: no gate (the card says "not_gated")."""

    min_accuracy: float | None = None
    max_regression: float | None = None
    min_class_recall: float | None = None
    min_class_f1: float | None = None
    force_new_baseline: bool = False

    @property
    def active(self) -> bool:
        floors = (self.min_accuracy, self.max_regression, self.min_class_recall, self.min_class_f1)
        return any(v is not None for v in floors)


@dataclass(frozen=True)
class EvaluationData:
    """A test split and its identity: the same pixels, labels and classes give the same sha256."""

    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int [N]
    class_names: tuple[str, ...]
    source: str  # for people: dataset name and where it came from
    synthetic: bool
    sha256: str

    def describe(self) -> dict[str, Any]:
        """The model card's `evaluation_data`."""
        return {
            "sha256": self.sha256,
            "n": int(len(self.labels)),
            "source": self.source,
            "synthetic": self.synthetic,
            "split": "test",
            "hash_of": HASH_SCHEME,
        }


def content_hash(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...] | list[str]) -> str:
    """sha256 identifying a split by content: pixels (with their shape), labels and class names."""
    pixels = np.ascontiguousarray(images, dtype=np.uint8)
    if pixels.shape != images.shape or np.asarray(images).dtype != np.uint8:
        raise ValueError(f"evaluation images must be uint8, got {np.asarray(images).dtype}")
    digest = hashlib.sha256()
    digest.update(json.dumps({"shape": list(pixels.shape)}).encode())
    digest.update(pixels.tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i4").tobytes())
    digest.update(json.dumps([str(c) for c in class_names]).encode())
    return digest.hexdigest()


def evaluation_data(
    images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...] | list[str], source: str,
    *, synthetic: bool = False,
) -> EvaluationData:
    names = tuple(str(c) for c in class_names)
    return EvaluationData(
        images, np.asarray(labels), names, source, synthetic, content_hash(images, labels, names)
    )


def load_evaluation_data(run_dir: Path) -> EvaluationData:
    """The run's test split, rebuilt from its config.json as trainer/evaluate.py does (same seed, same
    split); QualityGateError when it cannot be (then the gate cannot measure anything)."""
    from trainer import run_files
    from trainer.config import ConfigError

    config_path = run_dir / run_files.CONFIG_FILE
    try:
        recorded = json.loads(config_path.read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("data"), dict):
        # Without it the defaults would name CIFAR-10 and download it: not the run's data.
        raise QualityGateError(
            f"the gate measures the candidate on its run's test split, but {config_path} is missing or "
            "records no data section to rebuild it from; export a run trained by `python -m trainer "
            "train`, or publish without gate flags"
        )
    try:
        config = run_files.read_config(run_dir)
        dataset = run_files.load_run_dataset(config)
    except (ConfigError, OSError, ValueError) as exc:
        raise QualityGateError(
            f"the gate measures the candidate on its run's test split, which could not be rebuilt from "
            f"{run_dir / run_files.CONFIG_FILE}: {exc}. Make the run's data available (data.data_dir) or "
            "publish without gate flags"
        ) from None
    if len(dataset.y_test) == 0:
        raise QualityGateError(f"the run's dataset {dataset.name} has an empty test split: nothing to gate")
    source = f"{dataset.name}: {dataset.source}" if dataset.source else dataset.name
    return evaluation_data(
        dataset.x_test, dataset.y_test, dataset.class_names, source, synthetic=dataset.synthetic
    )


def predict_savedmodel(saved_model_dir: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities [N, C] from a SavedModel's serving_default, loaded as TF Serving would load it."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir))
    fn = loaded.signatures[SERVING_DEFAULT]
    out = []
    for i in range(0, len(images), EVAL_BATCH):
        batch = tf.constant(images[i : i + EVAL_BATCH], dtype=tf.float32)
        out.append(fn(**{IMAGES_KEY: batch})[PROBABILITIES_KEY].numpy())
    return np.concatenate(out, axis=0)


def score(probs: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class precision/recall/F1 of `probs` on `labels`."""
    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = probs.argmax(axis=1)
    per_class = per_class_metrics(confusion_matrix(y_true, y_pred, len(class_names)), class_names)
    return {
        "accuracy": round(float(np.mean(y_pred == y_true)), 6),
        "macro_f1": round(float(np.mean([c["f1"] for c in per_class.values()])), 6),
        "per_class": per_class,
    }


def baseline_version(model_dir: Path) -> tuple[int | None, str]:
    """The version users get today and why: labels.json's stable, else the newest published one."""
    published = published_versions(model_dir)
    try:
        labels = read_labels(model_dir)
    except LabelsError as exc:
        raise QualityGateError(f"cannot tell which version is served: {exc}") from None
    if labels is not None:
        if labels.stable in published:
            return labels.stable, "labels.json stable"
        log.warning("labels.json names stable version %d, which is not published; comparing with the newest",
                    labels.stable)
    return (published[0], "newest published version") if published else (None, "no version published")


def _read_card(version_dir: Path) -> dict[str, Any] | None:
    from trainer.export.model_card import read_model_card

    try:
        return read_model_card(version_dir)
    except (OSError, ValueError):
        return None


def _describe(card_data: dict[str, Any] | None) -> str:
    if not card_data:
        return "unknown data"
    return f"{card_data.get('source')} (n={card_data.get('n')}, sha256 {str(card_data.get('sha256'))[:12]}…)"


def _comparability_problem(
    version: int, card: dict[str, Any] | None, data: EvaluationData
) -> str | None:
    """Why the baseline's numbers cannot be compared with the candidate's, or None when they can."""
    ours = _describe(data.describe())
    if card is None:
        return (
            f"version {version} has no readable model card, so the data it was validated on is unknown; "
            f"the candidate is measured on {ours}"
        )
    names = [str(c) for c in card.get("class_names") or []]
    if names != list(data.class_names):
        return (
            f"version {version} predicts classes {names}, the candidate {list(data.class_names)}: "
            "a different class set is a different task"
        )
    theirs = card.get("evaluation_data")
    if not isinstance(theirs, dict) or not theirs.get("sha256"):
        # Published before the like-for-like gate: its own data is unknown, but both are measured on
        # the candidate's split here, so the comparison holds (run_gate notes it). Refusing would
        # stop every nightly publish once, on upgrade, for no real difference in data.
        return None
    if theirs["sha256"] != data.sha256:
        return (
            f"version {version} was validated on {_describe(theirs)}, the candidate on {ours}: "
            "accuracies on different data do not compare"
        )
    return None


def _refusal(problem: str) -> str:
    return (
        f"refusing to compare with the served version: {problem}. Measure both on the same data (train the "
        "candidate on the data the served version was validated on), or publish this candidate as a new "
        "baseline deliberately with --force-new-baseline"
    )


def check_comparable(model_dir: Path, data: EvaluationData, criteria: GateCriteria) -> None:
    """Refuse early, before anything is exported, a --max-regression comparison with a served version
    validated on other data (run_gate checks again under the publish lock)."""
    if criteria.max_regression is None or criteria.force_new_baseline:
        return
    version, _ = baseline_version(model_dir)
    if version is None:
        return
    problem = _comparability_problem(version, _read_card(model_dir / str(version)), data)
    if problem is not None:
        raise QualityGateError(_refusal(problem))


def run_gate(
    candidate_dir: Path, data: EvaluationData, model_dir: Path, criteria: GateCriteria
) -> dict[str, Any]:
    """Measure the exported candidate (and the served baseline, for --max-regression) on `data`;
    return the model card's `gate` record, or raise QualityGateError (with the record) when it fails.

    Call under the publish lock, so the baseline cannot change while it is measured.
    """
    candidate = score(predict_savedmodel(candidate_dir, data.images), data.labels, data.class_names)
    record: dict[str, Any] = {
        "verdict": PASSED,
        "criteria": asdict(criteria),
        "evaluation_data": data.sha256,
        "candidate": candidate,
        "baseline": None,
        "regression": None,
        "reasons": [],
        "notes": [],
    }
    reasons: list[str] = record["reasons"]
    acc = candidate["accuracy"]
    if criteria.min_accuracy is not None and acc < criteria.min_accuracy:
        reasons.append(f"test accuracy {acc:.4f} is below --min-accuracy {criteria.min_accuracy:.4f}")
    for flag, key, floor in (
        ("--min-class-recall", "recall", criteria.min_class_recall),
        ("--min-class-f1", "f1", criteria.min_class_f1),
    ):
        if floor is None:
            continue
        low = {name: m[key] for name, m in candidate["per_class"].items() if m[key] < floor}
        if low:
            worst_first = sorted(low.items(), key=lambda kv: kv[1])
            listed = ", ".join(f"{name} {value:.4f}" for name, value in worst_first)
            reasons.append(f"{key} below {flag} {floor:.4f} for {len(low)} class(es): {listed}")

    if criteria.max_regression is not None:
        version, chosen_by = baseline_version(model_dir)
        if version is not None:
            version_dir = model_dir / str(version)
            card = _read_card(version_dir)
            problem = _comparability_problem(version, card, data)
            baseline: dict[str, Any] = {
                "version": version,
                "chosen_by": chosen_by,
                "evaluation_data": ((card or {}).get("evaluation_data") or {}).get("sha256"),
            }
            record["baseline"] = baseline
            if problem is not None and criteria.force_new_baseline:
                record["verdict"] = NEW_BASELINE
                record["notes"].append(f"not compared (--force-new-baseline): {problem}")
                log.warning("--force-new-baseline: publishing without comparing: %s", problem)
            elif problem is not None:
                record["verdict"] = FAILED
                raise QualityGateError(_refusal(problem), record)
            else:
                if baseline["evaluation_data"] is None:
                    record["notes"].append(
                        f"version {version}'s card records no evaluation_data (published before the "
                        "like-for-like gate): compared on the candidate's split"
                    )
                    log.warning("%s", record["notes"][-1])
                served = score(predict_savedmodel(version_dir, data.images), data.labels, data.class_names)
                baseline.update(served)
                drop = round(served["accuracy"] - acc, 6)
                record["regression"] = drop
                if drop > criteria.max_regression:
                    reasons.append(
                        f"test accuracy {acc:.4f} regresses {drop:.4f} from version {version} ({chosen_by}), "
                        f"{served['accuracy']:.4f} on the same {len(data.labels)} images (sha256 "
                        f"{data.sha256[:12]}…), more than --max-regression {criteria.max_regression:.4f}"
                    )
        else:
            record["notes"].append("no version published yet: nothing to compare with")
    if reasons:
        record["verdict"] = FAILED
        raise QualityGateError("; ".join(reasons) + "; not published", record)
    return record
