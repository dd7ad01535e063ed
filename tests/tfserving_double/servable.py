"""One loaded model version, run the way TensorFlow Serving runs it.

TensorFlow Serving loads a SavedModel into a TF1-style Session (`LoadSavedModel` with tag `serve`)
and runs a signature by feeding the SignatureDef's input tensor names and fetching its output
tensor names. Doing the same here (instead of `tf.saved_model.load` and calling concrete
functions) means a SavedModel that works against this double also works against the real server.

Request validation follows TF Serving 2.x step by step, in its order, with its codes and wording:
  1. predict_util.cc RunPredict: unknown signature key -> FAILED_PRECONDITION.
  2. predict_util.cc VerifyRequestInputsSize: too many inputs, or too few without signature
     defaults -> INVALID_ARGUMENT "input size does not match signature: ...".
  3. tensorflow/cc/saved_model/util.cc GetInputValues: each signature input from the request or
     from the signature's defaults, parsed with Tensor::FromProto -> INVALID_ARGUMENT.
  4. predict_util.cc PreProcessPrediction: output_filter aliases, one by one -> INVALID_ARGUMENT.
  5. Session::Run. The dtype check ("Expects arg[0] to be float but uint8 is provided") and every
     shape problem come from TensorFlow's own DirectSession and kernels, exactly as in the server:
     the run below goes through the C API (TF_SessionRun), not Python's Session.run, whose feed
     checks and silent dtype casts TF Serving does not have. TF Serving does not check input
     shapes against the SignatureDef; neither does this double.
The server does not check the SignatureDef's method_name by default
(--enable_signature_method_name_check=false), so neither does the double.
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
CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """An error TF Serving would return: a gRPC status code and TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


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


def parse_tensor_proto(proto: tensor_pb2.TensorProto) -> np.ndarray | None:
    """TensorProto -> ndarray with C++ `Tensor::FromProto` semantics (None where it fails): the
    ParseTensor op runs that very function, so short `*_val` lists are padded with their last value,
    surplus ones ignored, and a wrong-sized tensor_content, a bad shape or DT_INVALID rejected."""
    if proto.dtype == types_pb2.DT_INVALID:
        return None
    try:
        dtype = tf.dtypes.as_dtype(proto.dtype)
        value = tf.io.parse_tensor(proto.SerializeToString(), out_type=dtype)
        return np.asarray(value.numpy())
    except (tf.errors.OpError, TypeError, ValueError):
        return None


def _keys(mapping: Iterable[str]) -> str:
    return ",".join(sorted(mapping))  # absl::StrJoin over a std::set: sorted


class Servable:
    """A SavedModel version loaded into its own Graph and Session."""

    def __init__(self, name: str, version: int, path: Path) -> None:
        self.name = name
        self.version = version
        self.path = Path(path)
        # The shared loader (tests/tfserving_session.py) is the one the export tests trust too.
        self._session = TFServingSession.load(self.path, (SERVE_TAG,))
        self.signature_defs: Mapping[str, meta_graph_pb2.SignatureDef] = self._session.signature_defs
        # Its graph and tf.compat.v1.Session, for running through the C API (see `_run`).
        self._graph: tf.Graph = self._session._graph
        self._tf_session: tf.compat.v1.Session = self._session._session
        self._tf_session._extend_graph()

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
        """Validate like TF Serving (its order, codes and wording), run, return alias -> TensorProto."""
        signature = self.signature(signature_name)
        self._verify_inputs_size(signature, inputs)
        feeds = self._input_values(signature, inputs)
        fetch_aliases = self._fetch_aliases(signature, list(output_filter))
        values = self._run(feeds, [signature.outputs[alias].name for alias in fetch_aliases])
        return {alias: to_tensor_proto(value) for alias, value in zip(fetch_aliases, values, strict=True)}

    @staticmethod
    def _verify_inputs_size(
        signature: meta_graph_pb2.SignatureDef, inputs: Mapping[str, tensor_pb2.TensorProto]
    ) -> None:
        """predict_util.cc VerifyRequestInputsSize."""
        sent, expected = set(inputs), set(signature.inputs)
        if len(sent) > len(expected) or (len(sent) < len(expected) and not signature.defaults):
            raise _invalid(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{_keys(sent)}}}) != len({{{_keys(expected)}}}). "
                f"Sent extra: {{{_keys(sent - expected)}}}. "
                f"Missing but required: {{{_keys(expected - sent)}}}."
            )

    @staticmethod
    def _input_values(
        signature: meta_graph_pb2.SignatureDef, inputs: Mapping[str, tensor_pb2.TensorProto]
    ) -> dict[str, np.ndarray]:
        """tensorflow/cc/saved_model/util.cc GetInputValues: feed tensor name -> value.

        The server walks the signature's proto map, whose order C++ leaves unspecified; this walks
        it sorted, which only matters for which error comes first when several inputs are wrong."""
        feeds: dict[str, np.ndarray] = {}
        seen: set[str] = set()
        for alias in sorted(signature.inputs):
            feed_name = signature.inputs[alias].name
            if alias in inputs:
                proto = inputs[alias]
                seen.add(alias)
            elif alias in signature.defaults:
                proto = signature.defaults[alias]
            else:
                raise _invalid(
                    f"Signature input alias: {alias}(feed name: {feed_name}) not found in request "
                    f"and no default value provided. Inputs expected to be in the request "
                    f"{{{_keys(inputs)}}}, or default input alias set: {_keys(signature.defaults)}"
                )
            value = parse_tensor_proto(proto)
            if value is None:
                raise _invalid(f"tensor parsing error: {alias}")
            feeds[feed_name] = value
        if inputs and len(seen) != len(inputs):
            raise _invalid(
                f"Inputs contains invalid name. Used request inputs: {_keys(seen)}, "
                f"request input: {_keys(inputs)}"
            )
        return feeds

    @staticmethod
    def _fetch_aliases(signature: meta_graph_pb2.SignatureDef, output_filter: list[str]) -> list[str]:
        """predict_util.cc PreProcessPrediction: output_filter checked alias by alias, in order."""
        if not output_filter:
            return sorted(signature.outputs)
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in signature.outputs:
                raise _invalid(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                    f"the set {{{_keys(signature.outputs)}}}."
                )
            if alias in seen:
                raise _invalid(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return output_filter

    def _run(self, feeds: Mapping[str, np.ndarray], fetch_names: list[str]) -> list[np.ndarray]:
        """Session::Run through the C API (TF_SessionRun -> DirectSession::Run), as TF Serving
        calls it: dtype mismatches and kernel errors come back as TensorFlow's status, unchanged."""
        feed = {self._graph.get_tensor_by_name(n)._as_tf_output(): v for n, v in feeds.items()}
        fetch = [self._graph.get_tensor_by_name(n)._as_tf_output() for n in fetch_names]
        try:
            values = self._tf_session._call_tf_sessionrun(None, feed, fetch, [], None)
        except tf.errors.OpError as err:
            raise ServingError(
                CODES_BY_VALUE.get(err.error_code, grpc.StatusCode.UNKNOWN), err.message
            ) from err
        return [np.asarray(value) for value in values]
