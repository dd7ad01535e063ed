"""A 2-D view of the model's feature space for the training report: reports/embedding.png.

Penultimate-layer features (what the softmax head sees) of test images, projected to two
dimensions and scattered coloured by true class. The projection is t-SNE (scikit-learn's, as the
seed tutorials draw it: neighbourhoods kept, so clusters show even when they are not linearly
apart) or PCA (numpy SVD: fast, linear, axes with a meaning), the fallback when scikit-learn is
missing or there are too few points for t-SNE's perplexity.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from trainer import reports
from trainer.reports import plt  # pyplot after reports chose the headless Agg backend

HEAD_DENSE_LAYER = "logits"  # the head's Dense layer in trainer/models/common.py
MAX_POINTS = 2000  # enough to see the clusters; keeps the forward pass and the scatter fast
PROJECTIONS = ("tsne", "pca")
TSNE_PERPLEXITY = 30.0  # scikit-learn's default; lowered for small samples (it must be < N)
MIN_TSNE_POINTS = 10  # below this, t-SNE's neighbourhoods say nothing: PCA instead


def feature_model(model: keras.Model) -> keras.Model:
    """A model sharing `model`'s layers that outputs the penultimate features [N, D]: the input of
    the head's Dense layer (`logits`), or of the last Dense layer for models that do not name it."""
    try:
        head = model.get_layer(HEAD_DENSE_LAYER)
    except ValueError:
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        if not dense:
            raise ValueError(
                f"model {model.name!r} has no Dense head layer; cannot tell which features it classifies"
            ) from None
        head = dense[-1]
    return keras.Model(model.inputs, head.input)


def penultimate_features(model: keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 [N, D] features of uint8 or float [N, 32, 32, 3] images (raw 0..255, inference mode)."""
    features = feature_model(model).predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(features, dtype=np.float32).reshape(len(images), -1)


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points [N, 2], explained variance ratio [2]) of the top two principal components.

    Signs are fixed (largest-magnitude loading positive per component) so reruns draw the same
    picture rather than a mirror image.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need a [N>=2, D] feature matrix for PCA, got shape {features.shape}")
    centred = features - features.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    if len(components) < 2:  # D == 1: pad a zero axis so the plot still has two coordinates
        components = np.vstack([components, np.zeros_like(components)])
        singular = np.append(singular, 0.0)
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    total = float(np.sum(singular**2))
    ratio = (singular[:2] ** 2) / total if total > 0 else np.zeros(2)
    return centred @ components.T, ratio


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """points [N, 2] by scikit-learn's t-SNE (PCA initialisation: stable layouts between runs)."""
    from sklearn.manifold import TSNE  # imported on use: scikit-learn loads SciPy, seconds at start

    features = np.asarray(features, dtype=np.float64)
    perplexity = min(TSNE_PERPLEXITY, (len(features) - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features)


def project_2d(
    features: np.ndarray, method: str = "tsne", seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(points [N, 2], PCA variance ratio or None, the method used). t-SNE falls back to PCA when
    scikit-learn is not installed or there are fewer than MIN_TSNE_POINTS points."""
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; choose one of {', '.join(PROJECTIONS)}")
    if method == "tsne" and len(features) >= MIN_TSNE_POINTS and importlib.util.find_spec("sklearn"):
        return tsne_2d(features, seed), None, "tsne"
    points, ratio = pca_2d(features)
    return points, ratio, "pca"


def embedding_plot(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    *,
    variance_ratio: np.ndarray | None = None,
    title: str = "",
    method: str = "pca",
) -> Path:
    """Scatter of 2-D points coloured by class, one legend entry per class present."""
    fig, ax = plt.subplots(figsize=(8, 6.5))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for index, name in enumerate(class_names):
        chosen = labels == index
        if chosen.any():
            ax.scatter(
                points[chosen, 0], points[chosen, 1], s=9, alpha=0.7, color=cmap(index % cmap.N), label=name
            )
    axis = ("t-SNE 1", "t-SNE 2") if method == "tsne" else ("PC1", "PC2")
    if variance_ratio is not None and method == "pca":
        axis = tuple(f"PC{i + 1} ({variance_ratio[i]:.0%} of variance)" for i in range(2))
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, frameon=False)
    label = "t-SNE" if method == "tsne" else "PCA"
    ax.set_title(title or f"Penultimate-layer features, {label} ({len(points)} test images)")
    return reports.save_figure(fig, path)


def write_embedding_report(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    *,
    title: str = "",
    max_points: int = MAX_POINTS,
    seed: int = 0,
    method: str = "tsne",
) -> Path:
    """Features of (a seeded sample of at most `max_points`) images -> t-SNE or PCA -> scatter at
    `path`. A `{method}` in `title` is replaced by the projection actually used."""
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(images), max_points, replace=False))
        images, labels = images[keep], labels[keep]
    points, ratio, used = project_2d(penultimate_features(model, images), method, seed)
    title = title.replace("{method}", "t-SNE" if used == "tsne" else "PCA")
    return embedding_plot(points, labels, class_names, path, variance_ratio=ratio, title=title, method=used)
