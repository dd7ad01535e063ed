"""Learning-rate schedules computed from the optimizer's step count.

Because the lr is a pure function of `optimizer.iterations` (saved in every checkpoint), a
resumed run continues the schedule exactly where the killed one stopped.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

KINDS = ("onecycle", "cosine", "constant")


@keras.saving.register_keras_serializable(package="trainer")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from peak*start_factor to `peak` over `warmup_steps`, then down to
    peak*end_factor at `total_steps`: linearly ("onecycle", as in Page's ResNet-9 and airbench)
    or along a half cosine ("cosine"). "constant" keeps `peak` throughout."""

    def __init__(
        self,
        peak: float,
        total_steps: int,
        warmup_steps: int = 0,
        kind: str = "onecycle",
        start_factor: float = 0.1,
        end_factor: float = 0.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(KINDS)}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(max(warmup_steps, 0), total_steps))
        self.kind = kind
        self.start_factor = float(start_factor)
        self.end_factor = float(end_factor)

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        if self.kind == "constant":
            return ops.convert_to_tensor(self.peak, dtype="float32") + 0.0 * step
        warm = float(max(self.warmup_steps, 1))
        up = self.start_factor + (1.0 - self.start_factor) * ops.minimum(step / warm, 1.0)
        decay_len = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - float(self.warmup_steps)) / decay_len, 0.0, 1.0)
        if self.kind == "onecycle":
            down = 1.0 + (self.end_factor - 1.0) * progress
        else:
            down = self.end_factor + (1.0 - self.end_factor) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        factor = ops.where(step < float(self.warmup_steps), up, down)
        return self.peak * factor

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "start_factor": self.start_factor,
            "end_factor": self.end_factor,
        }
