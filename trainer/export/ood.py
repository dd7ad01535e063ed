"""Out-of-distribution scores, their threshold, and the out-of-class images they are measured on.

Every signature returns `ood_score` (higher = less like the training data) and `abstain` = ood_score >
threshold, the threshold chosen on held-out in-distribution images so that a stated share of them
(KEEP_DEFAULT, `export --ood-keep`) stays unflagged. Three scores, all from one forward pass:

* MAHALANOBIS (Lee et al. 2018): the smallest squared Mahalanobis distance of the penultimate features
  (the input of the head's Dense "logits") to a class mean, with one covariance shared by the classes,
  fitted on (up to 10,000 of) the run's training images. Needs the feature layer.
* ENERGY (Liu et al. 2020): -logsumexp(z) over the model's logits z (temperature 1, as in the paper).
  It needs the real logits: with log-probabilities instead, logsumexp is 0 for every image and the
  score carries nothing. The project's models name their softmax layer, so the graph reads its input.
* MAX_SOFTMAX (Hendrycks & Gimpel 2017): 1 - the top calibrated probability. Works from the
  probabilities alone: the fallback for a model without a feature layer or reachable logits.

The default is MAHALANOBIS, by measurement: on the bn_cnn the tests train (tiny_config, seed 0, 3
epochs on 900 generated shapes, 62.5% test accuracy), AUROC of held-out shapes (test split, 200) against
patches of the photos scikit-learn and matplotlib ship / their drawings / the real CIFAR-10 sample was
0.68 / 0.88 / 0.75 for MAHALANOBIS, 0.49 / 0.37 / 0.39 for ENERGY and 0.62 / 0.59 / 0.47 for
MAX_SOFTMAX: a ReLU network's logits grow on textured inputs far from its data, so scores read from
the logits call photos *more* familiar than its own classes, while the feature distance does not. Each
export measures every score the model can compute again (the model card's ood.auroc_by_score and
ood_report.json), so the choice can be revisited on a real CIFAR-10 model. The out-of-class images:
generated shapes (trainer/data/synthetic; skipped for a model trained on them), 32x32 patches of the
photos and drawings scikit-learn and matplotlib ship, and a folder of labelled real photos (the
CIFAR-10 sample, `export --ood-photos`), in-distribution for a model of those classes and out-of-class
otherwise. numpy only: the graph side is trainer/export/trust.py.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.special import logsumexp, softmax

from contract.preprocess import decode_to_model_input, to_model_input

MAHALANOBIS = "mahalanobis"
ENERGY = "energy"
MAX_SOFTMAX = "max_softmax"
SCORES = (MAHALANOBIS, ENERGY, MAX_SOFTMAX)  # also the fallback order when a model cannot compute one
DEFAULT_SCORE = MAHALANOBIS  # by measurement, see the module docstring
KEEP_DEFAULT = 0.95  # share of held-out in-distribution images left unflagged

PATCHES_PER_IMAGE = 64  # random crops per shipped picture; 5 pictures give 320 out-of-class images
SHAPES_COUNT = 300  # generated shape images, when they are out-of-class


def check_keep(keep: float) -> float:
    if not 0.0 < keep < 1.0:
        raise ValueError(f"--ood-keep must be a share strictly between 0 and 1 (got {keep}), e.g. 0.95")
    return float(keep)


@dataclass(frozen=True)
class FeatureGaussian:
    """Class-conditional Gaussians with one shared covariance over the penultimate features (Lee et al.
    2018): the score is the smallest squared Mahalanobis distance to a class mean, computed as
    ||(f - mean_c) L||^2 with L L^T the precision matrix, which stays accurate in float32."""

    means: np.ndarray  # [C, D]
    whitening: np.ndarray  # [D, D]

    def distances(self, features: np.ndarray) -> np.ndarray:
        projected = np.asarray(features, dtype=np.float64) @ self.whitening  # [N, D]
        centres = self.means @ self.whitening  # [C, D]
        return np.min(np.sum((projected[:, None, :] - centres[None]) ** 2, axis=-1), axis=1)


RIDGE = (
    1e-3  # added to the covariance's diagonal, times its mean variance: dead (all-zero) units stay invertible
)


def fit_feature_gaussian(features: np.ndarray, labels: np.ndarray) -> FeatureGaussian:
    """Class means and the shared covariance of training `features` [N, D] (classes without images are
    left out: no image is near them)."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = centred.T @ centred / max(len(features), 1)
    covariance += np.eye(len(covariance)) * RIDGE * max(float(np.mean(np.diag(covariance))), 1e-12)
    precision = np.linalg.inv(covariance)
    whitening = np.linalg.cholesky((precision + precision.T) / 2)
    return FeatureGaussian(means, whitening)


def score(
    logits: np.ndarray,
    kind: str,
    temperature: float = 1.0,
    features: np.ndarray | None = None,
    gaussian: FeatureGaussian | None = None,
) -> np.ndarray:
    """ood_score of each row of `logits` (and `features`, for MAHALANOBIS), as the graph computes it."""
    z = np.asarray(logits, dtype=np.float64)
    if kind == MAHALANOBIS:
        if features is None or gaussian is None:
            raise ValueError("the mahalanobis score needs the penultimate features and a fitted Gaussian")
        return gaussian.distances(features)
    if kind == ENERGY:
        return -logsumexp(z, axis=1)
    if kind == MAX_SOFTMAX:
        return 1.0 - softmax(z / temperature, axis=1).max(axis=1)
    raise ValueError(f"unknown ood score {kind!r}; choose one of {', '.join(SCORES)}")


