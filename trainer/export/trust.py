"""Calibrated probabilities and the out-of-distribution outputs: fitted at export, computed in the graph.

`fit_trust` (run by publish.py before the SavedModel is written) takes held-out images of the run's
own dataset, fits the temperature (trainer/export/calibration.py), chooses the abstention threshold
(trainer/export/ood.py), measures both, and returns TrustParams (the three graph constants) with the
model card's `calibration` and `ood` sections, reference_stats.json and the report files.
`TrustHead` is the graph side every signature (serving_default, serving_bytes, explain*) calls, so
their probabilities, ood_score and abstain agree.

Held-out data. The run's validation split when it has one (at least MIN_HELDOUT images): the
temperature and threshold are fitted on it and everything reported is measured on the test split,
which nothing was fitted on. The default profiles train on all 50,000 images (val_fraction 0): then
the test split is split in two halves by a fixed seed (stratified by class), the fit uses the first
and every figure in the card comes from the second. Temperature scaling never changes which class
is on top, so metrics.json's test accuracy (the card's `metrics`) stays the untouched test accuracy;
only the calibration and OOD figures depend on the halves, and they are measured on the half not
fitted on. A run without dataset information (a model written by hand) exports uncalibrated
(temperature 1) and never abstains (threshold +inf); the card says why.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contract.signatures import ABSTAIN_KEY, OOD_SCORE_KEY, PROBABILITIES_KEY, REFERENCE_STATS_PATH
from trainer.export import calibration, ood
from trainer.export.tta import FLIP, NONE, check, mirror

log = logging.getLogger(__name__)

MIN_HELDOUT = 50  # fewer validation images than this: use half of the test split instead
HALF_SEED = 20_170  # fixed: every export of a run fits on the same half of its test split
# Training images the feature Gaussian is fitted on at most (a stratified sample): 1,000 per CIFAR-10
# class estimate the means and the shared covariance well and keep the export's forward pass short.
MAX_FEATURE_FIT = 10_000
HIST_BINS = 20
TRUST_DIR = "trust"  # assets.extra/trust/ and RUN_DIR/reports/: the reliability diagram and OOD report
_PREDICT_BATCH = 256
SOFTMAX_LAYER = "probabilities"  # the head's softmax Activation in trainer/models/common.py
FEATURES_LAYER = "logits"  # the head's Dense (trainer/models/common.py): its input is the feature vector


def score_tensor(model: keras.Model) -> tuple[keras.KerasTensor, bool]:
    """(tensor, is_logits): the softmax's input when the head has the named softmax layer, otherwise
    the probabilities (then log-probabilities are used as the score)."""
    try:
        softmax = model.get_layer(SOFTMAX_LAYER)
    except ValueError:
        return model.outputs[0], False
    if isinstance(softmax, keras.layers.Activation) and softmax.output is model.outputs[0]:
        return softmax.input, True
    return model.outputs[0], False


def features_tensor(model: keras.Model) -> keras.KerasTensor | None:
    """The penultimate features (the input of the head's Dense FEATURES_LAYER), None without one."""
    try:
        layer = model.get_layer(FEATURES_LAYER)
    except ValueError:
        return None
    if not isinstance(layer, keras.layers.Dense) or len(layer._inbound_nodes) != 1:
        return None
    return layer.input


def available_scores(model: keras.Model) -> tuple[str, ...]:
    """The OOD scores `model` can compute, in ood.SCORES order: mahalanobis needs the feature layer,
    energy the logits; max_softmax always works."""
    out = [ood.MAHALANOBIS] if features_tensor(model) is not None else []
    if score_tensor(model)[1]:
        out.append(ood.ENERGY)
    return (*out, ood.MAX_SOFTMAX)


@dataclass(frozen=True)
class TrustParams:
    """The constants the graph holds. The defaults are a plain export: uncalibrated, never abstaining."""

    temperature: float = 1.0
    score: str = ood.DEFAULT_SCORE
    threshold: float = math.inf
    gaussian: ood.FeatureGaussian | None = None  # for mahalanobis

    def resolved(self, model: keras.Model) -> TrustParams:
        """These parameters with `score` replaced by the next one in ood.SCORES that `model` can compute
        (mahalanobis also needs a fitted Gaussian)."""
        usable = [s for s in available_scores(model) if s != ood.MAHALANOBIS or self.gaussian is not None]
        wanted = ood.SCORES.index(self.score)
        score = next((s for s in usable if ood.SCORES.index(s) >= wanted), usable[-1])
        return TrustParams(self.temperature, score, self.threshold, self.gaussian)


def _views_model(model: keras.Model, with_features: bool) -> keras.Model:
    tensor = score_tensor(model)[0]
    outputs = [tensor, features_tensor(model)] if with_features else [tensor]
    return keras.Model(model.inputs, outputs)


class TrustHead:
    """Graph side: images -> calibrated `probabilities`, `ood_score`, `abstain` (averaged over the
    views `tta` names, like the rest of the signature)."""

    def __init__(self, model: keras.Model, params: TrustParams | None = None, tta: str = NONE) -> None:
        self.params = (params or TrustParams()).resolved(model)
        self._is_logits = score_tensor(model)[1]
        self._tta = check(tta)
        gaussian = self.params.gaussian if self.params.score == ood.MAHALANOBIS else None
        self._model = _views_model(model, gaussian is not None)
        if gaussian is not None:
            self._whitening = tf.constant(gaussian.whitening, tf.float32)
            self._centres = tf.constant(gaussian.means @ gaussian.whitening, tf.float32)

    def _view(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        outputs = self._model(images, training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        z = tf.cast(outputs[0], tf.float32)
        if not self._is_logits:  # log-probabilities: logits up to a per-row constant
            z = tf.math.log(tf.maximum(z, calibration.LOG_FLOOR))
        probabilities = tf.nn.softmax(z / self.params.temperature, axis=-1)
        if self.params.score == ood.MAHALANOBIS:
            projected = tf.matmul(tf.cast(outputs[1], tf.float32), self._whitening)  # [N, D]
            distances = tf.reduce_sum(tf.square(projected[:, tf.newaxis, :] - self._centres), axis=-1)
            return probabilities, tf.reduce_min(distances, axis=-1)
        if self.params.score == ood.ENERGY:
            return probabilities, -tf.reduce_logsumexp(z, axis=-1)
        return probabilities, 1.0 - tf.reduce_max(probabilities, axis=-1)

    def __call__(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities, scores = self._view(images)
        if self._tta == FLIP:
            mirrored_p, mirrored_s = self._view(mirror(images))
            probabilities, scores = (probabilities + mirrored_p) / 2.0, (scores + mirrored_s) / 2.0
        threshold = tf.constant(self.params.threshold, tf.float32)
        return {PROBABILITIES_KEY: probabilities, OOD_SCORE_KEY: scores, ABSTAIN_KEY: scores > threshold}


# --- numpy side: what the graph must compute, and the fit ---------------------------------------------

View = tuple[np.ndarray, np.ndarray | None]  # (logits or log-probabilities, features) float64


class Reader:
    """Reads what TrustHead reads for numpy images: logits (log-probabilities for a model without
    reachable logits) and the penultimate features (None without a feature layer), float64. One traced
    function per model, so the export's many small reads do not each pay for Keras' predict setup."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._with_features = features_tensor(model) is not None
        self._is_logits = score_tensor(model)[1]
        views_model = _views_model(model, self._with_features)
        self._call = tf.function(lambda x: views_model(x, training=False), reduce_retracing=True)

    def __call__(self, images: np.ndarray) -> View:
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(images), _PREDICT_BATCH):
            batch = tf.constant(np.asarray(images[start : start + _PREDICT_BATCH], np.float32))
            out = self._call(batch)
            out = out if isinstance(out, list | tuple) else [out]
            parts.append([np.asarray(t, np.float64) for t in out])
        if not parts:
            raise ValueError("no images to read")
        z = np.concatenate([p[0] for p in parts])
        features = np.concatenate([p[1] for p in parts]) if self._with_features else None
        return (z if self._is_logits else calibration.as_logits(z)), features


def _views(reader: Reader, images: np.ndarray, tta: str) -> list[View]:
    views = [reader(images)]
    if check(tta) == FLIP:
        views.append(reader(np.ascontiguousarray(mirror(images))))
    return views


def expected_outputs(
    model: keras.Model, images: np.ndarray, params: TrustParams, tta: str = NONE
) -> dict[str, np.ndarray]:
    """What the signatures must return for `images` (verify_export compares)."""
    return _served(_views(Reader(model), images, tta), params.resolved(model))


def _scores(views: list[View], params: TrustParams) -> np.ndarray:
    return np.mean(
        [ood.score(z, params.score, params.temperature, f, params.gaussian) for z, f in views], axis=0
    )


def _served(views: list[View], params: TrustParams) -> dict[str, np.ndarray]:
    probabilities = np.mean([calibration.apply_temperature(z, params.temperature) for z, _ in views], axis=0)
    scores = _scores(views, params)
    return {PROBABILITIES_KEY: probabilities, OOD_SCORE_KEY: scores, ABSTAIN_KEY: scores > params.threshold}


@dataclass
class HeldOut:
    fit_x: np.ndarray
    fit_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    split: str  # where each half comes from, for the card
    class_names: tuple[str, ...]
    synthetic: bool
    train_x: np.ndarray  # a sample of the training split (the feature Gaussian's data)
    train_y: np.ndarray


def held_out(run_dir: Path) -> HeldOut | str:
    """The run's held-out images (see the module docstring), or why there are none."""
    config_path = run_dir / "config.json"
    try:
        recorded = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return f"{config_path} is missing or unreadable"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("data"), dict):
        return f"{config_path} records no data section, so the held-out images cannot be rebuilt"
    from trainer import run_files
    from trainer.config import ConfigError
    from trainer.data import DataError

    try:
        dataset = run_files.load_run_dataset(run_files.read_config(run_dir))
    except (ConfigError, DataError, OSError, ValueError) as exc:
        return f"the run's dataset could not be loaded again ({exc})"
    keep = _sample(len(dataset.y_train), MAX_FEATURE_FIT)
    train = (dataset.x_train[keep], dataset.y_train[keep])
    if len(dataset.x_val) >= MIN_HELDOUT:
        return HeldOut(
            dataset.x_val,
            dataset.y_val,
            dataset.x_test,
            dataset.y_test,
            f"fitted on the validation split ({len(dataset.x_val)} images), measured on the "
            f"test split ({len(dataset.x_test)})",
            dataset.class_names,
            dataset.synthetic,
            *train,
        )
    if len(dataset.x_test) < 2 * MIN_HELDOUT:
        return f"the run has no validation split and only {len(dataset.x_test)} test images"
    first, second = _stratified_halves(dataset.y_test)
    return HeldOut(
        dataset.x_test[first],
        dataset.y_test[first],
        dataset.x_test[second],
        dataset.y_test[second],
        f"no validation split: fitted on half of the test split ({len(first)} images, seed "
        f"{HALF_SEED}), measured on the other half ({len(second)})",
        dataset.class_names,
        dataset.synthetic,
        *train,
    )


def _sample(count: int, limit: int) -> np.ndarray:
    """Sorted indices of at most `limit` of `count` images, drawn with a fixed seed (a random subset
    keeps the class shares up to sampling noise)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(HALF_SEED).permutation(count)[:limit])


def _stratified_halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(HALF_SEED)
    first, second = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


@dataclass
class TrustFit:
    params: TrustParams = field(default_factory=TrustParams)
    card: dict[str, Any] = field(default_factory=dict)  # the model card's "calibration" and "ood"
    reference_stats: dict[str, Any] | None = None
    report: dict[str, Any] | None = None  # reports/ood_report.json
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib figure data

    def write(self, version_dir: Path, run_dir: Path | None = None) -> None:
        """reference_stats.json into the version's assets.extra, the reports into assets.extra/trust/
        and (when writable) RUN_DIR/reports/trust/."""
        if self.reference_stats is not None:
            path = version_dir / REFERENCE_STATS_PATH
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.reference_stats, indent=2) + "\n")
        if self.report is None:
            return
        from trainer.export.trust_report import write_reports

        targets = [version_dir / REFERENCE_STATS_PATH.parent / TRUST_DIR]
        if run_dir is not None:
            targets.append(run_dir / "reports" / TRUST_DIR)
        for target in targets:
            try:
                write_reports(target, self.report, self.figures)
            except OSError as exc:  # a read-only run directory must not fail the export
                log.warning("could not write the trust reports into %s: %s", target, exc)


def fit_trust(
    model: keras.Model,
    run_dir: Path,
    *,
    tta: str = NONE,
    keep: float = ood.KEEP_DEFAULT,
    score: str = ood.DEFAULT_SCORE,
    photo_folder: Path | None = None,
) -> TrustFit:
    """Fit the temperature, the feature Gaussian and the threshold on the run's held-out data (see the
    module docstring) and measure them, every score the model can compute included."""
    ood.check_keep(keep)
    if score not in ood.SCORES:
        raise ValueError(f"unknown --ood-score {score!r}; choose one of {', '.join(ood.SCORES)}")
    check(tta)
    data = held_out(Path(run_dir))
    if isinstance(data, str):
        log.warning("exporting uncalibrated and never abstaining: %s", data)
        fallback = TrustParams(score=score).resolved(model)
        return TrustFit(
            params=fallback,
            card={
                "calibration": {"temperature": 1.0, "fitted": False, "reason": data},
                "ood": {"score": fallback.score, "threshold": None, "fitted": False, "reason": data},
            },
        )

    reader = Reader(model)
    fit_views, eval_views = _views(reader, data.fit_x, tta), _views(reader, data.eval_x, tta)
    temperature = calibration.fit_temperature(fit_views[0][0], data.fit_y)  # the view the graph scales
    gaussian = None
    if ood.MAHALANOBIS in available_scores(model):
        gaussian = ood.fit_feature_gaussian(reader(data.train_x)[1], data.train_y)
    plain = _served(eval_views, TrustParams(1.0, ood.MAX_SOFTMAX))[PROBABILITIES_KEY]
    calibrated = _served(eval_views, TrustParams(temperature, ood.MAX_SOFTMAX))[PROBABILITIES_KEY]
    before = calibration.reliability(plain, data.eval_y)
    after = calibration.reliability(calibrated, data.eval_y)

    # Every score the model can compute is measured, so each export re-checks the choice.
    candidates = {s: TrustParams(temperature, s, math.inf, gaussian) for s in available_scores(model)}
    chosen = TrustParams(temperature, score, math.inf, gaussian).resolved(model).score
    sources = ood.image_sources(data.class_names, synthetic_data=data.synthetic, photo_folder=photo_folder)
    source_views = {name: _views(reader, images, tta) for name, images in sources.out_of_class.items()}
    extra_in_views = {name: _views(reader, images, tta) for name, images in sources.in_distribution.items()}

    threshold = ood.threshold_for(_scores(fit_views, candidates[chosen]), keep)
    params = TrustParams(temperature, chosen, threshold, gaussian)
    served = _served(eval_views, params)
    eval_scores = {s: _scores(eval_views, p) for s, p in candidates.items()}
    auroc = {
        s: {name: round(ood.auroc(eval_scores[s], _scores(v, p)), 4) for name, v in source_views.items()}
        for s, p in candidates.items()
    }
    outside = {name: _scores(v, params) for name, v in source_views.items()}
    flagged = {name: round(float(np.mean(v > threshold)), 4) for name, v in outside.items()}
    extra_in = {}
    for name, v in extra_in_views.items():
        inside = _scores(v, params)
        extra_in[name] = {
            "n": len(inside),
            "kept": round(float(np.mean(inside <= threshold)), 4),
            "auroc": {src: round(ood.auroc(inside, o), 4) for src, o in outside.items()},
        }
    kept = float(np.mean(~served[ABSTAIN_KEY]))
    card = {
        "calibration": {
            "temperature": round(temperature, 6),
            "ece_before": round(before.ece, 6),
            "ece_after": round(after.ece, 6),
            "n": len(data.eval_y),
            "n_fit": len(data.fit_y),
            "bins": calibration.ECE_BINS,
            "held_out": data.split,
            "fitted": True,
        },
        "ood": {
            "score": chosen,
            "threshold": round(threshold, 6),
            "keep_target": keep,
            "in_distribution_kept": round(kept, 4),
            "out_of_class_flagged": flagged,
            "auroc": auroc[chosen],
            "auroc_by_score": auroc,
            "in_distribution_photos": extra_in,
            "skipped_sources": sources.skipped,
            "n": len(data.eval_y),
            "feature_fit_n": len(data.train_y) if gaussian is not None else None,
            "fitted": True,
        },
    }
    report = {**card, "model_classes": list(data.class_names)}
    stats = reference_stats(data.eval_x, served, data.class_names)
    figures = {
        "reliability": (before, after, temperature),
        "ood_scores": (chosen, eval_scores[chosen], outside, threshold),
    }
    log.info(
        "calibration: T=%.3f, ECE %.4f -> %.4f; ood %s threshold %.4f keeps %.1f%%; AUROC %s",
        temperature, before.ece, after.ece, chosen, threshold, 100 * kept, auroc[chosen],
    )  # fmt: skip
    return TrustFit(params, card, stats, report, figures)


def reference_stats(
    images: np.ndarray, served: dict[str, np.ndarray], class_names: tuple[str, ...]
) -> dict[str, Any]:
    """reference_stats.json (the shape the drift checks read): statistics of the served outputs and the
    pixels of the held-out images every figure is measured on. Scores outside the ood_score histogram's
    edges belong to its first or last bin."""
    probabilities, scores = served[PROBABILITIES_KEY], served[OOD_SCORE_KEY]
    predicted = np.bincount(probabilities.argmax(axis=1), minlength=len(class_names)) / max(len(scores), 1)
    confidence_counts, confidence_edges = np.histogram(
        probabilities.max(axis=1), bins=HIST_BINS, range=(0, 1)
    )
    score_counts, score_edges = np.histogram(scores, bins=HIST_BINS)
    pixels = np.asarray(images, dtype=np.float64).reshape(-1, 3)
    return {
        "class_share": {name: round(float(s), 6) for name, s in zip(class_names, predicted, strict=True)},
        "confidence_hist": {
            "edges": [float(e) for e in confidence_edges],
            "counts": [int(c) for c in confidence_counts],
        },
        "ood_score_hist": {
            "edges": [float(e) for e in score_edges],
            "counts": [int(c) for c in score_counts],
        },
        "abstain_rate": round(float(np.mean(served[ABSTAIN_KEY])), 6),
        "pixel_mean": [round(float(m), 4) for m in pixels.mean(axis=0)],
        "pixel_std": [round(float(s), 4) for s in pixels.std(axis=0)],
        "n": int(len(scores)),
    }
