"""A training run killed at an epoch end, as a preempted GPU node kills one (tests of --resume)."""

from __future__ import annotations

import keras


class Killed(Exception):
    pass


class KillAfterEpoch(keras.callbacks.Callback):
    """Dies at the end of epoch `n` (1-based), after that epoch's checkpoint was written."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.n:
            raise Killed(f"killed after epoch {self.n}")
