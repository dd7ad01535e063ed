"""The TF Serving config files the deployment mounts parse as the protobufs TF Serving reads.

tensorflow-serving-api ships ModelServerConfig (model_server_config_pb2) but neither
BatchingParameters (servables/tensorflow/session_bundle_config.proto) nor MonitoringConfig
(config/monitoring_config.proto). For those two we build the messages at runtime from a field-for-field
copy of the upstream definitions (same names, numbers and types), so text_format rejects exactly what
TF Serving's own parser would: unknown fields, wrong types, bad syntax.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

CONFIG_DIR = Path(__file__).resolve().parents[2] / "serving" / "tfserving"
F = descriptor_pb2.FieldDescriptorProto

# (name, number, type, label, type_name) as in TF Serving's .proto files.
UPSTREAM_MESSAGES = {
    "BatchingParameters": [
        ("max_batch_size", 1, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, F.TYPE_INT64, F.LABEL_REPEATED, None),
        ("pad_variable_length_inputs", 7, F.TYPE_BOOL, F.LABEL_OPTIONAL, None),
    ],
    "PrometheusConfig": [
        ("enable", 1, F.TYPE_BOOL, F.LABEL_OPTIONAL, None),
        ("path", 2, F.TYPE_STRING, F.LABEL_OPTIONAL, None),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".tensorflow.serving.PrometheusConfig"),
    ],
}


@pytest.fixture(scope="module")
def upstream_messages() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    file = descriptor_pb2.FileDescriptorProto(
        name="tfserving_mirror.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    for message_name, fields in UPSTREAM_MESSAGES.items():
        message = file.message_type.add(name=message_name)
        for name, number, type_, label, type_name in fields:
            field = message.field.add(name=name, number=number, type=type_, label=label)
            if type_name:
                field.type_name = type_name
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in UPSTREAM_MESSAGES
    }


def test_models_config_serves_the_newest_cifar10_version():
    config = text_format.Parse(
        (CONFIG_DIR / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (model,) = config.model_config_list.config
    assert model.name == "cifar10"
    assert model.base_path == "/models/cifar10"
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions == 1


def test_batching_parameters_follow_tf_serving_constraints(upstream_messages):
    params = text_format.Parse(
        (CONFIG_DIR / "batching_parameters.txt").read_text(), upstream_messages["BatchingParameters"]()
    )
    for field in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
        assert params.HasField(field), f"{field} must be set explicitly"
    assert params.num_batch_threads.value >= 1
    assert params.max_enqueued_batches.value >= 1
    assert 0 <= params.batch_timeout_micros.value <= 10_000  # the guide's CPU range: 0 to 10 ms
    sizes = list(params.allowed_batch_sizes)
    # TF Serving refuses to start unless allowed sizes increase and end at max_batch_size.
    assert sizes == sorted(set(sizes)) and sizes[0] >= 1
    assert sizes[-1] == params.max_batch_size.value


def test_monitoring_config_enables_prometheus(upstream_messages):
    config = text_format.Parse(
        (CONFIG_DIR / "monitoring.config").read_text(), upstream_messages["MonitoringConfig"]()
    )
    assert config.prometheus_config.enable is True
    assert config.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_mirror_rejects_what_tf_serving_would_reject(upstream_messages):
    """The runtime-built messages are strict: a misspelt field or a bare int for a wrapper fails."""
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_sise { value: 8 }", upstream_messages["BatchingParameters"]())
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_size: 8", upstream_messages["BatchingParameters"]())
    with pytest.raises(text_format.ParseError):
        text_format.Parse("prometheus_config { enable: yes_please }", upstream_messages["MonitoringConfig"]())
