"""Validation split (stratified, seeded, disjoint) and normalization statistics (training split only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.data import generate_official_archive
from trainer.data import load_dataset
from trainer.data.splits import channel_stats, stratified_split


def test_split_is_stratified_disjoint_and_complete() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 20, 10])
    np.random.default_rng(0).shuffle(labels)
    train, val = stratified_split(labels, 0.2, seed=7)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val]).tolist() == [20, 10, 4, 2]  # each class keeps its share


def test_split_is_seeded() -> None:
    labels = np.arange(500) % 5
    first = stratified_split(labels, 0.1, seed=1)
    assert all(
        np.array_equal(a, b) for a, b in zip(first, stratified_split(labels, 0.1, seed=1), strict=True)
    )
    assert not np.array_equal(first[1], stratified_split(labels, 0.1, seed=2)[1])


def test_split_edge_cases() -> None:
    labels = np.array([0, 0, 0, 1])  # class 1 has a single image: it stays in training
    train, val = stratified_split(labels, 0.5, seed=0)
    assert 3 in train and len(val) == 2 and set(labels[val]) == {0}
    assert len(stratified_split(labels, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        stratified_split(labels, 1.0, seed=0)


def test_channel_stats_match_numpy_across_chunks() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2500, 32, 32, 3), dtype=np.uint8)  # more than one 1024-image chunk
    x[:, :, :, 2] //= 4  # channels differ, so a mixed-up axis would show
    mean, std = channel_stats(x)
    as_float = x.astype(np.float64)
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 1, 2)), rtol=1e-9)
    assert mean[2] < 40 < mean[0]


def test_channel_stats_reject_empty() -> None:
    with pytest.raises(ValueError, match="empty training split"):
        channel_stats(np.zeros((0, 32, 32, 3), np.uint8))


def test_statistics_come_from_the_training_split_only(tmp_path: Path) -> None:
    # Each training image is one flat brightness (so every image pulls the mean differently) and
    # test images are all white: statistics over anything but the training split would differ.
    n = 100
    brightness = np.linspace(0, 200, n).round().astype(np.uint8)
    x_train = np.broadcast_to(brightness[:, None, None, None], (n, 32, 32, 3)).copy()
    x_train[:, :, :, 1] //= 2
    y_train = np.arange(n) % 10
    x_test = np.full((20, 32, 32, 3), 255, np.uint8)
    archive = generate_official_archive(
        tmp_path / "a.tar.gz", arrays=(x_train, y_train, x_test, np.arange(20) % 10)
    )

    d = load_dataset("cifar10", data_dir=archive.path, val_fraction=0.3, seed=0)
    expected_mean = d.x_train.astype(np.float64).mean(axis=(0, 1, 2))
    expected_std = d.x_train.astype(np.float64).std(axis=(0, 1, 2))
    np.testing.assert_allclose(d.mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(d.std, expected_std, rtol=1e-9)
    with_val = np.concatenate([d.x_train, d.x_val]).astype(np.float64).mean(axis=(0, 1, 2))
    assert not np.allclose(d.mean, with_val, atol=1e-3)  # the validation images are left out
    assert max(d.mean) < 150  # the white test images are left out
    assert d.describe()["mean"] == list(d.mean)
