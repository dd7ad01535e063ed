"""Write a Keras model as a TensorFlow Serving SavedModel with the signatures of the contract.

Signatures (tag `serve`, contract/signatures.py, see docs/architecture.md):
  * `serving_default`: `images` float32 [N, 32, 32, 3], RGB 0..255 (normalization is inside the model);
  * `serving_bytes`: `image_bytes` string [N], encoded JPEG/PNG/GIF/BMP of any size, decoded, turned
    upright by a JPEG's EXIF Orientation and resized in the graph exactly as the gateway does it
    (trainer/export/graph_image/);
  * outputs of both: `probabilities` float32 [N, C] (softmax(logits / T), T the temperature fitted at
    export), `classes` string [N, C], `ood_score` float32 [N] and `abstain` bool [N] (ood_score above
    the threshold chosen at export; trainer/export/trust.py, which every signature's outputs come from);
  * `explain` / `explain_bytes` (Grad-CAM, trainer/export/gradcam.py) when the model has a conv block.

With `tta="flip"` (trainer/export/tta.py, off by default) every signature's `probabilities` is the
mean of the model's on the image and on its horizontal mirror (after the in-graph decode and resize
for the bytes signatures); `classes` stays aligned with those columns.

The signatures run a copy of the model with every batch norm folded into the convolution before it
(fold_batch_norm): at inference a batch norm is a per-channel scale and shift, which the conv's kernel
and bias can carry, so the served graph skips one elementwise pass over every conv block's output.
benchmarks/bn_folding.py measures it against the unfolded export (docs/benchmarks.md); the copy is
used only if it matches the model within FOLD_ATOL, and verify_export checks the written signatures
against the original Keras model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contract.signatures import (
    ABSTAIN_KEY,
    CHANNELS,
    CLASSES_KEY,
    IMAGE_BYTES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    OOD_SCORE_KEY,
    PROBABILITIES_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
)
from trainer.export.gradcam import add_explain_endpoints, verify_explain
from trainer.export.graph_image.decode import decode_and_resize_batch
from trainer.export.trust import TrustHead, TrustParams, expected_outputs
from trainer.export.tta import NONE, check

_VERIFICATION_BATCH = 4  # random pixel images the reloaded SavedModel must classify as Keras does
# Largest probability difference allowed between the folded copy and the model before export falls
# back to the unfolded model: float32 rounding moves probabilities by about 1e-7 (bn_cnn width 64,
# benchmarks/bn_folding.py); ten times the export's own 1e-5 tolerance would hide a wrong fold.
FOLD_ATOL = 1e-6

log = logging.getLogger(__name__)


def build_archive(
    model: keras.Model,
    class_names: Sequence[str],
    tta: str = NONE,
    fold_bn: bool = True,
    trust: TrustParams | None = None,
) -> keras.export.ExportArchive:
    """An ExportArchive tracking `model` (its batch-norm-folded copy unless `fold_bn` is False) with
    every serving signature registered, their probabilities averaged over the views `tta` names
    (trainer/export/tta.py) and calibrated by `trust`'s temperature, with its ood_score and abstain
    (trainer/export/trust.py; None: temperature 1, never abstaining)."""
    check(tta)
    if not class_names:
        raise ValueError("class_names is empty: the exported model must label its outputs")
    names = tf.constant(list(class_names), dtype=tf.string)
    # Every signature, Grad-CAM's included, runs the folded copy: one set of weights in the SavedModel,
    # and explain's probabilities stay those of serving_default.
    served = serving_model(model) if fold_bn else model
    archive = keras.export.ExportArchive()
    archive.track(served)
    head = TrustHead(served, trust or TrustParams(), tta)
    decode = shared_decoder()
    _add_predict_endpoints(archive, head, names, decode)
    # Grad-CAM signatures (explain, explain_bytes) when the model has a conv block to explain from.
    add_explain_endpoints(archive, served, names, tta, head, decode)
    return archive


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of `model` with every batch norm that directly follows a convolution folded into that
    convolution's kernel and bias; `model` itself if it has none (or is not a functional model).

    For inference only: the moving statistics become constants of the conv (kernel x gamma /
    sqrt(var + eps) per output channel, bias (bias - mean) x that + beta). Layer names are kept, so
    Grad-CAM still finds "last_conv". A batch norm whose input is not a plain Conv2D used by nothing
    else, or that normalizes another axis than the channels, is left in place.
    """
    if isinstance(model, keras.Sequential) or not hasattr(model, "_run_through_graph"):
        return model  # clone_model can rewire only functional graphs
    foldable: dict[str, keras.layers.BatchNormalization] = {}  # conv name -> the batch norm after it
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        parents = layer._inbound_nodes[0].parent_nodes
        conv = parents[0].operation if len(parents) == 1 else None
        if (
            type(conv) is keras.layers.Conv2D  # a subclass may compute something else
            and conv.data_format == "channels_last"
            and layer.axis in (-1, 3)
            and len(conv._inbound_nodes) == 1
            and len(conv._outbound_nodes) == 1  # its raw output feeds only the batch norm
        ):
            foldable[conv.name] = layer
    if not foldable:
        return model
    folded_names = {bn.name for bn in foldable.values()}

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if layer.name in foldable:
            config["use_bias"] = True  # the batch norm's shift becomes the bias
        return layer.__class__.from_config(config)

    def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        # A folded batch norm leaves the graph: its input goes straight on, its conv does its work.
        return args[0] if layer.name in folded_names else layer(*args, **kwargs)

    folded = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for layer in model.layers:
        if layer.name in folded_names:
            continue
        target = folded.get_layer(layer.name)
        if layer.name not in foldable:
            target.set_weights(layer.get_weights())
            continue
        bn = foldable[layer.name]
        # float64 for the arithmetic, so the copy differs from the model only by its own rounding.
        kernel = np.asarray(layer.kernel, dtype=np.float64)
        bias = np.asarray(layer.bias, dtype=np.float64) if layer.use_bias else 0.0
        mean = np.asarray(bn.moving_mean, dtype=np.float64)
        variance = np.asarray(bn.moving_variance, dtype=np.float64)
        gamma = np.asarray(bn.gamma, dtype=np.float64) if bn.scale else 1.0
        beta = np.asarray(bn.beta, dtype=np.float64) if bn.center else 0.0
        factor = gamma / np.sqrt(variance + bn.epsilon)  # per output channel (the kernel's last axis)
        dtype = np.dtype(target.kernel.dtype)
        target.set_weights([(kernel * factor).astype(dtype), ((bias - mean) * factor + beta).astype(dtype)])
    return folded


