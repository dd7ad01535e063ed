"""Calling the exported `explain` signature (Grad-CAM, trainer/export/gradcam.py) from either backend.

The backends' `explain(images, class_index=None)` methods delegate here: the embedded one calls the
loaded SavedModel's signature in process, the TF Serving one sends a PredictRequest naming the
`explain` signature over gRPC. Both return an Explanation (serving/backends/base.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

from contract.signatures import (
    ABSTAIN_KEY,
    CLASS_INDEX_KEY,
    CLASSES_KEY,
    EXPLAINED_CLASS_KEY,
    HEATMAP_KEY,
    IMAGES_KEY,
    OOD_SCORE_KEY,
    PROBABILITIES_KEY,
    TOP_CLASS,
)
from contract.signatures import EXPLAIN as EXPLAIN_SIGNATURE
from contract.signatures import EXPLAIN_OUTPUT_KEYS as OUTPUT_KEYS
from contract.tensors import to_ndarray, to_tensor_proto
from serving.backends.base import BackendError, ExplainUnsupported, Explanation, ood_fields


def class_indices(count: int, class_index: int | None) -> np.ndarray:
    """int32 [count]: the same requested class for every image, or TOP_CLASS."""
    return np.full(count, TOP_CLASS if class_index is None else int(class_index), dtype=np.int32)


def unsupported(model_name: str, where: str, detail: str) -> ExplainUnsupported:
    return ExplainUnsupported(
        f"model {model_name!r} {where} has no {EXPLAIN_SIGNATURE!r} signature ({detail}); "
        "re-export it with `python -m trainer export` to serve explanations"
    )


def _checked(outputs: dict[str, np.ndarray], count: int, model_name: str, model_version: int) -> Explanation:
    probabilities = np.asarray(outputs[PROBABILITIES_KEY], dtype=np.float32)
    heatmaps = np.asarray(outputs[HEATMAP_KEY], dtype=np.float32)
    explained = np.asarray(outputs[EXPLAINED_CLASS_KEY], dtype=np.int32)
    if probabilities.ndim != 2 or len(probabilities) != count or heatmaps.shape[:1] != (count,):
        raise BackendError(
            f"explain returned probabilities {probabilities.shape} and heatmaps {heatmaps.shape} "
            f"for {count} images"
        )
    classes = outputs[CLASSES_KEY]
    names = tuple(
        c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in np.asarray(classes).reshape(-1)
    )
    class_names = names[: probabilities.shape[1]]
    return Explanation(
        probabilities,
        heatmaps,
        explained,
        class_names,
        model_name,
        model_version,
        **ood_fields(outputs, count),  # versions exported with the out-of-distribution outputs
    )


def explain_saved_model(
    saved_model: Any,
    images: np.ndarray,
    class_index: int | None,
    *,
    model_name: str,
    model_version: int,
) -> Explanation:
    """Run a tf.saved_model.load()ed model's `explain` signature in process."""
    import tensorflow as tf

    signatures = saved_model.signatures
    if EXPLAIN_SIGNATURE not in signatures:
        raise unsupported(model_name, f"version {model_version}", f"it has {sorted(signatures)}")
    outputs = signatures[EXPLAIN_SIGNATURE](
        **{
            IMAGES_KEY: tf.constant(np.asarray(images, dtype=np.float32)),
            CLASS_INDEX_KEY: tf.constant(class_indices(len(images), class_index)),
        }
    )
    return _checked({k: v.numpy() for k, v in outputs.items()}, len(images), model_name, model_version)


def explain_request(
    model_name: str, images: np.ndarray, class_index: int | None
) -> predict_pb2.PredictRequest:
    """A PredictRequest for the `explain` signature (float32 pixels + int32 class indices)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = EXPLAIN_SIGNATURE
    request.inputs[IMAGES_KEY].CopyFrom(to_tensor_proto(np.asarray(images, dtype=np.float32)))
    request.inputs[CLASS_INDEX_KEY].CopyFrom(to_tensor_proto(class_indices(len(images), class_index)))
    return request


def _array(proto: tensor_pb2.TensorProto, key: str) -> np.ndarray:
    try:
        return to_ndarray(proto)
    except TypeError:  # a dtype the contract never answers with
        raise BackendError(f"TensorFlow Serving returned {key} of unexpected dtype {proto.dtype}") from None


def parse_explain_response(response: predict_pb2.PredictResponse, count: int, model_name: str) -> Explanation:
    missing = [key for key in OUTPUT_KEYS if key not in response.outputs]
    if missing:
        raise BackendError(f"TensorFlow Serving's explain response lacks outputs {missing}")
    present = [key for key in (OOD_SCORE_KEY, ABSTAIN_KEY) if key in response.outputs]  # newer exports
    outputs = {key: _array(response.outputs[key], key) for key in (*OUTPUT_KEYS, *present)}
    return _checked(
        outputs, count, response.model_spec.name or model_name, int(response.model_spec.version.value)
    )


def is_missing_signature(error: BackendError) -> bool:
    """TF Serving answers FAILED_PRECONDITION 'Serving signature key "explain" not found.'"""
    text = str(error)
    return "FAILED_PRECONDITION" in text and EXPLAIN_SIGNATURE in text and "not found" in text
