"""assets.extra/model_card.json: what this model version is, where it came from, how to call it."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainer.export.savedmodel import (
    CLASSES_KEY,
    IMAGE_BYTES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    PROBABILITIES_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
)

MODEL_CARD_FILENAME = "model_card.json"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]

INPUT_CONTRACT: dict[str, Any] = {
    "tag": "serve",
    "signatures": {
        SERVING_DEFAULT: {
            "inputs": {
                IMAGES_KEY: {
                    "dtype": "float32",
                    "shape": [-1, INPUT_SIZE, INPUT_SIZE, 3],
                    "meaning": "RGB pixel values 0..255; normalization is inside the model",
                }
            },
        },
        SERVING_BYTES: {
            "inputs": {
                IMAGE_BYTES_KEY: {
                    "dtype": "string",
                    "shape": [-1],
                    "meaning": "encoded JPEG, PNG, GIF or BMP of any size",
                }
            },
            "preprocessing": "decode to RGB (first GIF frame; JPEG with libjpeg's accurate integer IDCT "
            "and turned upright by its EXIF Orientation; transparency composited on white), then "
            "Pillow 13's BILINEAR resize to 32x32 reproduced bit for bit (serving/preprocess.py); "
            "a side over 65535 pixels is refused",
        },
    },
    "outputs": {
        PROBABILITIES_KEY: {"dtype": "float32", "shape": [-1, "num_classes"], "meaning": "softmax"},
        CLASSES_KEY: {
            "dtype": "string",
            "shape": [-1, "num_classes"],
            "meaning": "class names aligned with probabilities",
        },
    },
}


def code_revision() -> str | None:
    """The git commit of the exporting code, with '-dirty' when the tree has changes; None without git."""
    try:
        rev = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=_PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_model_card(run_dir: Path, model_name: str, version: int, architecture: str) -> dict[str, Any]:
    """Collect the card from the run directory's dataset.json, config.json, metrics.json and
    environment.json (absent in runs from before it existed: then null)."""
    dataset = _read_json(run_dir / "dataset.json")
    config = _read_json(run_dir / "config.json")
    metrics = _read_json(run_dir / "metrics.json")
    return {
        "model_name": model_name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_revision": code_revision(),
        "run_dir": str(run_dir.resolve()),
        "architecture": architecture,
        "dataset": {
            "name": dataset.get("name"),
            "source": dataset.get("source"),
            "synthetic": bool(dataset.get("synthetic", False)),
            "num_train": dataset.get("num_train"),
            "num_val": dataset.get("num_val"),
            "num_test": dataset.get("num_test"),
        },
        "class_names": list(dataset.get("class_names", [])),
        "normalization": {
            "mean": dataset.get("mean"),
            "std": dataset.get("std"),
            "units": "pixel values 0..255",
        },
        "metrics": {
            "test_accuracy": metrics.get("test_accuracy"),
            "test_loss": metrics.get("test_loss"),
            "per_class": metrics.get("per_class", {}),
        },
        "training_config": config,
        "training_environment": _read_json(run_dir / "environment.json") or None,
        "input_contract": INPUT_CONTRACT,
    }


def write_model_card(assets_extra: Path, card: dict[str, Any]) -> Path:
    assets_extra.mkdir(parents=True, exist_ok=True)
    path = assets_extra / MODEL_CARD_FILENAME
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def read_model_card(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / "assets.extra" / MODEL_CARD_FILENAME).read_text())
