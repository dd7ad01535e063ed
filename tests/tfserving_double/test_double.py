"""The double must be as strict as TensorFlow Serving, or tests against it prove nothing."""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.tfserving_double import TFServingDouble
from tests.tfserving_double.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # starts gRPC servers and loads SavedModels


@pytest.fixture(scope="module")
def channel(tfserving_double) -> grpc.Channel:
    with grpc.insecure_channel(tfserving_double.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def predict_stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


def _request(
    name: str, signature: str = "", version: int | None = None, **inputs
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def _pixels(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(n, 32, 32, 3)).astype(np.float32)


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value


def test_predict_answers_with_model_spec_and_outputs(predict_stub, tfserving_double, exported_model):
    response = predict_stub.Predict(_request(tfserving_double.model_name, images=_pixels()), timeout=10)
    assert response.model_spec.name == tfserving_double.model_name
    assert response.model_spec.version.value == tfserving_double.model_version
    assert response.model_spec.signature_name == "serving_default"
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    classes = tf.make_ndarray(response.outputs["classes"])
    assert probabilities.shape == (2, len(exported_model.class_names)) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert [c.decode() for c in classes[1]] == list(exported_model.class_names)
    # TF Serving answers in the typed repeated fields, not tensor_content (AsProtoField).
    assert len(response.outputs["probabilities"].float_val) == probabilities.size
    assert not response.outputs["probabilities"].tensor_content


def test_bytes_signature_agrees_with_pixels(predict_stub, tfserving_double):
    pixels = _pixels(1)
    buffer = io.BytesIO()
    Image.fromarray(pixels[0].astype(np.uint8)).save(buffer, format="PNG")
    by_bytes = predict_stub.Predict(
        _request(tfserving_double.model_name, "serving_bytes", image_bytes=np.array([buffer.getvalue()])),
        timeout=10,
    )
    by_pixels = predict_stub.Predict(_request(tfserving_double.model_name, images=pixels), timeout=10)
    assert by_bytes.model_spec.signature_name == "serving_bytes"
    np.testing.assert_allclose(
        tf.make_ndarray(by_bytes.outputs["probabilities"]),
        tf.make_ndarray(by_pixels.outputs["probabilities"]),
        atol=1e-6,
    )


def test_output_filter_limits_outputs(predict_stub, tfserving_double):
    request = _request(tfserving_double.model_name, images=_pixels(1))
    request.output_filter.append("probabilities")
    assert set(predict_stub.Predict(request, timeout=10).outputs) == {"probabilities"}
    request.output_filter.append("logits")
    err = _error(predict_stub.Predict, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "output tensor alias not found in signature: logits "
        "Outputs expected to be in the set {abstain,classes,ood_score,probabilities}."
    )


def test_output_filter_is_checked_alias_by_alias(predict_stub, tfserving_double):
    # predict_util.cc walks the filter in order: the repeat is caught before the unknown alias.
    request = _request(tfserving_double.model_name, images=_pixels(1))
    request.output_filter.extend(["probabilities", "probabilities", "logits"])
    err = _error(predict_stub.Predict, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "duplicate output tensor alias: probabilities"


def test_unknown_model_is_not_found(predict_stub):
    err = _error(predict_stub.Predict, _request("no-such-model", images=_pixels(1)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Servable not found for request: Latest(no-such-model)"


def test_unknown_version_is_not_found(predict_stub, tfserving_double):
    err = _error(predict_stub.Predict, _request(tfserving_double.model_name, version=99, images=_pixels(1)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == f"Servable not found for request: Specific({tfserving_double.model_name}, 99)"


def test_unknown_signature_is_failed_precondition(predict_stub, tfserving_double):
    # FAILED_PRECONDITION, not NOT_FOUND: what predict_util.cc returns.
    err = _error(
        predict_stub.Predict, _request(tfserving_double.model_name, "serving_nope", images=_pixels(1))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == 'Serving signature key "serving_nope" not found.'


def test_missing_model_spec_and_missing_name_are_invalid(predict_stub, model_stub):
    # "Missing ModelSpec" only when the field is absent (predict_impl.cc and the other *_impl.cc);
    # a spec without a name is ServerCore::ServableRequestFromModelSpec's error.
    request = predict_pb2.PredictRequest()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(_pixels(1)))
    err = _error(predict_stub.Predict, request)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    err = _error(predict_stub.GetModelMetadata, metadata_request)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    err = _error(model_stub.GetModelStatus, get_model_status_pb2.GetModelStatusRequest())
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")

    err = _error(predict_stub.Predict, _request("", images=_pixels(1)))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "ModelSpec has no name specified.",
    )
    metadata_request.model_spec.SetInParent()
    err = _error(predict_stub.GetModelMetadata, metadata_request)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "ModelSpec has no name specified.",
    )
    # GetModelStatus has no name check: an empty name is a model without versions.
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.SetInParent()
    err = _error(model_stub.GetModelStatus, status_request)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "Could not find any versions of model ",
    )


def test_version_label_is_unrecognized_without_a_config(predict_stub, model_stub, tfserving_double):
    request = _request(tfserving_double.model_name, images=_pixels(1))
    request.model_spec.version_label = "stable"
    err = _error(predict_stub.Predict, request)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Unrecognized servable version label: stable",
    )
    # GetModelStatus ignores labels (it only looks at `version`) and lists every version.
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = tfserving_double.model_name
    status_request.model_spec.version_label = "stable"
    response = model_stub.GetModelStatus(status_request, timeout=10)
    assert [s.version for s in response.model_version_status] == [tfserving_double.model_version]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            {},
            "input size does not match signature: 0!=1 len({}) != len({images}). "
            "Sent extra: {}. Missing but required: {images}.",
        ),
        (
            {"images": _pixels(1), "extra": _pixels(1)},
            "input size does not match signature: 2!=1 len({extra,images}) != len({images}). "
            "Sent extra: {extra}. Missing but required: {}.",
        ),
        # Same count, wrong name: tensorflow/cc/saved_model/util.cc GetInputValues.
        ({"pixels": _pixels(1)}, "Signature input alias: images(feed name: "),
        # dtype and rank are checked by TensorFlow's own Session::Run and kernels, not by TF Serving.
        ({"images": _pixels(1).astype(np.uint8)}, "Expects arg[0] to be float but uint8 is provided"),
        ({"images": np.array([b"not pixels"])}, "Expects arg[0] to be float but string is provided"),
        ({"images": np.zeros((1, 32, 32), np.float32)}, ""),
    ],
    ids=["missing", "extra", "wrong-name", "wrong-dtype", "bytes-to-pixels", "wrong-rank"],
)
def test_bad_inputs_are_invalid_argument(predict_stub, tfserving_double, inputs, expected):
    err = _error(predict_stub.Predict, _request(tfserving_double.model_name, **inputs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(expected)


def test_wrong_input_name_names_the_missing_alias(predict_stub, tfserving_double):
    err = _error(predict_stub.Predict, _request(tfserving_double.model_name, pixels=_pixels(1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(
        r"Signature input alias: images\(feed name: \S+\) not found in request and no default value "
        r"provided\. Inputs expected to be in the request \{pixels\}, or default input alias set: ",
        err.details(),
    ), err.details()


def test_unparseable_tensors_are_invalid_argument(predict_stub, tfserving_double):
    # Tensor::FromProto fails: no dtype, or tensor_content of the wrong size for the shape.
    for proto in (
        tensor_pb2.TensorProto(),
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[{"size": 1}, {"size": 2}]),
            tensor_content=b"abc",
        ),
    ):
        request = _request(tfserving_double.model_name)
        request.inputs["images"].CopyFrom(proto)
        err = _error(predict_stub.Predict, request)
        assert (err.code(), err.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor parsing error: images",
        )


def test_signature_shapes_are_not_enforced_by_the_server(predict_stub, tfserving_double):
    # TF Serving never compares an input with the SignatureDef's shape; this convolutional model
    # takes 28x28 images as readily as 32x32. Product code must not rely on the server for it.
    request = _request(tfserving_double.model_name, images=np.zeros((1, 28, 28, 3), np.float32))
    probabilities = tf.make_ndarray(predict_stub.Predict(request, timeout=10).outputs["probabilities"])
    assert probabilities.shape == (1, 10)


def test_long_error_messages_are_truncated_at_1024_bytes(predict_stub, tfserving_double):
    # grpc_status_util.cc ToGRPCStatus.
    err = _error(predict_stub.Predict, _request(tfserving_double.model_name, **{"x" * 2000: _pixels(1)}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.details()) == 1024 + len("...TRUNCATED") and err.details().endswith("x...TRUNCATED")


def test_undecodable_bytes_are_invalid_argument(predict_stub, tfserving_double):
    request = _request(tfserving_double.model_name, "serving_bytes", image_bytes=np.array([b"not an image"]))
    err = _error(predict_stub.Predict, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # TensorFlow's own decode error, passed through


def test_model_status_lists_available_version(model_stub, tfserving_double):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = tfserving_double.model_name
    response = model_stub.GetModelStatus(request, timeout=10)
    assert [(s.version, s.state) for s in response.model_version_status] == [
        (tfserving_double.model_version, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    assert response.model_version_status[0].status.error_code == 0
    request.model_spec.version.value = 99
    err = _error(model_stub.GetModelStatus, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == f"Could not find version 99 of model {tfserving_double.model_name}"
    request.model_spec.name = "no-such-model"
    request.model_spec.ClearField("version")
    err = _error(model_stub.GetModelStatus, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Could not find any versions of model no-such-model"


def test_model_metadata_carries_signature_defs(predict_stub, tfserving_double):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = tfserving_double.model_name
    err = _error(predict_stub.GetModelMetadata, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "GetModelMetadataRequest must specify at least one metadata_field"
    request.metadata_field.append("signature_def")
    response = predict_stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == tfserving_double.model_version
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert signatures.signature_def["serving_default"].inputs["images"].dtype == tf.float32.as_datatype_enum
    assert signatures.signature_def["serving_bytes"].inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    outputs = set(signatures.signature_def["serving_bytes"].outputs)
    assert outputs == {"probabilities", "classes", "ood_score", "abstain"}


def test_metadata_fields_are_checked_before_the_model(predict_stub, tfserving_double):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def", "assets"])
    request.model_spec.name = "no-such-model"  # not looked up: the field check comes first
    err = _error(predict_stub.GetModelMetadata, request)
    # Verbatim TF Serving: errors::InvalidArgument("Metadata field %s is not supported", field)
    # concatenates its arguments, so the message keeps "%s" and runs into the field name.
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Metadata field %s is not supportedassets",
    )
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = tfserving_double.model_name
    request.model_spec.version.value = 99
    err = _error(predict_stub.GetModelMetadata, request)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"Servable not found for request: Specific({tfserving_double.model_name}, 99)",
    )


def test_down_is_unavailable_and_comes_back_on_the_same_address(predict_stub, tfserving_controls):
    request = _request(tfserving_controls.model_name, images=_pixels(1))
    address = tfserving_controls.address
    tfserving_controls.set_down(True)
    err = _error(predict_stub.Predict, request)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    tfserving_controls.set_down(False)
    assert tfserving_controls.address == address
    # wait_for_ready: the channel may still be in its reconnect backoff after the outage.
    response = predict_stub.Predict(request, timeout=10, wait_for_ready=True)
    assert response.model_spec.version.value == tfserving_controls.model_version


def test_delay_makes_a_short_deadline_expire(predict_stub, tfserving_controls):
    request = _request(tfserving_controls.model_name, images=_pixels(1))
    tfserving_controls.set_delay(1.0)
    with pytest.raises(grpc.RpcError) as info:
        predict_stub.Predict(request, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    predict_stub.Predict(request, timeout=10)
    assert time.monotonic() - started >= 1.0


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the double did not pick up the change on disk"
        time.sleep(0.1)


@contextmanager
def _polling_double(base: Path) -> Iterator[tuple[object, Callable[[], list]]]:
    """A double polling `base` (model "m", version 1 published) every 0.1 s: its Predict stub and
    a function returning GetModelStatus's ModelVersionStatus list, newest first."""
    write_tiny_model(base, "m", 1, seed=1)
    with TFServingDouble(base, poll_interval_s=0.1) as double, grpc.insecure_channel(double.address) as ch:
        status_stub = model_service_pb2_grpc.ModelServiceStub(ch)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "m"

        def statuses() -> list:
            return list(status_stub.GetModelStatus(request, timeout=10).model_version_status)

        yield prediction_service_pb2_grpc.PredictionServiceStub(ch), statuses


def test_polls_for_new_versions_and_ignores_non_digit_dirs(tmp_path: Path):
    with _polling_double(tmp_path) as (stub, statuses):

        def versions() -> list[tuple[int, int]]:
            return [(status.version, status.state) for status in statuses()]

        # A finished SavedModel under a non-version name must never be served (e.g. a staging dir).
        shutil.copytree(tmp_path / "m" / "1", tmp_path / "m" / "7.tmp")
        write_tiny_model(tmp_path, "m", 2, seed=2)
        available, end = (
            get_model_status_pb2.ModelVersionStatus.AVAILABLE,
            get_model_status_pb2.ModelVersionStatus.END,
        )
        _wait_for(lambda: versions() == [(2, available), (1, end)])  # latest policy: 1 is unloaded
        response = stub.Predict(_request("m", images=_pixels(1)), timeout=10)
        assert response.model_spec.version.value == 2
        err = _error(stub.Predict, _request("m", version=1, images=_pixels(1)))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_a_version_that_fails_to_load_ends_in_error_and_the_old_one_keeps_serving(tmp_path: Path):
    with _polling_double(tmp_path) as (stub, statuses):
        broken = tmp_path / "m" / ".2-staging"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        broken.rename(tmp_path / "m" / "2")

        def states() -> list[tuple[int, int, int]]:
            return [(status.version, status.state, status.status.error_code) for status in statuses()]

        available, end = (
            get_model_status_pb2.ModelVersionStatus.AVAILABLE,
            get_model_status_pb2.ModelVersionStatus.END,
        )
        data_loss = grpc.StatusCode.DATA_LOSS.value[0]
        _wait_for(lambda: states() == [(2, end, data_loss), (1, available, 0)])
        failed = statuses()[0]
        assert (
            failed.status.error_message
            == f"Can't parse {tmp_path / 'm' / '2' / 'saved_model.pb'} as binary proto"
        )
        # AvailabilityPreservingPolicy: no aspired version is serving, so version 1 stays.
        assert stub.Predict(_request("m", images=_pixels(1)), timeout=10).model_spec.version.value == 1


def test_runs_as_a_process_steered_by_its_control_file(tfserving_double_process):
    with grpc.insecure_channel(tfserving_double_process.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = _request(tfserving_double_process.model_name, images=_pixels(1))
        assert stub.Predict(request, timeout=30).model_spec.name == tfserving_double_process.model_name
        tfserving_double_process.set_down(True)
        assert _error(stub.Predict, request).code() == grpc.StatusCode.UNAVAILABLE
        tfserving_double_process.reset()
        assert stub.Predict(request, timeout=10, wait_for_ready=True).model_spec.version.value == 1


def test_fail_next_answers_unavailable_then_recovers(predict_stub, tfserving_controls):
    request = _request(tfserving_controls.model_name, images=_pixels(1))
    tfserving_controls.fail_next(1)
    before = tfserving_controls.calls
    assert _error(predict_stub.Predict, request).code() == grpc.StatusCode.UNAVAILABLE
    assert predict_stub.Predict(request, timeout=10).model_spec.name == tfserving_controls.model_name
    assert tfserving_controls.calls == before + 2


def test_shed_next_answers_like_a_full_batching_queue(predict_stub, tfserving_controls):
    request = _request(tfserving_controls.model_name, images=_pixels(1))
    tfserving_controls.server.shed_next(1)
    error = _error(predict_stub.Predict, request)
    # TensorFlow's shared batch scheduler, verbatim: how TF Serving sheds load.
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "The batch scheduling queue to which this task was submitted is full"
    assert predict_stub.Predict(request, timeout=10).model_spec.name == tfserving_controls.model_name
