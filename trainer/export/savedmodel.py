"""Write a Keras model as a TensorFlow Serving SavedModel with the two signatures of the contract.

Signatures (tag `serve`, see docs/architecture.md):
  * `serving_default`: `images` float32 [N, 32, 32, 3], RGB 0..255 (normalization is inside the model);
  * `serving_bytes`: `image_bytes` string [N], encoded JPEG/PNG/GIF/BMP of any size, decoded and
    resized in the graph exactly as the gateway does it in serving/preprocess.py;
  * outputs of both: `probabilities` float32 [N, C] and `classes` string [N, C].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

INPUT_SIZE = 32  # must equal serving.preprocess.INPUT_SIZE
SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
PROBABILITIES_KEY = "probabilities"
CLASSES_KEY = "classes"


def decode_and_resize(encoded: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string) -> float32 [32, 32, 3] holding integer pixel values 0..255.

    Mirrors serving/preprocess.py (Pillow BILINEAR): decode to RGB, antialiased bilinear resize,
    round to integers. JPEGs go through decode_jpeg with INTEGER_ACCURATE because that is libjpeg's default
    IDCT (JDCT_ISLOW), the one Pillow uses; decode_image would pick the faster, less exact IDCT and
    disagree with the gateway by a few levels per pixel.
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.cast(tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"), tf.float32),
        lambda: tf.cond(
            tf.strings.substr(encoded, 0, 3) == b"GIF",
            # expand_animations=False: a GIF gives its first frame as [H, W, 3], like Pillow's open().
            lambda: tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), tf.float32),
            lambda: _composite_on_white(tf.io.decode_image(encoded, channels=4, expand_animations=False)),
        ),
    )
    image.set_shape([None, None, 3])
    # Pillow resizes in two separable passes, horizontal then vertical, and rounds to uint8 after
    # each; doing the same here (instead of one 2-D pass) makes the pixels identical to the gateway's
    # for most sizes and at most 1 level off for a fraction of a percent of pixels otherwise (Pillow's
    # fixed-point filter weights); tests/trainer/test_export_parity.py measures it. A pass whose size
    # already is 32 is the identity (triangle filter at scale 1, half-pixel centres), as in Pillow.
    height = tf.shape(image)[0]
    wide = _round_half_up(tf.image.resize(image, [height, INPUT_SIZE], method="bilinear", antialias=True))
    return _round_half_up(tf.image.resize(wide, [INPUT_SIZE, INPUT_SIZE], method="bilinear", antialias=True))


def _composite_on_white(rgba: tf.Tensor) -> tf.Tensor:
    """RGBA uint8 -> RGB float32 over a white background, as the gateway's Pillow path does
    (serving/preprocess.py `to_rgb`: `Image.alpha_composite` on white, rounded); an opaque image
    (alpha 255 everywhere, also what PNGs and BMPs without alpha decode to) is unchanged."""
    rgba = tf.cast(rgba, tf.float32)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return _round_half_up((rgb * alpha + 255.0 * (255.0 - alpha)) / 255.0)


def _round_half_up(pixels: tf.Tensor) -> tf.Tensor:
    # floor(x + 0.5), not tf.round: Pillow rounds halves up, tf.round rounds them to even, and exact
    # halves are common (e.g. 2x downscales).
    return tf.clip_by_value(tf.floor(pixels + 0.5), 0.0, 255.0)


def build_archive(model: keras.Model, class_names: Sequence[str]) -> keras.export.ExportArchive:
    """An ExportArchive tracking `model` with both serving signatures registered."""
    if not class_names:
        raise ValueError("class_names is empty: the exported model must label its outputs")
    names = tf.constant(list(class_names), dtype=tf.string)

    def outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(model(images, training=False), tf.float32)
        # Class names repeated per row: TensorFlow's classification convention, so any client can
        # label the scores without a side file.
        classes = tf.tile(names[tf.newaxis, :], [tf.shape(images)[0], 1])
        return {PROBABILITIES_KEY: probabilities, CLASSES_KEY: classes}

    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(images)

    def serving_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            decode_and_resize,
            image_bytes,
            fn_output_signature=tf.TensorSpec([INPUT_SIZE, INPUT_SIZE, 3], tf.float32),
        )
        return outputs(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_DEFAULT,
        serving_default,
        input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32, name=IMAGES_KEY)],
    )
    archive.add_endpoint(
        SERVING_BYTES,
        serving_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY)],
    )
    # Grad-CAM signatures (explain, explain_bytes) when the model has a conv block to explain from.
    from trainer.export.gradcam import add_explain_endpoints  # local: gradcam imports this module

    add_explain_endpoints(archive, model, names)
    return archive


def export_savedmodel(model: keras.Model, class_names: Sequence[str], export_dir: str | Path) -> Path:
    """Write the SavedModel (graph, variables, signatures) into `export_dir`, which must not exist.

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
    build_archive(model, class_names).write_out(str(export_dir), verbose=False)
    return export_dir


class ExportVerificationError(RuntimeError):
    """The written SavedModel does not reproduce the Keras model; it must not be published."""


def verify_export(
    model: keras.Model, class_names: Sequence[str], export_dir: str | Path, atol: float = 1e-5
) -> None:
    """Reload `export_dir` and check `serving_default` reproduces `model` on a few pixel batches.

    Cheap insurance run before publishing: a graph that traced the wrong model state or lost the
    normalization constants is caught here instead of by the server's users.
    """
    import numpy as np

    loaded = tf.saved_model.load(str(export_dir))
    missing = {SERVING_DEFAULT, SERVING_BYTES} - set(loaded.signatures)
    if missing:
        raise ExportVerificationError(f"{export_dir} lacks signatures {sorted(missing)}")
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32)
    out = loaded.signatures[SERVING_DEFAULT](**{IMAGES_KEY: tf.constant(pixels)})
    expected = np.asarray(model(pixels, training=False), dtype=np.float32)
    difference = float(np.max(np.abs(out[PROBABILITIES_KEY].numpy() - expected)))
    if difference > atol:
        raise ExportVerificationError(
            f"exported probabilities differ from the Keras model by {difference:.2e} (> {atol:.0e}); "
            "not publishing"
        )
    labels = [c.decode() for c in out[CLASSES_KEY].numpy()[0]]
    if labels != list(class_names):
        raise ExportVerificationError(f"exported classes {labels} differ from {list(class_names)}")
    from trainer.export.gradcam import verify_explain  # local: gradcam imports this module

    problem = verify_explain(loaded, tf.constant(pixels), expected, atol)
    if problem:
        raise ExportVerificationError(f"{problem}; not publishing")
