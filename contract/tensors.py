"""NumPy <-> TensorProto for TensorFlow Serving's gRPC API, for every caller (gateway and clients).

Only the dtypes the exported signatures use: float32 (pixels, probabilities, heatmaps, ood_score), int32
(class indices), bool (abstain) and strings (encoded images, class labels). Built by hand rather than with
tf.make_tensor_proto / tf.make_ndarray: numbers travel as one tensor_content buffer (a single memcpy,
much cheaper than make_tensor_proto's per-value path), and decoding reads either form a server may
answer in: tensor_content (--use_tensor_content) or the typed repeated fields (TF Serving's default).
Byte order on the wire is little-endian whatever the host's.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

# dtype enum -> (wire dtype of tensor_content, name of the typed repeated field)
_NUMERIC = {
    types_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    types_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    types_pb2.DT_BOOL: (np.dtype("?"), "bool_val"),  # one byte per value in tensor_content
}
# Encoded: what the signatures take as inputs (bool is only ever an answer, `abstain`).
_BY_NUMPY = {np.dtype(np.float32): types_pb2.DT_FLOAT, np.dtype(np.int32): types_pb2.DT_INT32}


def shape_of(proto: tensor_pb2.TensorProto) -> tuple[int, ...]:
    """The tensor's shape as a tuple of sizes."""
    return tuple(d.size for d in proto.tensor_shape.dim)


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """float32 -> DT_FLOAT, int32 -> DT_INT32, bytes/str/object -> DT_STRING (str as UTF-8).

    Other dtypes raise TypeError: cast first (e.g. uint8 pixels to float32), so what goes on the
    wire is always the signature's declared dtype, never a guess.
    """
    array = np.asarray(array)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
    )
    if array.dtype.kind in "OSU":
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape)
        proto.string_val.extend(
            value.encode("utf-8") if isinstance(value, str) else bytes(value) for value in array.reshape(-1)
        )
        return proto
    dtype = _BY_NUMPY.get(array.dtype.newbyteorder("="))
    if dtype is None:
        raise TypeError(f"no TensorProto encoding for dtype {array.dtype}; cast to float32 or int32 first")
    wire, _ = _NUMERIC[dtype]
    content = np.ascontiguousarray(array, dtype=wire).tobytes()
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=content)


def to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """DT_FLOAT -> float32, DT_INT32 -> int32, DT_BOOL -> bool, DT_STRING -> object array of bytes, in the
    proto's shape.

    The array is the caller's own (writable, not a view of the message). TypeError for any other
    dtype; ValueError when the values do not fill the shape.
    """
    shape = shape_of(proto)
    if proto.dtype == types_pb2.DT_STRING:
        return np.asarray(list(proto.string_val), dtype=object).reshape(shape)
    if proto.dtype not in _NUMERIC:
        name = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else "?"
        raise TypeError(f"no NumPy decoding for TensorProto dtype {proto.dtype} ({name})")
    wire, field = _NUMERIC[proto.dtype]
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype=wire)
    else:
        flat = np.asarray(getattr(proto, field), dtype=wire)
    return flat.astype(wire.newbyteorder("=")).reshape(shape)  # astype copies: frombuffer is read-only
