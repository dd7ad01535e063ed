"""NumPy <-> TensorProto: round trips through real, serialized protos, and both answer forms decode."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from contract.tensors import shape_of, to_ndarray, to_tensor_proto


def over_the_wire(proto: tensor_pb2.TensorProto) -> tensor_pb2.TensorProto:
    """The proto as the other side receives it: serialized and parsed again."""
    return tensor_pb2.TensorProto.FromString(proto.SerializeToString())


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5), (4, 32, 32, 3), (1, 0, 3)])
def test_float32_round_trips_in_shape(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    proto = over_the_wire(to_tensor_proto(array))
    assert proto.dtype == types_pb2.DT_FLOAT and shape_of(proto) == shape
    out = to_ndarray(proto)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_int32_round_trips_in_shape(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int32)
    proto = over_the_wire(to_tensor_proto(array))
    assert proto.dtype == types_pb2.DT_INT32
    out = to_ndarray(proto)
    assert out.dtype == np.int32 and out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_strings_round_trip_as_bytes_in_shape() -> None:
    array = np.array([[b"cat", b"\x00\xff binary"], [b"", b"dog"]], dtype=object)
    proto = over_the_wire(to_tensor_proto(array))
    assert proto.dtype == types_pb2.DT_STRING and shape_of(proto) == (2, 2)
    out = to_ndarray(proto)
    assert out.dtype == object and out.shape == (2, 2) and out.tolist() == array.tolist()


def test_str_is_sent_as_utf8() -> None:
    proto = to_tensor_proto(np.array(["caf\u00e9", "ship"]))
    assert list(proto.string_val) == ["caf\u00e9".encode(), b"ship"]
    assert to_ndarray(proto).tolist() == ["caf\u00e9".encode(), b"ship"]


def test_tensorflow_reads_what_we_write() -> None:
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    classes = np.array([3, -1], dtype=np.int32)
    encoded = np.array([b"\x89PNG", b"\xff\xd8"], dtype=object)
    np.testing.assert_array_equal(tf.make_ndarray(to_tensor_proto(pixels)), pixels)
    np.testing.assert_array_equal(tf.make_ndarray(to_tensor_proto(classes)), classes)
    assert tf.make_ndarray(to_tensor_proto(encoded)).tolist() == encoded.tolist()


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0.25, 1.0], [0.5, -2.0]], dtype=np.float32),
        np.array([[7, -1], [0, 2]], dtype=np.int32),
        np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object),
    ],
)
def test_we_read_tensorflows_typed_fields(array: np.ndarray) -> None:
    # TF Serving answers in float_val / int_val / string_val unless started with --use_tensor_content.
    proto = tf.make_tensor_proto(array)
    proto.ClearField("tensor_content")
    if array.dtype == np.float32:
        proto.float_val.extend(array.reshape(-1).tolist())
    elif array.dtype == np.int32:
        proto.int_val.extend(array.reshape(-1).tolist())
    out = to_ndarray(over_the_wire(proto))
    assert out.shape == array.shape and out.tolist() == array.tolist()


def test_big_endian_input_is_sent_little_endian() -> None:
    array = np.array([1.5, -2.0], dtype=">f4")
    proto = to_tensor_proto(array)
    assert proto.tensor_content == np.array([1.5, -2.0], dtype="<f4").tobytes()
    np.testing.assert_array_equal(to_ndarray(proto), [1.5, -2.0])


def test_non_contiguous_input_is_encoded_in_logical_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a transposed view
    np.testing.assert_array_equal(to_ndarray(to_tensor_proto(array)), array)


def test_decoded_arrays_are_writable_copies() -> None:
    out = to_ndarray(to_tensor_proto(np.zeros(3, np.float32)))
    out[0] = 1.0
    assert out[0] == 1.0


@pytest.mark.parametrize("dtype", [np.uint8, np.float64, np.int64, np.bool_])
def test_other_dtypes_must_be_cast_first(dtype: type) -> None:
    with pytest.raises(TypeError, match="cast"):
        to_tensor_proto(np.zeros(2, dtype=dtype))


def test_an_unsupported_answer_dtype_is_a_type_error() -> None:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, double_val=[1.0])
    with pytest.raises(TypeError, match="DT_DOUBLE"):
        to_ndarray(proto)


def test_values_that_do_not_fill_the_shape_are_a_value_error() -> None:
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3)])
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[1.0, 2.0])
    with pytest.raises(ValueError):
        to_ndarray(proto)
