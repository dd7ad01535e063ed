"""A tiny SavedModel with the serving contract of docs/architecture.md, for testing the double alone.

Same signatures, input/output aliases and dtypes as trainer/export writes (`serving_default`:
`images` float32 [N,32,32,3]; `serving_bytes`: `image_bytes` string [N]; outputs `probabilities`
float32 [N,C] and `classes` string [N,C]), but a fixed linear map of the mean colour instead of a
trained network, so it saves in a second and its answers depend on the pixels.

`ood=True` adds the out-of-distribution outputs of issue 17 (`ood_score` float32 [N], `abstain` bool
[N], as trainer/export writes them): the score is how far the image's mean brightness is from mid-grey
(0 for a uniform grey image, TINY_OOD_MAX for a black or white one) and `abstain` is score >
TINY_OOD_THRESHOLD, a graph constant, so tests know which images a model abstains on. Without it the
model looks like one exported before those outputs existed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

INPUT_SIZE = 32
# The output names of the contract (docs/architecture.md), written out rather than imported from
# contract/signatures.py, so a renamed key there fails the gateway's tests instead of following along.
OOD_SCORE_KEY = "ood_score"
ABSTAIN_KEY = "abstain"
TINY_OOD_MAX = 2.0  # ood_score of an all-black or all-white image
TINY_OOD_THRESHOLD = 1.0  # abstain above: images whose mean brightness is below 64 or above 191
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class _TinyClassifier(tf.Module):
    def __init__(self, class_names: Sequence[str], seed: int, ood: bool = False) -> None:
        super().__init__()
        self.ood = ood
        rng = np.random.default_rng(seed)
        self.weights = tf.Variable(rng.normal(size=(3, len(class_names))).astype("float32") * 8.0)
        self.bias = tf.Variable(rng.normal(size=(len(class_names),)).astype("float32"))
        self.names = tf.constant(list(class_names))

    def _outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        mean_colour = tf.reduce_mean(images, axis=[1, 2]) / 255.0
        probabilities = tf.nn.softmax(mean_colour @ self.weights + self.bias)
        classes = tf.tile(self.names[tf.newaxis, :], [tf.shape(images)[0], 1])
        outputs = {"probabilities": probabilities, "classes": classes}
        if self.ood:
            brightness = tf.reduce_mean(images, axis=[1, 2, 3]) / 255.0
            ood_score = tf.abs(brightness - 0.5) * (2.0 * TINY_OOD_MAX)
            outputs[OOD_SCORE_KEY] = ood_score
            outputs[ABSTAIN_KEY] = ood_score > tf.constant(TINY_OOD_THRESHOLD)
        return outputs

    @tf.function(
        input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32, name="images")]
    )
    def serving_default(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serving_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        def decode(encoded: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            resized = tf.image.resize(image, [INPUT_SIZE, INPUT_SIZE], method="bilinear", antialias=True)
            return tf.clip_by_value(tf.round(resized), 0.0, 255.0)

        images = tf.map_fn(
            decode, image_bytes, fn_output_signature=tf.TensorSpec([INPUT_SIZE, INPUT_SIZE, 3], tf.float32)
        )
        return self._outputs(images)


def write_tiny_model(
    model_base: str | Path,
    name: str,
    version: int,
    *,
    class_names: Sequence[str] = CIFAR10_CLASSES,
    seed: int = 0,
    ood: bool = False,
) -> Path:
    """Save BASE/name/version atomically (written beside it, then renamed, as a publisher should);
    `ood=True` adds the `ood_score` and `abstain` outputs (see the module docstring)."""
    model_dir = Path(model_base) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists; versions only grow, pick a higher one")
    module = _TinyClassifier(class_names, seed, ood)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))  # non-digit: the poller skips it
    tf.saved_model.save(
        module,
        str(staging),
        signatures={"serving_default": module.serving_default, "serving_bytes": module.serving_bytes},
    )
    os.replace(staging, target)
    return target
