"""Gateway settings, read from the environment once, by the app factory (never at import time)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from contract.signatures import SERVING_DEFAULT

T = TypeVar("T")

MIB = 1024 * 1024


class ConfigError(ValueError):
    """A GATEWAY_* variable holds a value the gateway cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    model_base_path: Path = Path("models")
    model_name: str = "cifar10"
    # host:port of TensorFlow Serving's gRPC API; None selects the embedded backend.
    tfserving_address: str | None = None
    tfserving_signature: str = SERVING_DEFAULT
    deadline_s: float = 5.0
    max_images: int = 64
    max_upload_bytes: int = 20 * MIB
    max_pixels: int = 40_000_000
    poll_interval_s: float = 2.0

    @property
    def backend_kind(self) -> str:
        return "tfserving" if self.tfserving_address else "embedded"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        d = cls()

        def read(name: str, parse: Callable[[str], T], default: T, rule: str, ok: Callable[[T], bool]) -> T:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = parse(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not valid: expected {rule}") from None
            if not ok(value):
                raise ConfigError(f"{name}={raw!r} is not valid: expected {rule}")
            return value

        address = env.get("GATEWAY_TFSERVING_ADDRESS", "").strip() or None
        if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(
                f"GATEWAY_TFSERVING_ADDRESS={address!r} is not valid: expected host:port of the gRPC API, "
                "e.g. localhost:8500 (leave it empty for the embedded model)"
            )
        name = env.get("GATEWAY_MODEL_NAME", "").strip() or d.model_name
        if "/" in name or name in (".", ".."):
            raise ConfigError(f"GATEWAY_MODEL_NAME={name!r} is not valid: expected a plain directory name")
        return cls(
            model_base_path=Path(env.get("GATEWAY_MODEL_BASE_PATH", "").strip() or d.model_base_path),
            model_name=name,
            tfserving_address=address,
            tfserving_signature=env.get("GATEWAY_TFSERVING_SIGNATURE", "").strip() or d.tfserving_signature,
            deadline_s=read(
                "GATEWAY_DEADLINE_S", float, d.deadline_s, "seconds > 0, e.g. 5", lambda v: v > 0
            ),
            max_images=read("GATEWAY_MAX_IMAGES", int, d.max_images, "an integer >= 1", lambda v: v >= 1),
            max_upload_bytes=read(
                "GATEWAY_MAX_UPLOAD_BYTES",
                int,
                d.max_upload_bytes,
                "bytes as an integer >= 1024",
                lambda v: v >= 1024,
            ),
            max_pixels=read(
                "GATEWAY_MAX_PIXELS",
                int,
                d.max_pixels,
                "pixels per image as an integer >= 1024",
                lambda v: v >= 1024,
            ),
            poll_interval_s=read(
                "GATEWAY_POLL_INTERVAL_S", float, d.poll_interval_s, "seconds > 0, e.g. 2", lambda v: v > 0
            ),
        )
