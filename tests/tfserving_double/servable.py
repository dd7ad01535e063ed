"""One loaded model version, run the way TensorFlow Serving runs it.

TensorFlow Serving loads a SavedModel into a TF1-style Session (`LoadSavedModel` with tag `serve`)
and runs a signature by feeding the SignatureDef's input tensor names and fetching its output
tensor names. Doing the same here (instead of `tf.saved_model.load` and calling concrete
functions) means a SavedModel that works against this double also works against the real server,
and the validation mirrors predict_util.cc: the error codes and message wording are TF Serving's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from tests.tfserving_session import TFServingSession

SERVE_TAG = "serve"
# TensorFlow's own error codes share their numbers with gRPC's status codes.
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """An error TF Serving would return: a gRPC status code and TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _dtype_name(dtype_enum: int) -> str:
    # "float", "string", "int32": the spelling TensorFlow's C++ errors use (DataTypeString).
    return tf.dtypes.as_dtype(dtype_enum).name.replace("float32", "float")


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """ndarray -> TensorProto in the repeated `*_val` fields, as TF Serving answers by default
    (`Tensor::AsProtoField`; tensor_content only with --use_tensor_content), so clients that read
    `float_val` directly work against this double too."""
    proto = tensor_pb2.TensorProto()
    dtype = tf.dtypes.as_dtype(array.dtype if array.dtype.kind not in "OSU" else tf.string)
    proto.dtype = dtype.as_datatype_enum
    for size in array.shape:
        proto.tensor_shape.dim.add(size=int(size))
    flat = array.ravel()
    if dtype == tf.string:
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    elif dtype == tf.float32:
        proto.float_val.extend(flat.tolist())
    elif dtype == tf.float64:
        proto.double_val.extend(flat.tolist())
    elif dtype == tf.int64:
        proto.int64_val.extend(flat.tolist())
    elif dtype in (tf.int32, tf.int16, tf.int8, tf.uint8):
        proto.int_val.extend(flat.tolist())
    elif dtype == tf.bool:
        proto.bool_val.extend(flat.tolist())
    else:
        return tf.make_tensor_proto(array)
    return proto


class Servable:
    """A SavedModel version loaded into its own Graph and Session."""

    def __init__(self, name: str, version: int, path: Path) -> None:
        self.name = name
        self.version = version
        self.path = Path(path)
        # The shared loader (tests/tfserving_session.py) is the one the export tests trust too.
        self._session = TFServingSession.load(self.path, (SERVE_TAG,))
        self.signature_defs: Mapping[str, meta_graph_pb2.SignatureDef] = self._session.signature_defs

    def close(self) -> None:
        self._session.close()

    def signature(self, signature_name: str) -> meta_graph_pb2.SignatureDef:
        # An empty name means the default, as in TF Serving (kDefaultServingSignatureDefKey).
        key = signature_name or tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
        if key not in self.signature_defs:
            # predict_util.cc returns FAILED_PRECONDITION here, not NOT_FOUND or INVALID_ARGUMENT.
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.'
            )
        return self.signature_defs[key]

    def predict(
        self,
        signature_name: str,
        inputs: Mapping[str, tensor_pb2.TensorProto],
        output_filter: Iterable[str] = (),
    ) -> dict[str, tensor_pb2.TensorProto]:
        """Validate like TF Serving (its codes and wording), run the session, return alias -> TensorProto."""
        signature = self.signature(signature_name)
        key = signature_name or tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
        feeds = self._feeds(signature, inputs)
        fetch_aliases = self._fetch_aliases(signature, list(output_filter))
        try:
            values = self._session.run(key, feeds, fetch_aliases)
        except tf.errors.OpError as err:
            raise ServingError(
                _CODES_BY_VALUE.get(err.error_code, grpc.StatusCode.INTERNAL), err.message
            ) from err
        except (ValueError, TypeError) as err:  # Python-side feed checks the C++ server does in Run()
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        return {alias: to_tensor_proto(np.asarray(values[alias])) for alias in fetch_aliases}

    @staticmethod
    def _feeds(
        signature: meta_graph_pb2.SignatureDef, inputs: Mapping[str, tensor_pb2.TensorProto]
    ) -> dict[str, np.ndarray]:
        sent, expected = set(inputs), set(signature.inputs)
        if len(sent) != len(expected):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
            )
        feeds: dict[str, np.ndarray] = {}
        # Argument positions follow the sorted aliases, as in the C++ call frame TF Serving builds.
        for index, alias in enumerate(sorted(sent)):
            if alias not in signature.inputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input tensor alias not found in signature: {alias}. "
                    f"Inputs expected to be in the set {{{','.join(sorted(expected))}}}.",
                )
            info, proto = signature.inputs[alias], inputs[alias]
            if proto.dtype != info.dtype:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{index}] to be {_dtype_name(info.dtype)} but "
                    f"{_dtype_name(proto.dtype) if proto.dtype != types_pb2.DT_INVALID else 'invalid'} "
                    "is provided",
                )
            try:
                value = tf.make_ndarray(proto)
            except (ValueError, TypeError) as err:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {alias}"
                ) from err
            expected_shape = tf.TensorShape(info.tensor_shape)
            if not expected_shape.is_compatible_with(value.shape):
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {alias} has shape {list(value.shape)} but the signature expects "
                    f"{expected_shape.as_list() if expected_shape.rank is not None else 'any'}",
                )
            feeds[alias] = value
        return feeds

    @staticmethod
    def _fetch_aliases(signature: meta_graph_pb2.SignatureDef, output_filter: list[str]) -> list[str]:
        if not output_filter:
            return sorted(signature.outputs)
        for alias in output_filter:
            if alias not in signature.outputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                    f"set {{{','.join(sorted(signature.outputs))}}}.",
                )
        if len(set(output_filter)) != len(output_filter):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "duplicate output tensor alias in output_filter"
            )
        return list(output_filter)
