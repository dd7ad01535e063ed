"""The synthetic shapes: deterministic per seed, balanced, varied, with the class signal confined
to the bounding box that `return_masks` reports."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data import load_dataset, synthetic


def test_deterministic_per_seed() -> None:
    x1, y1, m1 = synthetic.generate(60, seed=11, return_masks=True)
    x2, y2, m2 = synthetic.generate(60, seed=11, return_masks=True)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(m1, m2)
    x3, _ = synthetic.generate(60, seed=12)
    assert not np.array_equal(x1, x3)


def test_balanced_labels_and_types() -> None:
    x, y = synthetic.generate(200, seed=0)
    assert x.dtype == np.uint8 and x.shape == (200, 32, 32, 3)
    assert y.dtype == np.int32 and np.bincount(y).tolist() == [20] * len(synthetic.CLASS_NAMES)
    assert len(synthetic.CLASS_NAMES) == 10


def test_nuisance_varies_within_a_class() -> None:
    x, y, masks = synthetic.generate(300, seed=1, return_masks=True)
    circles = y == synthetic.CLASS_NAMES.index("circle")
    box_sides = masks[circles].any(axis=1).sum(axis=1)
    box_lefts = masks[circles].any(axis=1).argmax(axis=1)
    corner_colours = x[circles, 0, 0].astype(int)
    assert np.ptp(box_sides) >= 6 and np.ptp(box_lefts) >= 8  # scale and position vary
    assert np.ptp(corner_colours, axis=0).min() > 100  # background colour varies per channel
    assert np.std(x[circles].astype(float) - np.roll(x[circles], 1, axis=2)) > 5  # noisy, not flat


def _residual_outside_and_inside(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Fit the background (a plane per channel) outside the mask; RMS residual outside vs inside."""
    yy, xx = np.mgrid[0:32, 0:32]
    design = np.stack([np.ones(1024), xx.ravel(), yy.ravel()], axis=1)
    outside = ~mask.ravel()
    pixels = image.reshape(1024, 3).astype(float)
    coef, *_ = np.linalg.lstsq(design[outside], pixels[outside], rcond=None)
    residual = pixels - design @ coef
    return float(np.sqrt(np.mean(residual[outside] ** 2))), float(np.sqrt(np.mean(residual[~outside] ** 2)))


def test_class_signal_lies_inside_the_mask() -> None:
    x, _, masks = synthetic.generate(50, seed=2, return_masks=True)
    assert masks.dtype == bool and masks.shape == (50, 32, 32)
    for image, mask in zip(x, masks, strict=True):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert mask.sum() == len(rows) * len(cols)  # one rectangle
        assert synthetic.MIN_BOX <= len(rows) == len(cols) <= synthetic.MAX_BOX
        outside, inside = _residual_outside_and_inside(image, mask)
        # Outside the box: only a smooth gradient plus pixel noise. Inside: the shape stands out.
        assert outside < 1.5 * synthetic.NOISE_SIGMA
        assert inside > 2.5 * outside


def test_load_dataset_synthetic() -> None:
    d = load_dataset("synthetic", num_train=300, num_test=100, val_fraction=0.2, seed=5)
    assert d.synthetic and d.source == "generated (seed=5)" and d.name == "synthetic"
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (240, 60, 100)
    assert d.class_names == synthetic.CLASS_NAMES
    assert np.bincount(d.y_val, minlength=10).tolist() == [6] * 10
    # Test images never repeat training images.
    train_bytes = set(map(bytes, d.x_train.reshape(len(d.x_train), -1)))
    assert not train_bytes & set(map(bytes, d.x_test.reshape(len(d.x_test), -1)))
    # The test split and its masks can be rebuilt from the recorded seed (for explainability checks).
    x, y, _ = synthetic.generate(100, d.notes["test_seed"], return_masks=True)
    assert np.array_equal(x, d.x_test) and np.array_equal(y, d.y_test)
    again = load_dataset("synthetic", num_train=300, num_test=100, val_fraction=0.2, seed=5)
    assert np.array_equal(again.x_val, d.x_val) and again.mean == d.mean


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(
        ValueError, match="unknown dataset 'mnist'; choose one of cifar10, imagefolder, synthetic"
    ):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="num_train must be a positive number"):
        load_dataset("synthetic", num_train=0)
