"""Calling the exported `explain` signature (Grad-CAM, trainer/export/gradcam.py) from either backend.

The backends' `explain(images, class_index=None)` methods delegate here: the embedded one calls the
loaded SavedModel's signature in process, the TF Serving one sends a PredictRequest naming the
`explain` signature over gRPC. Both return an Explanation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from serving.backends.base import BackendError

EXPLAIN_SIGNATURE = "explain"
IMAGES_KEY = "images"
CLASS_INDEX_KEY = "class_index"
PROBABILITIES_KEY = "probabilities"
CLASSES_KEY = "classes"
HEATMAP_KEY = "heatmap"
EXPLAINED_CLASS_KEY = "explained_class"
TOP_CLASS = -1  # class_index meaning "the predicted class"
OUTPUT_KEYS = (PROBABILITIES_KEY, CLASSES_KEY, HEATMAP_KEY, EXPLAINED_CLASS_KEY)


@dataclass(frozen=True)
class Explanation:
    probabilities: np.ndarray  # float32 [N, C]
    heatmaps: np.ndarray  # float32 [N, 32, 32], 0..1: where the evidence for explained_class sits
    explained_class: np.ndarray  # int32 [N]: the class each heatmap explains
    class_names: tuple[str, ...]
    model_name: str
    model_version: int


class ExplainUnsupported(Exception):
    """The served model version has no `explain` signature (exported before Grad-CAM existed, or a
    model without convolutional layers): re-export it to get explanations. Deliberately not a
    BackendError: the gateway answers it 501 (a missing feature), not 502 (a failing backend)."""


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
    return Explanation(probabilities, heatmaps, explained, class_names, model_name, model_version)


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


def _tensor(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
    )
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=array.tobytes())


def explain_request(
    model_name: str, images: np.ndarray, class_index: int | None
) -> predict_pb2.PredictRequest:
    """A PredictRequest for the `explain` signature (float32 pixels + int32 class indices)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = EXPLAIN_SIGNATURE
    request.inputs[IMAGES_KEY].CopyFrom(
        _tensor(np.ascontiguousarray(images, dtype="<f4"), types_pb2.DT_FLOAT)
    )
    request.inputs[CLASS_INDEX_KEY].CopyFrom(
        _tensor(class_indices(len(images), class_index).astype("<i4"), types_pb2.DT_INT32)
    )
    return request


def _array(proto: tensor_pb2.TensorProto, key: str) -> np.ndarray:
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if proto.dtype == types_pb2.DT_FLOAT:
        flat = (
            np.frombuffer(proto.tensor_content, "<f4")
            if proto.tensor_content
            else np.asarray(proto.float_val)
        )
        return flat.astype(np.float32).reshape(shape)
    if proto.dtype == types_pb2.DT_INT32:
        flat = (
            np.frombuffer(proto.tensor_content, "<i4") if proto.tensor_content else np.asarray(proto.int_val)
        )
        return flat.astype(np.int32).reshape(shape)
    if proto.dtype == types_pb2.DT_STRING:
        return np.asarray(list(proto.string_val), dtype=object).reshape(shape)
    raise BackendError(f"TensorFlow Serving returned {key} of unexpected dtype {proto.dtype}")


def parse_explain_response(response: predict_pb2.PredictResponse, count: int, model_name: str) -> Explanation:
    missing = [key for key in OUTPUT_KEYS if key not in response.outputs]
    if missing:
        raise BackendError(f"TensorFlow Serving's explain response lacks outputs {missing}")
    outputs = {key: _array(response.outputs[key], key) for key in OUTPUT_KEYS}
    return _checked(
        outputs, count, response.model_spec.name or model_name, int(response.model_spec.version.value)
    )


def is_missing_signature(error: BackendError) -> bool:
    """TF Serving answers FAILED_PRECONDITION 'Serving signature key "explain" not found.'"""
    text = str(error)
    return "FAILED_PRECONDITION" in text and EXPLAIN_SIGNATURE in text and "not found" in text
