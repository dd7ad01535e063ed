"""Procedurally generated 32x32 shape images: a dataset that needs no download.

Each image is one filled shape (the class) drawn inside a random bounding box on a textured,
noisy background. Everything except the shape's outline is nuisance: background colour and
gradient, foreground colour, position, size, noise. So a CNN has to learn shape, and the class
signal sits only inside the bounding box, which `generate(..., return_masks=True)` returns so
that explainability tests (Grad-CAM) can check where a heatmap concentrates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trainer.data.raw import RawSplits

IMAGE_SIZE = 32

# Each shape is a predicate on box coordinates u (left->right) and v (top->bottom), both in
# [-1, 1] across the bounding box. Classes differ only in geometry, never in colour.
_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 0.95,
    "ring": lambda u, v: (u**2 + v**2 <= 0.95) & (u**2 + v**2 >= 0.3),
    "square": lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),
    "frame": lambda u, v: (
        (np.maximum(np.abs(u), np.abs(v)) <= 0.9) & (np.maximum(np.abs(u), np.abs(v)) >= 0.5)
    ),
    "triangle": lambda u, v: (v <= 0.85) & (np.abs(u) <= (v + 0.95) / 1.8),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "plus": lambda u, v: (
        (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 0.95)
    ),
    "cross": lambda u, v: np.abs(np.abs(u) - np.abs(v)) <= 0.35,
    "hstripes": lambda u, v: (np.floor((v + 1.0) * 2.5) % 2 == 0) & (np.abs(u) <= 0.95),
    "vstripes": lambda u, v: (np.floor((u + 1.0) * 2.5) % 2 == 0) & (np.abs(v) <= 0.95),
}

CLASS_NAMES: tuple[str, ...] = tuple(_SHAPES)

MIN_BOX, MAX_BOX = 14, 24  # bounding-box side in pixels
NOISE_SIGMA = 8.0  # per-pixel Gaussian noise, pixel units
MIN_CONTRAST = 70.0  # least luminance gap between shape and background, so every shape is visible


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _one_image(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image of class `label`; returns (uint8 [32,32,3], bool [32,32] box mask)."""
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)

    # Background: a random base colour plus a random linear gradient (texture without class info).
    base = rng.uniform(0, 255, size=3)
    gradient = rng.uniform(-40, 40, size=(2, 3))
    img = base + (xx[..., None] / size - 0.5) * gradient[0] + (yy[..., None] / size - 0.5) * gradient[1]

    # Foreground colour: random, re-drawn until it stands out from the background base.
    for _ in range(100):
        fg = rng.uniform(0, 255, size=3)
        if abs(_luminance(fg) - _luminance(base)) >= MIN_CONTRAST:
            break
    else:  # pragma: no cover - practically unreachable; fall back to the opposite extreme
        fg = np.full(3, 255.0 if _luminance(base) < 128 else 0.0)

    box = int(rng.integers(MIN_BOX, MAX_BOX + 1))
    top = int(rng.integers(0, size - box + 1))
    left = int(rng.integers(0, size - box + 1))
    # Pixel centres mapped into [-1, 1] across the box.
    u = (np.arange(box) + 0.5) / box * 2.0 - 1.0
    uu, vv = np.meshgrid(u, u)
    shape = _SHAPES[CLASS_NAMES[label]](uu, vv)

    region = img[top : top + box, left : left + box]
    region[shape] = fg
    img += rng.normal(0.0, NOISE_SIGMA, size=img.shape)

    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + box, left : left + box] = True
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def generate(
    n: int, seed: int = 0, *, return_masks: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` images with balanced, shuffled labels, deterministic for a given `seed`.

    Returns (x uint8 [n,32,32,3], y int32 [n]) and, with `return_masks`, also a bool [n,32,32]
    mask that is True on each image's shape bounding box: the only region carrying the class.
    """
    if n < 0:
        raise ValueError(f"number of synthetic images must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.int32)
    x = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    masks = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, label in enumerate(y):
        x[i], masks[i] = _one_image(rng, int(label))
    return (x, y, masks) if return_masks else (x, y)


def split_seeds(seed: int) -> tuple[int, int]:
    """The generator seeds of the train and test images of `load(seed=seed)`: two distinct,
    seed-derived streams, so test images are never copies of training images. With them,
    `generate(num_test, split_seeds(seed)[1], return_masks=True)` rebuilds the test split and
    its masks exactly."""
    train, test = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    return train, test


def load(*, num_train: int, num_test: int, seed: int) -> RawSplits:
    """Train and test splits of generated shapes (see `split_seeds` for regenerating masks)."""
    train_seed, test_seed = split_seeds(seed)
    x_train, y_train = generate(num_train, train_seed)
    x_test, y_test = generate(num_test, test_seed)
    return RawSplits(
        class_names=CLASS_NAMES,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        source=f"generated (seed={seed})",
        notes={
            "generator": "trainer.data.synthetic",
            "train_seed": train_seed,
            "test_seed": test_seed,
            "class_signal": "inside each shape's bounding box (generate(..., return_masks=True))",
        },
    )
