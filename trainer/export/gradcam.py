"""Grad-CAM (Selvaraju et al. 2017) computed inside the exported graph, so TF Serving serves it.

The `explain` / `explain_bytes` signatures take the same images as serving_default / serving_bytes
plus `class_index` int32 [N] (-1 = the top class; a SignatureDef has no optional inputs) and return
`probabilities`, `classes`, `explained_class` int32 [N] (the class each heatmap is for) and
`heatmap` float32 [N, 32, 32] in 0..1.

Heatmap: A = activations of the last convolutional block (layer LAST_CONV_LAYER, see
trainer/models), y = the class score before the softmax; channel weights = spatial mean of dy/dA,
map = ReLU(sum_k w_k A_k), bilinearly upsampled to 32x32 and divided by its per-image maximum
(all zeros when nothing supports the class). The gradient comes from tf.GradientTape at trace
time, so the SavedModel holds plain gradient ops and runs in a tf.compat.v1 Session like the rest.

Test-time augmentation (export --tta flip, trainer/export/tta.py): `probabilities` are averaged with
the mirrored image's exactly as in serving_default, so the signatures agree on the scores and on the
top class (`class_index` -1); the heatmap still explains that class on the image as given, not on
its mirror, so it lines up with the picture the caller sent.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from contract.signatures import (
    CHANNELS,
    CLASS_INDEX_KEY,
    CLASSES_KEY,
    EXPLAIN,
    EXPLAIN_BYTES,
    EXPLAINED_CLASS_KEY,
    HEATMAP_KEY,
    IMAGE_BYTES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    PROBABILITIES_KEY,
    TOP_CLASS,
)
from trainer.export.graph_image.decode import decode_and_resize_batch
from trainer.export.trust import TrustHead, score_tensor
from trainer.export.tta import NONE, averaged_probabilities
from trainer.models import LAST_CONV_LAYER

_CONV_LAYERS = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)


def find_last_conv_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The layer whose activations Grad-CAM weighs: LAST_CONV_LAYER when the model names one,
    else the last layer with a 4-D (spatial) output at or after the last convolution; None for a
    model without convolutional features (an MLP: its only 4-D layers are the input stem's, whose
    "heatmap" would be the pixels' own gradient, not what the classifier looked at)."""
    try:
        return model.get_layer(LAST_CONV_LAYER)
    except ValueError:
        pass
    layers = list(model.layers)
    convs = [i for i, layer in enumerate(layers) if isinstance(layer, _CONV_LAYERS)]
    if not convs:
        return None
    for layer in reversed(layers[convs[-1]:]):
        output = getattr(layer, "output", None)
        if output is not None and len(getattr(output, "shape", ())) == 4:
            return layer
    return None


