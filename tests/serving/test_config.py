"""Gateway settings come from GATEWAY_* variables; bad values stop startup naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

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