def threshold_for(in_distribution_scores: np.ndarray, keep: float) -> float:
    """The smallest score at or below which at least `keep` of `in_distribution_scores` lie."""
    scores = np.asarray(in_distribution_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no held-out in-distribution images to choose an abstention threshold on")
    return float(np.quantile(scores, check_keep(keep), method="higher"))


def auroc(in_distribution: np.ndarray, out_of_distribution: np.ndarray) -> float:
    """Area under the ROC curve of telling the two apart by score (1 = perfect, 0.5 = chance): the
    probability that an out-of-class image scores above an in-distribution one (ties count half)."""
    inside = np.asarray(in_distribution, dtype=np.float64)
    outside = np.asarray(out_of_distribution, dtype=np.float64)
    if inside.size == 0 or outside.size == 0:
        raise ValueError("AUROC needs images on both sides")
    ranks = _average_ranks(np.concatenate([inside, outside]))
    outside_ranks = ranks[inside.size :].sum()
    return float((outside_ranks - outside.size * (outside.size + 1) / 2) / (inside.size * outside.size))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (Mann-Whitney U)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


# --- out-of-class images -------------------------------------------------------------------------------


def _packaged_pictures() -> dict[str, list[tuple[str, Image.Image]]]:
    """Photos and drawings installed with the trainer's own dependencies, by kind."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    photos: list[tuple[str, Image.Image]] = []
    sample = load_sample_images()
    for name, pixels in zip(sample.filenames, sample.images, strict=True):
        photos.append((Path(name).name, Image.fromarray(pixels)))
    sample_data = Path(matplotlib.cbook._get_data_path("sample_data"))
    drawings: list[tuple[str, Image.Image]] = []
    for name, kind in (
        ("grace_hopper.jpg", photos),
        ("logo2.png", drawings),
        ("Minduka_Present_Blue_Pack.png", drawings),
    ):
        path = sample_data / name
        if path.is_file():
            with Image.open(path) as image:
                kind.append((name, image.convert("RGB")))
    return {"package photos": photos, "package drawings": drawings}


def random_patches(image: Image.Image, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random square crops (a quarter to all of the shorter side), each brought to 32x32 by the
    gateway's own preprocessing: what an upload of that part of the picture would become."""
    width, height = image.size
    side_max = min(width, height)
    side_min = max(8, side_max // 4)
    out = np.empty((count, 32, 32, 3), dtype=np.uint8)
    for i in range(count):
        side = int(rng.integers(side_min, side_max + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        out[i] = to_model_input(image.crop((left, top, left + side, top + side)))
    return out


def read_photo_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    """The images of a labelled folder (labels.csv: file,label rows; header optional), as the gateway
    would feed them: uint8 [N, 32, 32, 3] and their labels."""
    labels_path = folder / "labels.csv"
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} is missing; the photo folder needs file,label rows")
    with labels_path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if len(row) == 2 and row[0] != "file"]
    pixels = []
    for name, _label in rows:
        with Image.open(folder / name) as image:
            pixels.append(decode_to_model_input(image))  # upright and reduced, as the gateway decodes
    return np.stack(pixels) if pixels else np.empty((0, 32, 32, 3), np.uint8), [r[1] for r in rows]


@dataclass(frozen=True)
class Sources:
    out_of_class: dict[str, np.ndarray]  # name -> uint8 images of none of the model's classes
    in_distribution: dict[str, np.ndarray]  # name -> extra uint8 images of the model's classes
    skipped: dict[str, str]  # name -> why the source was not used


def image_sources(
    class_names: Sequence[str], *, synthetic_data: bool, photo_folder: Path | None = None, seed: int = 0
) -> Sources:
    """The images the export's OOD report measures on (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sources = Sources({}, {}, {})
    if synthetic_data:
        sources.skipped["generated shapes"] = "the model was trained on them"
    else:
        from trainer.data import synthetic

        sources.out_of_class["generated shapes"] = synthetic.generate(SHAPES_COUNT, seed=seed)[0]
    for kind, pictures in _packaged_pictures().items():
        if pictures:
            sources.out_of_class[kind] = np.concatenate(
                [random_patches(p, PATCHES_PER_IMAGE, rng) for _, p in pictures]
            )
        else:
            sources.skipped[kind] = "none installed"
    if photo_folder is None:
        sources.skipped["labelled photos"] = "no photo folder given (export --ood-photos DIR)"
    elif not (photo_folder / "labels.csv").is_file():
        sources.skipped["labelled photos"] = f"{photo_folder} has no labels.csv"
    else:
        pixels, labels = read_photo_folder(photo_folder)
        name = f"photos {photo_folder.name}"
        if set(labels) <= set(class_names):  # real photos of the model's own classes
            sources.in_distribution[name] = pixels
        elif not set(labels) & set(class_names):
            sources.out_of_class[name] = pixels
        else:
            sources.skipped[name] = "its labels mix the model's classes and others"
    return sources
