"""Version labels in the double, as TensorFlow Serving implements them (server_core.cc):
ModelSpec.version_label resolved through the models.config's version_labels, labels only on
AVAILABLE versions, the config re-read on the poll."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.tfserving_double import TFServingDouble
from tests.tfserving_double.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # starts gRPC servers and loads SavedModels

NAME = "cifar10"


def models_config(base: Path, versions: list[int], labels: dict[str, int]) -> str:
    """A models.config serving `versions` (specific policy) with `labels`, as trainer.export writes it."""
    policy = "".join(f"        versions: {v}\n" for v in versions)
    label_lines = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in labels.items())
    return (
        "model_config_list {\n  config {\n"
        f'    name: "{NAME}"\n    base_path: "{base / NAME}"\n    model_platform: "tensorflow"\n'
        f"    model_version_policy {{\n      specific {{\n{policy}      }}\n    }}\n{label_lines}"
        "  }\n}\n"
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("labels-base")
    for version in (1, 2, 3):
        write_tiny_model(base, NAME, version, seed=version)
    return base


def predict(stub, *, label: str | None = None, version: int | None = None) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.full((1, 32, 32, 3), 90.0, np.float32)))
    return stub.Predict(request, timeout=10)


def test_labels_resolve_through_the_config_and_follow_its_changes(base: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text(models_config(base, [1, 2], {"stable": 1, "canary": 2}))
    with TFServingDouble(base, model_config=config, poll_interval_s=60) as double:
        with grpc.insecure_channel(double.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert predict(stub, label="stable").model_spec.version.value == 1
            assert predict(stub, label="canary").model_spec.version.value == 2
            assert predict(stub).model_spec.version.value == 2  # no label: the latest loaded
            with pytest.raises(grpc.RpcError) as info:
                predict(stub, label="beta")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "Unrecognized servable version label: beta"

            # Promote: the config moves stable to 2 and canary to 3 (loaded by the same config).
            config.write_text(models_config(base, [2, 3], {"stable": 2, "canary": 3}))
            double.registry.refresh()
            assert double.registry.config_error == ""
            assert predict(stub, label="stable").model_spec.version.value == 2
            assert predict(stub, label="canary").model_spec.version.value == 3
            with pytest.raises(grpc.RpcError) as info:
                predict(stub, version=1)  # no longer in the policy: unloaded
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_label_on_a_version_that_is_not_available_is_refused(base: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text(models_config(base, [1], {"stable": 1}))
    with TFServingDouble(base, model_config=config, poll_interval_s=60) as double:
        # Version 2 is not in the policy, so not loaded: the whole label update is refused.
        config.write_text(models_config(base, [1], {"stable": 1, "canary": 2}))
        double.registry.refresh()
        assert double.registry.config_error == (
            "Request to assign label to version 2 of model cifar10, which is not currently available "
            "for inference"
        )
        assert double.registry.version_for_label(NAME, "stable") == 1  # the labels in force stay
        with pytest.raises(Exception, match="Unrecognized servable version label: canary"):
            double.registry.version_for_label(NAME, "canary")

    with TFServingDouble(
        base, model_config=config, poll_interval_s=60, allow_version_labels_for_unavailable_models=True
    ) as double:
        # With the flag a new label may name a version that is not loaded...
        assert double.registry.config_error == ""
        assert double.registry.version_for_label(NAME, "canary") == 2
        # ...but an existing label may not move to one.
        config.write_text(models_config(base, [1], {"stable": 3, "canary": 2}))
        double.registry.refresh()
        assert "assign label to version 3" in double.registry.config_error
        assert double.registry.version_for_label(NAME, "stable") == 1


def test_version_and_version_label_are_one_choice() -> None:
    """ModelSpec's version and version_label are a oneof: a spec never carries both, the last one
    set wins (also when parsed from the wire), so the server never sees both at once."""
    spec = predict_pb2.PredictRequest().model_spec
    spec.version.value = 3
    spec.version_label = "canary"
    assert spec.WhichOneof("version_choice") == "version_label" and not spec.HasField("version")
    spec.version.value = 4
    assert spec.WhichOneof("version_choice") == "version" and spec.version_label == ""
