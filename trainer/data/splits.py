"""Validation split and normalization statistics.

The validation split is carved from the training data (the test split stays untouched for the
final report), stratified so every class keeps its share, and seeded so runs are repeatable.
Normalization statistics are computed afterwards, on what remains for training only.
"""

from __future__ import annotations

import numpy as np

# Images per chunk when accumulating statistics: bounds the float64 temporary to ~25 MB.
_STATS_CHUNK = 1024


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `val_fraction` of each class in val, chosen by `seed`.

    Each class with at least two images gives round(count * val_fraction) images (at least one
    when val_fraction > 0) to validation and keeps at least one for training. Both index arrays
    are sorted, so the original order (already shuffled or not) is kept within each split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if val_fraction == 0.0 or len(members) < 2:
            continue
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val_parts.append(rng.choice(members, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.empty(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def channel_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) of uint8 images [N, H, W, 3] in pixel units 0..255.

    Accumulates sums and sums of squares in float64 chunk by chunk, so a 50,000-image training
    set never gets copied whole into floating point. Sums of squared uint8 values stay far below
    2**53, so the float64 totals are exact and the variance formula loses nothing.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images shaped [N, H, W, 3], got {images.shape}")
    if len(images) == 0:
        raise ValueError("cannot compute normalization statistics of an empty training split")
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    for start in range(0, len(images), _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].reshape(-1, 3).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    std = np.sqrt(var)
    return (
        (float(mean[0]), float(mean[1]), float(mean[2])),
        (float(std[0]), float(std[1]), float(std[2])),
    )
