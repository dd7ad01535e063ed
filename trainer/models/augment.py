"""Training-time augmentation as Keras layers, so it runs on the accelerator inside the graph.

The three layers the profiles use (RandomShift, HorizontalFlip, Cutout) are written with
`keras.ops` only: XLA compiles them under TensorFlow and JAX, so a model using them keeps
`jit_compile=True` (Keras silently switches XLA off for a model holding any layer whose
`supports_jit` is False, such as its own RandomTranslation and RandomRotation). They draw the
distributions of Page's cifar10-fast: integer shifts uniform over -t..t per axis (reflect pad and
random crop), a fair horizontal flip, and a cutout square that lies wholly inside the image.

Every layer here is a no-op at inference (Keras passes training=False there), so the exported
model sees exactly the pixels it is given. They sit after the normalization layer, so "zero"
means "the training-set mean colour" (what cutout fills with).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers, ops


class _RandomImageLayer(layers.Layer):
    """Shared plumbing: a seed generator, pass-through at inference, shape-preserving output."""

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed}

    def _per_image_int(self, batch: Any, low: int, high: int) -> Any:
        """int32 [batch, 1, 1, 1], each uniform over low..high-1 (every value equally likely)."""
        return keras.random.randint((batch, 1, 1, 1), low, high, dtype="int32", seed=self.seed_generator)


@keras.saving.register_keras_serializable(package="trainer")
class RandomShift(_RandomImageLayer):
    """Shift each image by whole pixels dy, dx, each uniform over -max_shift..max_shift, training only.

    Pad-and-crop as Page's cifar10-fast: reflect-pad by max_shift on each side, then crop the
    original size at a random offset per image. Each of the 2*max_shift+1 shifts per axis is equally
    likely (rounding a continuous shift would make the extreme ones half as likely).
    """

    def __init__(self, max_shift: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(seed, **kwargs)
        self.max_shift = int(max_shift)

    def build(self, input_shape: Any) -> None:
        height, width = input_shape[1], input_shape[2]
        if height is not None and width is not None and self.max_shift >= min(height, width):
            raise ValueError(
                f"{self.name}: a shift of up to {self.max_shift} px needs images larger than that, got "
                f"{height}x{width}; lower augment.translate"
            )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        t = self.max_shift
        if not training or t <= 0:
            return inputs
        shape = ops.shape(inputs)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        padded = ops.pad(inputs, [[0, 0], [t, t], [t, t], [0, 0]], mode="reflect")
        padded_width = width + 2 * t
        # Crop offsets in the padded image: 0..2t, i.e. shift t..-t.
        top = self._per_image_int(batch, 0, 2 * t + 1)[:, :, 0, 0]  # [N, 1]
        left = self._per_image_int(batch, 0, 2 * t + 1)[:, :, 0, 0]
        ys = ops.repeat(ops.arange(height, dtype="int32"), width)  # output pixel k = (y, x), row-major
        xs = ops.tile(ops.arange(width, dtype="int32"), [height])
        source = (top + ys[None, :]) * padded_width + (left + xs[None, :])  # [N, H*W] flat source index
        flat = ops.reshape(padded, (batch, -1, channels))
        # One gather per image; the index broadcasts over channels.
        out = ops.take_along_axis(flat, source[:, :, None], axis=1)
        return ops.reshape(out, (batch, height, width, channels))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_shift": self.max_shift}


@keras.saving.register_keras_serializable(package="trainer")
class HorizontalFlip(_RandomImageLayer):
    """Mirror each image left-right with probability 0.5, training only."""

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training:
            return inputs
        flip = self._per_image_int(ops.shape(inputs)[0], 0, 2) == 1
        return ops.where(flip, ops.flip(inputs, axis=2), inputs)


@keras.saving.register_keras_serializable(package="trainer")
class Cutout(_RandomImageLayer):
    """Zero one random `size` x `size` square per image (DeVries & Taylor 2017), training only.

    As Page's cifar10-fast, the square lies wholly inside the image: its top is uniform over
    0..H-size and its left over 0..W-size, so every image loses exactly size*size pixels.
    """

    def __init__(self, size: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(seed, **kwargs)
        self.size = int(size)

    def build(self, input_shape: Any) -> None:
        height, width = input_shape[1], input_shape[2]
        if height is not None and width is not None and self.size > min(height, width):
            raise ValueError(
                f"{self.name}: a {self.size} px cutout square does not fit in {height}x{width} images; "
                f"lower augment.cutout"
            )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training or self.size <= 0:
            return inputs
        shape = ops.shape(inputs)
        batch, height, width = shape[0], shape[1], shape[2]
        top = self._per_image_int(batch, 0, height - self.size + 1)
        left = self._per_image_int(batch, 0, width - self.size + 1)
        ys = ops.reshape(ops.arange(height, dtype="int32"), (1, height, 1, 1))
        xs = ops.reshape(ops.arange(width, dtype="int32"), (1, 1, width, 1))
        inside = (ys >= top) & (ys < top + self.size) & (xs >= left) & (xs < left + self.size)
        return ops.where(inside, ops.zeros_like(inputs), inputs)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size}


def augmentation_layers(
    *,
    enabled: bool = True,
    translate: int = 4,
    flip: bool = True,
    rotation: float = 0.0,
    brightness: float = 0.0,
    cutout: int = 0,
    value_range: tuple[float, float] = (-3.0, 3.0),
    seed: int | None = None,
) -> list[layers.Layer]:
    """The configured augmentation layers in application order (empty list when disabled).

    `translate`: pixels, whole-pixel shift up to +-translate per axis with reflect fill (RandomShift).
    `flip`: HorizontalFlip. `cutout`: square side, pixels (Cutout). These three compile with XLA.
    `rotation`: degrees (Keras RandomRotation: NOT XLA-compilable, so a model using it trains
    without XLA). `brightness`: fraction of the 0..255 range (Keras RandomBrightness: compiles).
    Both are off (0) in every shipped profile. `value_range`: range of the normalized pixels,
    which brightness clips to.
    """
    if not enabled:
        return []
    # Distinct seeds per layer so two layers never draw the same random stream.
    def s(offset: int) -> int | None:
        return None if seed is None else seed + offset

    out: list[layers.Layer] = []
    if flip:
        out.append(HorizontalFlip(seed=s(1), name="aug_flip"))
    if translate > 0:
        out.append(RandomShift(translate, seed=s(2), name="aug_translate"))
    if rotation > 0:
        out.append(layers.RandomRotation(rotation / 360.0, fill_mode="reflect", seed=s(3), name="aug_rotate"))
    if brightness > 0:
        out.append(
            layers.RandomBrightness(brightness, value_range=value_range, seed=s(4), name="aug_brightness")
        )
    if cutout > 0:
        out.append(Cutout(cutout, seed=s(5), name="aug_cutout"))
    return out