def serving_model(model: keras.Model) -> keras.Model:
    """What the signatures run: the batch-norm-folded copy of `model` when it agrees with `model`
    within FOLD_ATOL on random pixel images, else `model` itself (logged: the export stays correct)."""
    folded = fold_batch_norm(model)
    if folded is model:
        return model
    shape = (_VERIFICATION_BATCH, INPUT_SIZE, INPUT_SIZE, CHANNELS)
    pixels = np.random.default_rng(1).integers(0, 256, size=shape).astype(np.float32)
    expected = np.asarray(model(pixels, training=False), dtype=np.float32)
    got = np.asarray(folded(pixels, training=False), dtype=np.float32)
    difference = float(np.max(np.abs(got - expected)))
    if difference > FOLD_ATOL:
        log.warning("batch-norm folding changed probabilities by %.1e (> %.0e): exporting unfolded",
                    difference, FOLD_ATOL)  # fmt: skip
        return model
    return folded


def shared_decoder() -> Callable[[tf.Tensor], tf.Tensor]:
    """`decode_and_resize_batch` as one tf.function for every bytes signature of an export.

    Its graph is the largest part of tracing (~1.3 s a trace on 2 CPU cores), and every signature is
    traced twice per export: once by the ExportArchive to list its variables, once more by
    tf.saved_model.save (the save context is part of TensorFlow's trace cache key). Shared, the
    decoding is traced twice per export instead of twice per bytes signature. Autograph off, as
    Keras traces the signatures themselves.
    """
    return tf.function(
        decode_and_resize_batch,
        input_signature=[tf.TensorSpec([None], tf.string)],
        autograph=False,
    )


