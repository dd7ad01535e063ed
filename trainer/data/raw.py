"""What a loader hands to `load_dataset`: train and test pixels before validation is carved."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class RawSplits(NamedTuple):
    """x_*: uint8 [N, 32, 32, 3] RGB; y_*: int32 [N]; `source`: path or URL it came from."""

    class_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    notes: dict
