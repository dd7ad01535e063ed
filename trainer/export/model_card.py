"""The model card, <version>/assets.extra/model_card.json (MODEL_CARD_PATH): what this model version is,
where it came from, how to call it."""

from __future__ import annotations

import copy
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contract.preprocess import DECODE_MIN_SIDE
from contract.signatures import (
    ABSTAIN_KEY,
    CHANNELS,
    CLASSES_KEY,
    IMAGE_BYTES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    MAX_SIDE,
    MODEL_CARD_PATH,
    OOD_SCORE_KEY,
    PROBABILITIES_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
)
from trainer.export.tta import FLIP, MODEL_EVALUATIONS, NONE, check

_PROJECT_ROOT = Path(__file__).resolve().parents[2]

INPUT_CONTRACT: dict[str, Any] = {
    "tag": "serve",
    "signatures": {
        SERVING_DEFAULT: {
            "inputs": {
                IMAGES_KEY: {
                    "dtype": "float32",
                    "shape": [-1, INPUT_SIZE, INPUT_SIZE, CHANNELS],
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
            "preprocessing": "decode to RGB (first GIF frame; JPEG with libjpeg's accurate integer IDCT, "
            f"at 1/2, 1/4 or 1/8 scale while both sides stay >= {DECODE_MIN_SIDE} pixels, and turned "
            "upright by its EXIF Orientation; transparency composited on white), then "
            "Pillow 13's BILINEAR resize to 32x32 reproduced bit for bit (contract/preprocess.py); "
            f"a side over {MAX_SIDE} pixels is refused",
        },
    },
    "outputs": {
        PROBABILITIES_KEY: {"dtype": "float32", "shape": [-1, "num_classes"], "meaning": "softmax"},
        CLASSES_KEY: {
            "dtype": "string",
            "shape": [-1, "num_classes"],
            "meaning": "class names aligned with probabilities",
        },
        OOD_SCORE_KEY: {
            "dtype": "float32",
            "shape": [-1],
            "meaning": "out-of-distribution score, higher = less like the training data (ood.score says "
            "which); absent in versions exported before it",
        },
        ABSTAIN_KEY: {
            "dtype": "bool",
            "shape": [-1],
            "meaning": "ood_score above ood.threshold: the answer is 'not sure' (the class is still given)",
        },
    },
}


# What `probabilities` means per --tta (trainer/export/tta.py).
_PROBABILITIES_MEANING = {
    NONE: "softmax of logits / calibration.temperature",
    FLIP: "mean of the softmax of logits / calibration.temperature on the image and on its horizontal "
    "mirror (test-time flip augmentation: twice the model's compute per image)",
}


def input_contract(tta: str = NONE) -> dict[str, Any]:
    """INPUT_CONTRACT with the `probabilities` output described for `tta`."""
    contract = copy.deepcopy(INPUT_CONTRACT)
    contract["outputs"][PROBABILITIES_KEY]["meaning"] = _PROBABILITIES_MEANING[check(tta)]
    return contract


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


def build_model_card(
    run_dir: Path, model_name: str, version: int, architecture: str, tta: str = NONE
) -> dict[str, Any]:
    """Collect the card from the run directory's dataset.json, config.json, metrics.json and
    environment.json (absent in runs from before it existed: then null); `tta` is the export's
    --tta, which the card records with its cost."""
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
        # Serving cost and which accuracy applies: with flip the served scores are the averaged ones
        # (metrics.test_accuracy_flip_tta); warmup requests are the same either way.
        "test_time_augmentation": check(tta),
        "model_evaluations_per_image": MODEL_EVALUATIONS[tta],
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
            "test_accuracy_flip_tta": metrics.get("test_accuracy_flip_tta"),
            "per_class": metrics.get("per_class", {}),
        },
        "training_config": config,
        "training_environment": _read_json(run_dir / "environment.json") or None,
        "input_contract": input_contract(tta),
    }


def write_model_card(version_dir: Path, card: dict[str, Any]) -> Path:
    """Write `card` at `version_dir`/MODEL_CARD_PATH (folders created if missing); returns its path."""
    path = version_dir / MODEL_CARD_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def read_model_card(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / MODEL_CARD_PATH).read_text())
