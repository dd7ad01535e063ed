"""Gateway settings come from GATEWAY_* variables; bad values stop startup naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.batching import BatchingParameters
from serving.config import ConfigError, Settings


def test_defaults_select_the_embedded_backend() -> None:
    settings = Settings.from_env({})
    assert settings.model_base_path == Path("models")
    assert settings.model_name == "cifar10"
    assert settings.tfserving_address is None and settings.backend_kind == "embedded"
    assert settings.deadline_s == 5.0 and settings.max_images == 64
    assert settings.tfserving_signature == "serving_default"


def test_values_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "GATEWAY_MODEL_BASE_PATH": "/srv/models",
            "GATEWAY_MODEL_NAME": "cifar10b",
            "GATEWAY_TFSERVING_ADDRESS": "tfserving:8500",
            "GATEWAY_DEADLINE_S": "0.5",
            "GATEWAY_MAX_IMAGES": "8",
            "GATEWAY_MAX_UPLOAD_BYTES": "4096",
            "GATEWAY_MAX_PIXELS": "10000",
            "GATEWAY_POLL_INTERVAL_S": "0.2",
            "GATEWAY_TFSERVING_SIGNATURE": "serving_bytes",
        }
    )
    assert settings == Settings(
        model_base_path=Path("/srv/models"),
        model_name="cifar10b",
        tfserving_address="tfserving:8500",
        tfserving_signature="serving_bytes",
        deadline_s=0.5,
        max_images=8,
        max_upload_bytes=4096,
        max_pixels=10000,
        poll_interval_s=0.2,
    )
    assert settings.backend_kind == "tfserving"


def test_batching_parameters_are_tf_servings_names() -> None:
    settings = Settings.from_env(
        {
            "GATEWAY_MAX_BATCH_SIZE": "32",
            "GATEWAY_BATCH_TIMEOUT_MICROS": "2000",
            "GATEWAY_MAX_ENQUEUED_BATCHES": "4",
            "GATEWAY_NUM_BATCH_THREADS": "2",
        }
    )
    assert settings.batching == BatchingParameters(
        max_batch_size=32,
        batch_timeout_micros=2000,
        allowed_batch_sizes=(),  # no padding unless asked for
        max_enqueued_batches=4,
        num_batch_threads=2,
    )
    explicit = Settings.from_env({"GATEWAY_MAX_BATCH_SIZE": "48", "GATEWAY_ALLOWED_BATCH_SIZES": "8, 24,48"})
    assert explicit.batching.allowed_batch_sizes == (8, 24, 48)
    with pytest.raises(ConfigError, match="GATEWAY_ALLOWED_BATCH_SIZES.*must equal max_batch_size"):
        Settings.from_env({"GATEWAY_ALLOWED_BATCH_SIZES": "8,16"})


def test_the_embedded_runtime_is_auto_unless_told() -> None:
    assert Settings.from_env({}).runtime == "auto" and Settings.from_env({}).model_threads is None
    assert Settings.from_env({"GATEWAY_RUNTIME": "LiteRT"}).runtime == "litert"
    settings = Settings.from_env({"GATEWAY_RUNTIME": "TensorFlow", "GATEWAY_MODEL_THREADS": "1"})
    assert settings.runtime == "tensorflow" and settings.model_threads == 1


def test_litert_conversions_are_cached_per_user_unless_off(tmp_path: Path) -> None:
    default = Settings.from_env({}).litert_cache_dir
    assert default is not None and default.name == f"cifar10-gateway-litert-{os.getuid()}"
    assert Settings.from_env({"GATEWAY_LITERT_CACHE_DIR": str(tmp_path)}).litert_cache_dir == tmp_path
    assert Settings.from_env({"GATEWAY_LITERT_CACHE_DIR": "OFF"}).litert_cache_dir is None


def test_empty_tfserving_address_means_embedded() -> None:
    assert Settings.from_env({"GATEWAY_TFSERVING_ADDRESS": "  "}).tfserving_address is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_DEADLINE_S", "soon"),
        ("GATEWAY_DEADLINE_S", "0"),
        ("GATEWAY_MAX_IMAGES", "0"),
        ("GATEWAY_MAX_IMAGES", "2.5"),
        ("GATEWAY_MAX_UPLOAD_BYTES", "-1"),
        ("GATEWAY_MAX_PIXELS", "lots"),
        ("GATEWAY_POLL_INTERVAL_S", "-3"),
        ("GATEWAY_TFSERVING_ADDRESS", "no-port"),
        ("GATEWAY_MODEL_NAME", "a/b"),
        ("GATEWAY_MAX_BATCH_SIZE", "0"),
        ("GATEWAY_BATCH_TIMEOUT_MICROS", "-1"),
        ("GATEWAY_ALLOWED_BATCH_SIZES", "8,x"),
        ("GATEWAY_MAX_ENQUEUED_BATCHES", "0"),
        ("GATEWAY_NUM_BATCH_THREADS", "none"),
        ("GATEWAY_RUNTIME", "onnx"),
        ("GATEWAY_MODEL_THREADS", "0"),
        ("GATEWAY_MODEL_THREADS", "all"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_app_factory_refuses_bad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.app import create_app

    monkeypatch.setenv("GATEWAY_MAX_IMAGES", "many")
    with pytest.raises(ConfigError, match="GATEWAY_MAX_IMAGES"):
        create_app()
