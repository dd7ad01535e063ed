"""Publish a run directory as the next version under MODEL_BASE/<name>/, atomically and behind a gate.

Layout is TensorFlow Serving's: MODEL_BASE/<name>/<version>/ with version an all-digit directory
name. TF Serving's file-system source only considers children whose whole name parses as an
integer, so the hidden `.tmp-<version>-<random>` directory we write into is invisible to it until the
final os.rename, which is atomic within one file system: the server never sees half a version.
Locking, numbering, leftovers and --keep live in trainer/export/retention.py (no TensorFlow there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

import trainer.models  # noqa: F401 - registers the project's custom layers, so load_model reads them
from contract.versions import published_versions
from trainer.export.gradcam import find_last_conv_layer
from trainer.export.model_card import build_model_card, read_model_card, write_model_card
from trainer.export.retention import publish_version, read_serving_config
from trainer.export.savedmodel import export_savedmodel, verify_export
from trainer.export.tta import NONE, check
from trainer.export.warmup import write_warmup_file


class QualityGateError(RuntimeError):
    """The candidate model is not good enough to publish; nothing was written."""


@dataclass(frozen=True)
class RunArtifacts:
    model_path: Path
    class_names: list[str]
    test_accuracy: float | None


def read_run_dir(run_dir: Path) -> RunArtifacts:
    """Check the run directory has what export needs; errors say what is missing and how to fix it."""
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist; pass the --run-dir of a finished training"
        )
    model_path = run_dir / "model.keras"
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{model_path} is missing; train first (python -m trainer train --run-dir {run_dir})"
        )
    dataset_path = run_dir / "dataset.json"
    if not dataset_path.is_file():
        raise FileNotFoundError(f"{dataset_path} is missing; it holds the class names the export needs")
    class_names = json.loads(dataset_path.read_text()).get("class_names") or []
    if not class_names:
        raise ValueError(f"{dataset_path} has no class_names; re-run training to regenerate it")
    metrics_path = run_dir / "metrics.json"
    accuracy = json.loads(metrics_path.read_text()).get("test_accuracy") if metrics_path.is_file() else None
    return RunArtifacts(
        model_path, [str(c) for c in class_names], None if accuracy is None else float(accuracy)
    )


def check_quality_gate(
    candidate_accuracy: float | None,
    model_dir: Path,
    *,
    min_accuracy: float | None = None,
    max_regression: float | None = None,
) -> None:
    """Raise QualityGateError when the candidate misses the floor or regresses on the newest version."""
    if min_accuracy is None and max_regression is None:
        return
    if candidate_accuracy is None:
        raise QualityGateError(
            "the run has no metrics.json test_accuracy; evaluate it before gating the export"
        )
    if min_accuracy is not None and candidate_accuracy < min_accuracy:
        raise QualityGateError(
            f"test accuracy {candidate_accuracy:.4f} is below --min-accuracy {min_accuracy:.4f}; "
            "not published"
        )
    versions = published_versions(model_dir)  # newest first; the served one holds a saved_model.pb
    if max_regression is not None and versions:
        newest = versions[0]
        try:
            served = read_model_card(model_dir / str(newest))["metrics"]["test_accuracy"]
        except (OSError, KeyError, ValueError):
            served = None  # a version without a card (published by hand) gives nothing to compare against
        if served is not None and served - candidate_accuracy > max_regression:
            raise QualityGateError(
                f"test accuracy {candidate_accuracy:.4f} regresses {served - candidate_accuracy:.4f} from "
                f"version {newest} ({served:.4f}), more than --max-regression {max_regression:.4f}; "
                "not published"
            )


def publish(
    run_dir: str | Path,
    model_base: str | Path,
    model_name: str = "cifar10",
    *,
    min_accuracy: float | None = None,
    max_regression: float | None = None,
    keep: int | None = None,
    tta: str = NONE,
    serving_config: str | Path | None = None,
) -> Path:
    """Export RUN_DIR/model.keras as MODEL_BASE/<model_name>/<max existing + 1>/ and return that path.

    `tta="flip"` builds test-time flip augmentation into the signatures (trainer/export/tta.py).
    `keep` prunes to the newest N versions, except those that TF Serving's config `serving_config`
    (its models.config) serves, pins or labels (trainer/export/retention.py).
    """
    run_dir, model_base = Path(run_dir), Path(model_base)
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"invalid --model-name {model_name!r}: use a plain directory name such as 'cifar10'")
    if keep is not None and keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}); the newest version is never removed")
    check(tta)
    run = read_run_dir(run_dir)
    model_dir = model_base / model_name
    if serving_config is not None:
        serving_config = Path(serving_config)
        read_serving_config(serving_config, model_name)  # a missing or broken config fails before the export
    # The floor needs no other version: a rejected run touches nothing. The regression check compares
    # with the newest version, so it runs again under the publish lock, where no other export can add one.
    check_quality_gate(run.test_accuracy, model_dir, min_accuracy=min_accuracy)
    return publish_version(
        model_dir,
        lambda tmp, version: _write_version(tmp, run, run_dir, model_name, version, tta),
        keep=keep,
        serving_config=serving_config,
        model_name=model_name,
        gate=lambda: check_quality_gate(
            run.test_accuracy, model_dir, min_accuracy=min_accuracy, max_regression=max_regression
        ),
    )


def _write_version(
    tmp: Path, run: RunArtifacts, run_dir: Path, model_name: str, version: int, tta: str
) -> None:
    """Export, verify and describe the run's model in `tmp`, the version directory still hidden from
    TF Serving: SavedModel, warmup requests, model card."""
    model = keras.saving.load_model(run.model_path, compile=False)
    export_savedmodel(model, run.class_names, tmp, tta=tta)
    verify_export(model, run.class_names, tmp, tta=tta)
    # Warmup requests are the same either way: they only feed inputs, whatever the graph does with them.
    write_warmup_file(tmp, model_name, explain=find_last_conv_layer(model) is not None)
    card = build_model_card(run_dir, model_name, version, _architecture(run_dir, model), tta=tta)
    write_model_card(tmp, card)


def _architecture(run_dir: Path, model: keras.Model) -> str:
    """The architecture the run trained (config.json's model.arch, as trainer/config.py writes it);
    the Keras model's name for a run without one."""
    config_path = run_dir / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    model_section = config.get("model")
    arch = model_section.get("arch") if isinstance(model_section, dict) else None
    return arch if isinstance(arch, str) else str(getattr(model, "name", "unknown"))
