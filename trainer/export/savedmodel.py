"""Write a Keras model as a TensorFlow Serving SavedModel with the signatures of the contract.

Signatures (tag `serve`, contract/signatures.py, see docs/architecture.md):
  * `serving_default`: `images` float32 [N, 32, 32, 3], RGB 0..255 (normalization is inside the model);
  * `serving_bytes`: `image_bytes` string [N], encoded JPEG/PNG/GIF/BMP of any size, decoded, turned
    upright by a JPEG's EXIF Orientation and resized in the graph exactly as the gateway does it
    (trainer/export/graph_image/);
  * outputs of both: `probabilities` float32 [N, C] and `classes` string [N, C];
  * `explain` / `explain_bytes` (Grad-CAM, trainer/export/gradcam.py) when the model has a conv block.

With `tta="flip"` (trainer/export/tta.py, off by default) every signature's `probabilities` is the
mean of the model's on the image and on its horizontal mirror (after the in-graph decode and resize
for the bytes signatures); `classes` stays aligned with those columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from contract.signatures import (
    CHANNELS,
    CLASSES_KEY,
    IMAGE_BYTES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    PROBABILITIES_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
)
from trainer.export.gradcam import add_explain_endpoints, verify_explain
from trainer.export.graph_image.decode import decode_and_resize_batch
from trainer.export.tta import NONE, averaged_probabilities, check

_VERIFICATION_BATCH = 4  # random pixel images the reloaded SavedModel must classify as Keras does


def build_archive(
    model: keras.Model, class_names: Sequence[str], tta: str = NONE
) -> keras.export.ExportArchive:
    """An ExportArchive tracking `model` with every serving signature registered, their
    probabilities averaged over the views `tta` names (trainer/export/tta.py)."""
    check(tta)
    if not class_names:
        raise ValueError("class_names is empty: the exported model must label its outputs")
    names = tf.constant(list(class_names), dtype=tf.string)
    archive = keras.export.ExportArchive()
    archive.track(model)
    _add_predict_endpoints(archive, model, names, tta)
    # Grad-CAM signatures (explain, explain_bytes) when the model has a conv block to explain from.
    add_explain_endpoints(archive, model, names, tta)
    return archive


def _add_predict_endpoints(
    archive: keras.export.ExportArchive, model: keras.Model, class_names: tf.Tensor, tta: str
) -> None:
    """Register `serving_default` (pixels) and `serving_bytes` (encoded images) on `archive`."""

    def predict(images: tf.Tensor) -> tf.Tensor:
        return tf.cast(model(images, training=False), tf.float32)

    def outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = averaged_probabilities(predict(images), predict, images, tta)
        # Class names repeated per row: TensorFlow's classification convention, so any client can
        # label the scores without a side file.
        classes = tf.tile(class_names[tf.newaxis, :], [tf.shape(images)[0], 1])
        return {PROBABILITIES_KEY: probabilities, CLASSES_KEY: classes}

    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(images)

    def serving_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(decode_and_resize_batch(image_bytes))

    archive.add_endpoint(
        SERVING_DEFAULT,
        serving_default,
        input_signature=[
            tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, CHANNELS], tf.float32, name=IMAGES_KEY)
        ],
    )
    archive.add_endpoint(
        SERVING_BYTES,
        serving_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY)],
    )


def export_savedmodel(
    model: keras.Model, class_names: Sequence[str], export_dir: str | Path, tta: str = NONE
) -> Path:
    """Write the SavedModel (graph, variables, signatures) into `export_dir`, which must not exist.
    `tta="flip"` averages every signature's probabilities with the mirrored image's (twice the
    compute per image; trainer/export/tta.py).

    Writes no assets.extra; publish.py adds warmup requests and the model card and makes the
    version visible atomically.
    """
    export_dir = Path(export_dir)
    if export_dir.exists():
        raise FileExistsError(f"{export_dir} already exists; export into a fresh directory")
    num_outputs = int(model.output_shape[-1])
    if num_outputs != len(class_names):
        raise ValueError(
            f"model has {num_outputs} outputs but {len(class_names)} class names were given; "
            "export the run directory whose dataset.json matches its model.keras"
        )
    build_archive(model, class_names, tta).write_out(str(export_dir), verbose=False)
    return export_dir


class ExportVerificationError(RuntimeError):
    """The written SavedModel does not reproduce the Keras model; it must not be published."""


def verify_export(
    model: keras.Model,
    class_names: Sequence[str],
    export_dir: str | Path,
    atol: float = 1e-5,
    tta: str = NONE,
) -> None:
    """Reload `export_dir` and check its signatures reproduce `model` on a few pixel batches
    (averaged over the views `tta` names, as export_savedmodel was asked to).

    Cheap insurance run before publishing: a graph that traced the wrong model state or lost the
    normalization constants is caught here instead of by the server's users.
    """
    loaded = tf.saved_model.load(str(export_dir))
    missing = {SERVING_DEFAULT, SERVING_BYTES} - set(loaded.signatures)
    if missing:
        raise ExportVerificationError(f"{export_dir} lacks signatures {sorted(missing)}")
    shape = (_VERIFICATION_BATCH, INPUT_SIZE, INPUT_SIZE, CHANNELS)
    pixels = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.float32)

    def predict(images: np.ndarray) -> np.ndarray:
        return np.asarray(model(np.ascontiguousarray(images), training=False), dtype=np.float32)

    expected = averaged_probabilities(predict(pixels), predict, pixels, tta)
    _verify_serving_default(loaded, pixels, expected, class_names, atol)
    problem = verify_explain(loaded, tf.constant(pixels), expected, atol)
    if problem:
        raise ExportVerificationError(f"{problem}; not publishing")


def _verify_serving_default(
    loaded: object, pixels: np.ndarray, expected: np.ndarray, class_names: Sequence[str], atol: float
) -> None:
    """Raise ExportVerificationError unless `serving_default` gives the Keras model's probabilities
    (within `atol`) labelled with `class_names`."""
    out = loaded.signatures[SERVING_DEFAULT](**{IMAGES_KEY: tf.constant(pixels)})  # type: ignore[attr-defined]
    difference = float(np.max(np.abs(out[PROBABILITIES_KEY].numpy() - expected)))
    if difference > atol:
        raise ExportVerificationError(
            f"exported probabilities differ from the Keras model by {difference:.2e} (> {atol:.0e}); "
            "not publishing"
        )
    labels = [c.decode() for c in out[CLASSES_KEY].numpy()[0]]
    if labels != list(class_names):
        raise ExportVerificationError(f"exported classes {labels} differ from {list(class_names)}")