def _add_predict_endpoints(
    archive: keras.export.ExportArchive,
    head: TrustHead,
    class_names: tf.Tensor,
    decode: Callable[[tf.Tensor], tf.Tensor],
) -> None:
    """Register `serving_default` (pixels) and `serving_bytes` (encoded images, to pixels by
    `decode`) on `archive`."""

    def head_outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
        out = head(images)  # calibrated probabilities, ood_score, abstain (averaged as --tta asks)
        # Class names repeated per row: TensorFlow's classification convention, so any client can
        # label the scores without a side file.
        out[CLASSES_KEY] = tf.tile(class_names[tf.newaxis, :], [tf.shape(images)[0], 1])
        return out

    # One tf.function for both signatures, like the decoder (shared_decoder): traced once per trace
    # context instead of once per signature.
    pixels = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, CHANNELS], tf.float32)
    outputs = tf.function(head_outputs, input_signature=[pixels], autograph=False)

    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(images)

    def serving_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(decode(image_bytes))

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
    model: keras.Model,
    class_names: Sequence[str],
    export_dir: str | Path,
    tta: str = NONE,
    fold_bn: bool = True,
    trust: TrustParams | None = None,
) -> Path:
    """Write the SavedModel (graph, variables, signatures) into `export_dir`, which must not exist.
    `tta="flip"` averages every signature's probabilities with the mirrored image's (twice the
    compute per image; trainer/export/tta.py). `fold_bn=False` serves the model as it is, without
    folding its batch norms (what benchmarks/bn_folding.py compares against). `trust`: the temperature,
    OOD score and threshold trainer/export/trust.py fitted (None: uncalibrated, never abstaining).

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
    build_archive(model, class_names, tta, fold_bn, trust).write_out(str(export_dir), verbose=False)
    return export_dir


class ExportVerificationError(RuntimeError):
    """The written SavedModel does not reproduce the Keras model; it must not be published."""


def verify_export(
    model: keras.Model,
    class_names: Sequence[str],
    export_dir: str | Path,
    atol: float = 1e-5,
    tta: str = NONE,
    trust: TrustParams | None = None,
) -> None:
    """Reload `export_dir` and check its signatures reproduce `model` on a few pixel batches
    (averaged over the views `tta` names and calibrated by `trust`, as export_savedmodel was asked to).

    Cheap insurance run before publishing: a graph that traced the wrong model state or lost the
    normalization constants is caught here instead of by the server's users.
    """
    loaded = tf.saved_model.load(str(export_dir))
    missing = {SERVING_DEFAULT, SERVING_BYTES} - set(loaded.signatures)
    if missing:
        raise ExportVerificationError(f"{export_dir} lacks signatures {sorted(missing)}")
    shape = (_VERIFICATION_BATCH, INPUT_SIZE, INPUT_SIZE, CHANNELS)
    pixels = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.float32)

    expected = expected_outputs(model, pixels, trust or TrustParams(), tta)
    _verify_serving_default(loaded, pixels, expected, class_names, atol)
    problem = verify_explain(loaded, tf.constant(pixels), expected[PROBABILITIES_KEY], atol)
    if problem:
        raise ExportVerificationError(f"{problem}; not publishing")


def _verify_serving_default(
    loaded: object,
    pixels: np.ndarray,
    expected: dict[str, np.ndarray],
    class_names: Sequence[str],
    atol: float,
) -> None:
    """Raise ExportVerificationError unless `serving_default` gives the Keras model's calibrated
    probabilities and ood_score (within `atol`, relative for the score) labelled with `class_names`."""
    out = loaded.signatures[SERVING_DEFAULT](**{IMAGES_KEY: tf.constant(pixels)})  # type: ignore[attr-defined]
    missing = {OOD_SCORE_KEY, ABSTAIN_KEY} - set(out)
    if missing:
        raise ExportVerificationError(f"{SERVING_DEFAULT} lacks outputs {sorted(missing)}; not publishing")
    difference = float(np.max(np.abs(out[PROBABILITIES_KEY].numpy() - expected[PROBABILITIES_KEY])))
    if difference > atol:
        raise ExportVerificationError(
            f"exported probabilities differ from the Keras model by {difference:.2e} (> {atol:.0e}); "
            "not publishing"
        )
    # An energy score is a logit-sized number: compare it relative to its size.
    scores, wanted = out[OOD_SCORE_KEY].numpy(), expected[OOD_SCORE_KEY]
    if not np.allclose(scores, wanted, atol=atol, rtol=1e-4):
        raise ExportVerificationError(
            f"exported ood_score {scores} differs from the Keras model's {wanted}; not publishing"
        )
    labels = [c.decode() for c in out[CLASSES_KEY].numpy()[0]]
    if labels != list(class_names):
        raise ExportVerificationError(f"exported classes {labels} differ from {list(class_names)}")