class GradCAM:
    """Callable: (images float32 [N,32,32,3] 0..255, class_index int32 [N]) -> explain outputs;
    `tta` (trainer/export/tta.py) averages the probabilities as serving_default does. With `trust`
    (trainer/export/trust.py's TrustHead, what serving_default calls) the probabilities are its
    calibrated ones and the outputs add its ood_score and abstain, exactly as serving_default's."""

    def __init__(self, model: keras.Model, tta: str = NONE, trust: TrustHead | None = None) -> None:
        conv = find_last_conv_layer(model)
        if conv is None:
            raise ValueError(
                f"model {model.name!r} has no layer with a spatial (4-D) output; Grad-CAM needs a "
                f"convolutional block, ideally named {LAST_CONV_LAYER!r}"
            )
        score, self._is_logits = score_tensor(model)
        self.conv_layer_name = conv.name
        self._base = model
        self._tta = tta
        self._trust = trust
        # One functional model sharing the trained layers (and their variables) that exposes the
        # conv activations alongside the scores, so one forward pass gives both.
        self._model = keras.Model(model.inputs, [conv.output, score, model.outputs[0]])

    def __call__(self, images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        class_index = tf.cast(class_index, tf.int32)
        with tf.GradientTape() as tape:
            # Watching the input records the whole forward pass, whatever the layers' trainability.
            tape.watch(images)
            activations, score, probabilities = self._model(images, training=False)
            score = tf.cast(score, tf.float32)  # mixed precision: scores and weights in float32
            probabilities = tf.cast(probabilities, tf.float32)
            extra: dict[str, tf.Tensor] = {}
            with tape.stop_recording():  # the mirrored view only scores; its pass needs no gradient
                if self._trust is None:
                    probabilities = averaged_probabilities(probabilities, self._predict, images, self._tta)
                else:  # serving_default's own outputs (the head applies --tta): one more forward pass
                    extra = self._trust(images)
                    probabilities = extra.pop(PROBABILITIES_KEY)
            class_index = _checked_class_index(class_index, tf.shape(images)[0], tf.shape(probabilities)[1])
            top = tf.argmax(probabilities, axis=1, output_type=tf.int32)
            explained = tf.where(class_index == TOP_CLASS, top, class_index)
            if not self._is_logits:
                score = tf.math.log(tf.maximum(score, 1e-12))
            # Images are independent at inference (BN uses moving statistics), so the gradient of
            # the batch sum is each image's own gradient.
            selected = tf.gather(score, explained, axis=1, batch_dims=1)
            total = tf.reduce_sum(selected)
        grads = tf.cast(tape.gradient(total, activations), tf.float32)
        activations = tf.cast(activations, tf.float32)
        heatmap = _cam(activations, grads)
        out = {EXPLAINED_CLASS_KEY: explained, HEATMAP_KEY: heatmap, PROBABILITIES_KEY: probabilities}
        return {**out, **extra}

    def _predict(self, images: tf.Tensor) -> tf.Tensor:
        # The same call serving_default makes, so both signatures' averaged probabilities agree.
        return tf.cast(self._base(images, training=False), tf.float32)


def _checked_class_index(class_index: tf.Tensor, count: tf.Tensor, num_classes: tf.Tensor) -> tf.Tensor:
    """`class_index`, once checked to hold one entry per image, each TOP_CLASS or a class index.

    The checks guard the gather that follows; in a graph, ops with no data or control edge between
    them may run in any order, so the index is routed through the checks.
    """
    checks = [
        tf.debugging.assert_equal(
            tf.shape(class_index)[0],
            count,
            message="class_index must have one entry per image (use -1 for the top class)",
        ),
        tf.debugging.assert_greater_equal(
            class_index,
            TOP_CLASS,
            message="class_index must be -1 (top class) or a class index >= 0",
        ),
        tf.debugging.assert_less(
            class_index, num_classes, message="class_index must be below the number of classes"
        ),
    ]
    with tf.control_dependencies([check for check in checks if check is not None]):
        return tf.identity(class_index)


def _cam(activations: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
    """[N,h,w,K] activations and gradients -> [N,32,32] map in 0..1."""
    weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)  # [N,1,1,K]
    cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1, keepdims=True))  # [N,h,w,1]
    cam = tf.image.resize(cam, [INPUT_SIZE, INPUT_SIZE], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
    # A flat zero map (no positive evidence) stays zero instead of dividing by zero.
    normalized = tf.math.divide_no_nan(cam, peak)
    return tf.clip_by_value(normalized, 0.0, 1.0)


def add_explain_endpoints(
    archive: keras.export.ExportArchive,
    model: keras.Model,
    class_names: tf.Tensor,
    tta: str = NONE,
    trust: TrustHead | None = None,
    decode: Callable[[tf.Tensor], tf.Tensor] = decode_and_resize_batch,
) -> bool:
    """Register `explain` and `explain_bytes` on `archive` (which already tracks `model`);
    `explain_bytes` turns encoded images into pixels with `decode` (savedmodel.shared_decoder).

    Returns False, registering nothing, for a model without a spatial layer to explain from, so
    such models still export with the two contracted signatures.
    """
    if find_last_conv_layer(model) is None:
        return False
    cam = GradCAM(model, tta, trust)

    def cam_outputs(images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        out = cam(images, class_index)
        out[CLASSES_KEY] = tf.tile(class_names[tf.newaxis, :], [tf.shape(images)[0], 1])
        return out

    # One tf.function for both signatures (as savedmodel.shared_decoder): traced once per trace
    # context instead of once per signature.
    pixels = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, CHANNELS], tf.float32)
    classes = tf.TensorSpec([None], tf.int32)
    outputs = tf.function(cam_outputs, input_signature=[pixels, classes], autograph=False)

    def explain(images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(images, class_index)

    def explain_bytes(image_bytes: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(decode(image_bytes), class_index)

    class_spec = tf.TensorSpec([None], tf.int32, name=CLASS_INDEX_KEY)
    archive.add_endpoint(
        EXPLAIN,
        explain,
        input_signature=[
            tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, CHANNELS], tf.float32, name=IMAGES_KEY),
            class_spec,
        ],
    )
    archive.add_endpoint(
        EXPLAIN_BYTES,
        explain_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY), class_spec],
    )
    return True


def verify_explain(
    loaded: object, pixels: tf.Tensor, expected_probabilities: object, atol: float
) -> str | None:
    """Problem with a reloaded SavedModel's `explain` signature, or None when it is sound: its
    probabilities must equal the Keras model's (averaged as the export's --tta asks, like
    `expected_probabilities`) and its heatmaps be finite, in 0..1, [N, 32, 32]."""
    signatures = loaded.signatures  # type: ignore[attr-defined]
    if EXPLAIN not in signatures:
        return None
    count = int(pixels.shape[0])
    out = signatures[EXPLAIN](**{IMAGES_KEY: pixels, CLASS_INDEX_KEY: tf.fill([count], TOP_CLASS)})
    difference = float(np.max(np.abs(out[PROBABILITIES_KEY].numpy() - np.asarray(expected_probabilities))))
    if difference > atol:
        return f"explain probabilities differ from the Keras model by {difference:.2e} (> {atol:.0e})"
    return _heatmap_problem(out[HEATMAP_KEY].numpy(), count)


def _heatmap_problem(heatmap: np.ndarray, count: int) -> str | None:
    if heatmap.shape != (count, INPUT_SIZE, INPUT_SIZE) or not np.all(np.isfinite(heatmap)):
        return f"explain heatmaps have shape {heatmap.shape} or non-finite values"
    if heatmap.min() < 0.0 or heatmap.max() > 1.0:
        return f"explain heatmaps leave 0..1 ({heatmap.min():.3g}..{heatmap.max():.3g})"
    return None
