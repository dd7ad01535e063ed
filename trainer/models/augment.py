"""Training-time augmentation as Keras layers, so it runs on the accelerator inside the graph.

Every layer here is a no-op at inference (Keras passes training=False there), so the exported
model sees exactly the pixels it is given. They sit after the normalization layer, so "zero"
means "the training-set mean colour" (what cutout fills with).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="trainer")
class Cutout(layers.Layer):
    """Zero one random `size` x `size` square per image (DeVries & Taylor 2017), training only.

    The square's centre is uniform over the image, so near the border only part of it lands
    inside, as in the original recipe.
    """

    def __init__(self, size: int, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = int(size)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training or self.size <= 0:
            return inputs
        shape = ops.shape(inputs)
        batch, height, width = shape[0], shape[1], shape[2]
        cy = keras.random.randint((batch, 1, 1, 1), 0, height, seed=self.seed_generator)
        cx = keras.random.randint((batch, 1, 1, 1), 0, width, seed=self.seed_generator)
        ys = ops.reshape(ops.arange(height), (1, height, 1, 1))
        xs = ops.reshape(ops.arange(width), (1, 1, width, 1))
        half = self.size // 2
        # Square [c - half, c - half + size) on both axes.
        top, left = cy - half, cx - half
        inside = (ys >= top) & (ys < top + self.size) & (xs >= left) & (xs < left + self.size)
        return ops.where(inside, ops.zeros_like(inputs), inputs)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size, "seed": self.seed}


def augmentation_layers(
    *,
    enabled: bool = True,
    translate: int = 4,
    flip: bool = True,
    rotation: float = 0.0,
    brightness: float = 0.0,
    cutout: int = 0,
    value_range: tuple[float, float] = (-3.0, 3.0),
    image_size: int = 32,
    seed: int | None = None,
) -> list[layers.Layer]:
    """The configured augmentation layers in application order (empty list when disabled).

    `translate`: pixels, random shift up to +-translate with reflect fill, nearest sampling so
    shifts are whole pixels (the pad-and-random-crop of the fast recipes, drawn per image).
    `rotation`: degrees. `brightness`: fraction of the 0..255 range. `cutout`: square side, pixels.
    `value_range`: range of the normalized pixels, which brightness clips to.
    """
    if not enabled:
        return []
    # Distinct seeds per layer so two layers never draw the same random stream.
    def s(offset: int) -> int | None:
        return None if seed is None else seed + offset

    out: list[layers.Layer] = []
    if flip:
        out.append(layers.RandomFlip("horizontal", seed=s(1), name="aug_flip"))
    if translate > 0:
        f = translate / image_size
        out.append(
            layers.RandomTranslation(
                f, f, fill_mode="reflect", interpolation="nearest", seed=s(2), name="aug_translate"
            )
        )
    if rotation > 0:
        out.append(layers.RandomRotation(rotation / 360.0, fill_mode="reflect", seed=s(3), name="aug_rotate"))
    if brightness > 0:
        out.append(
            layers.RandomBrightness(brightness, value_range=value_range, seed=s(4), name="aug_brightness")
        )
    if cutout > 0:
        out.append(Cutout(cutout, seed=s(5), name="aug_cutout"))
    return out
