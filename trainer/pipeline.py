"""Input pipeline: in-memory uint8 arrays -> float32 batches.

Training batches come from `ShuffledBatches`, an endless stream whose batch number k belongs
to epoch k // steps_per_epoch and follows the permutation drawn from (seed, epoch) alone. Keras
hands it increasing indices, so the order never depends on Keras' epoch callbacks, prefetching
or how many epochs this process has run: a resumed run (started at initial_epoch) sees exactly
the batches an uninterrupted run would have. Augmentation is not done here: it runs inside the
model, on the accelerator.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np


def _check(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(f"images and labels differ in length: {len(x)} vs {len(y)}")
    if len(x) == 0:
        raise ValueError("cannot build batches from an empty split")


class ShuffledBatches(keras.utils.PyDataset):
    """Endless training batches (x float32 [B,32,32,3] 0..255, y int32 [B]), reshuffled per epoch.

    Each epoch has `steps_per_epoch` = len(x) // batch_size full batches (the remainder of the
    permutation is dropped that epoch, so every step has the same shape). Use with
    fit(steps_per_epoch=...). `initial_epoch` offsets the stream for a resumed run.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        initial_epoch: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check(x, y)
        self.x, self.y = x, y
        self.batch_size = min(int(batch_size), len(x))
        self.steps_per_epoch = len(x) // self.batch_size
        self.seed = int(seed)
        self.offset = int(initial_epoch) * self.steps_per_epoch
        self._cached_epoch = -1
        self._order = np.arange(len(x))

    @property
    def num_batches(self) -> None:
        return None  # endless: fit's steps_per_epoch delimits epochs

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
            self._cached_epoch = epoch
        return self._order

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, step = divmod(self.offset + int(index), self.steps_per_epoch)
        idx = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        return self.x[idx].astype(np.float32), self.y[idx].astype(np.int32)


class ArrayBatches(keras.utils.PyDataset):
    """Batches in order (validation, evaluation): every image once, the last batch may be short."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check(x, y)
        self.x, self.y = x, y
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[sl].astype(np.float32), self.y[sl].astype(np.int32)
