"""Publish a run directory as the next version under MODEL_BASE/<name>/, atomically and behind a gate.

The gate (trainer/export/gate.py) measures the exported candidate, and for --max-regression the served
version, on the candidate's test split, inside the publish lock, before the version is renamed into
place: a refused candidate leaves nothing behind. `as_canary` labels the new version canary in
labels.json (trainer/export/labels.py) under the same lock.

Layout is TensorFlow Serving's: MODEL_BASE/<name>/<version>/ with version an all-digit directory
name. TF Serving's file-system source only considers children whose whole name parses as an
integer, so the hidden `.tmp-<version>-<random>` directory we write into is invisible to it until the
final os.rename, which is atomic within one file system: the server never sees half a version.
Locking, numbering, leftovers and --keep live in trainer/export/retention.py (no TensorFlow there).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

import trainer.models  # noqa: F401 - registers the project's custom layers, so load_model reads them
from trainer import run_files
from trainer.export import labels as labels_module
from trainer.export.gate import (
    NOT_GATED,
    EvaluationData,
    GateCriteria,
    QualityGateError,
    check_comparable,
    load_evaluation_data,
    run_gate,
)
from trainer.export.gradcam import find_last_conv_layer
from trainer.export.model_card import build_model_card, write_model_card
from trainer.export.ood import KEEP_DEFAULT
from trainer.export.retention import publish_version, read_serving_config
from trainer.export.savedmodel import export_savedmodel, verify_export
from trainer.export.trust import fit_trust
from trainer.export.tta import NONE, check
from trainer.export.warmup import write_warmup_file

__all__ = ["QualityGateError", "RunArtifacts", "publish", "read_run_dir"]

log = logging.getLogger(__name__)


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


def float32_model(model: keras.Model) -> keras.Model:
    """`model` computing in float32 throughout, with its weights (the same object when it already does).

    A GPU run trains under a mixed policy (bfloat16 or float16 compute, float32 weights: trainer/
    accelerator.py) and model.keras keeps that policy per layer. Exported as is, the served graph
    would compute in 16 bits on the CPUs that serve it: slow where the CPU lacks the type, and
    probabilities off by up to ~0.1 (a width-8 bn_cnn under bfloat16). The contract is float32.
    """
    policies: set[str] = set()

    def to_float32(item: Any) -> Any:  # the config with every layer's dtype policy made float32
        if isinstance(item, dict):
            if item.get("class_name") == "DTypePolicy":
                policies.add(item["config"]["name"])
                return {**item, "config": {**item["config"], "name": "float32"}}
            return {key: to_float32(value) for key, value in item.items()}
        if isinstance(item, list):
            return [to_float32(value) for value in item]
        return item

    config = to_float32(model.get_config())
    if policies <= {"float32"} and model.dtype_policy.name == "float32":
        return model
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())  # a mixed policy keeps its variables in float32
    return rebuilt


@run_files.reusing_datasets()  # the gate and the trust fit read the same splits: loaded once
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
    min_class_recall: float | None = None,
    min_class_f1: float | None = None,
    force_new_baseline: bool = False,
    as_canary: bool = False,
    canary_percent: float = 10.0,
    canary_mode: str = labels_module.SPLIT,
    ood_keep: float = KEEP_DEFAULT,
    ood_photos: str | Path | None = None,
) -> Path:
    """Export RUN_DIR/model.keras as MODEL_BASE/<model_name>/<max existing + 1>/ and return that path.

    `tta="flip"` builds test-time flip augmentation into the signatures (trainer/export/tta.py).
    Any of min_accuracy, max_regression, min_class_recall, min_class_f1 turns the gate on
    (trainer/export/gate.py); QualityGateError when it refuses. `keep` prunes to the newest N
    versions, except those labels.json labels and those TF Serving's config `serving_config` (its
    models.config) serves, pins or labels (trainer/export/retention.py). `as_canary` labels the new
    version canary with `canary_percent` of the traffic (`canary_mode` "shadow": mirrored only).
    The temperature and the abstention threshold (keeping `ood_keep` of held-out in-distribution images)
    are fitted on the run's held-out data; `ood_photos` is a labels.csv photo folder the OOD report also
    measures on (trainer/export/trust.py).
    """
    run_dir, model_base = Path(run_dir), Path(model_base)
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"invalid --model-name {model_name!r}: use a plain directory name such as 'cifar10'")
    if keep is not None and keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}); the newest version is never removed")
    check(tta)
    run = read_run_dir(run_dir)
    model_dir = model_base / model_name
    if canary_mode not in labels_module.MODES or not 0.0 <= canary_percent <= 100.0:
        raise ValueError(
            f"--canary-percent must be 0..100 and the mode one of {labels_module.MODES}, "
            f"got {canary_percent} and {canary_mode!r}"
        )
    if serving_config is not None:
        serving_config = Path(serving_config)
        read_serving_config(serving_config, model_name)  # a missing or broken config fails before the export
    criteria = GateCriteria(min_accuracy, max_regression, min_class_recall, min_class_f1, force_new_baseline)
    # Rebuilt before the lock is taken: data that cannot be loaded fails the gate with nothing written.
    # Recorded in the card even without a gate, so a later gated export can tell whether this version
    # was validated on its data.
    try:
        data: EvaluationData | None = load_evaluation_data(run_dir)
    except QualityGateError as exc:
        if criteria.active:
            raise
        log.warning("the model card records no evaluation_data: %s", exc)
        data = None
    if criteria.active:
        assert data is not None
        check_comparable(model_dir, data, criteria)

    def label_canary(version: int) -> None:
        if not as_canary:
            return
        # The first version of a model has nothing to be the canary of: it becomes stable.
        change = labels_module.set_canary_locked(
            model_dir, version, canary_percent, mode=canary_mode, model_name=model_name,
            first_becomes_stable=True,
        )  # fmt: skip
        log.info("%s", change.message)

    path = publish_version(
        model_dir,
        lambda tmp, version: _write_version(
            tmp, run, run_dir, model_name, version, tta, criteria, data, ood_keep=ood_keep,
            ood_photos=None if ood_photos is None else Path(ood_photos),
        ),
        keep=keep,
        serving_config=serving_config,
        model_name=model_name,
        on_published=label_canary,
    )
    if as_canary and serving_config is not None:
        _label_serving_config(model_dir, serving_config, model_name)
    return path


def _label_serving_config(model_dir: Path, serving_config: Path, model_name: str) -> None:
    """After an --as-canary publish, give TF Serving the labels too; the version is out either way."""
    try:
        labels = labels_module.current_labels(model_dir)
        if labels is not None:
            labels_module.write_serving_config(serving_config, model_name, labels)
    except (OSError, ValueError) as exc:  # e.g. a read-only config map: say how to finish the move
        log.error(
            "published and labelled in labels.json, but %s was not updated (%s): run `python -m "
            "trainer.export labels` and the same move with --serving-config where the file is writable",
            serving_config,
            exc,
        )


def _write_version(
    tmp: Path,
    run: RunArtifacts,
    run_dir: Path,
    model_name: str,
    version: int,
    tta: str,
    criteria: GateCriteria,
    data: EvaluationData | None,
    *,
    ood_keep: float = KEEP_DEFAULT,
    ood_photos: Path | None = None,
) -> None:
    """Export, verify, gate and describe the run's model in `tmp`, the version directory still hidden
    from TF Serving: SavedModel, warmup requests, model card. A refused gate raises here, and the
    caller removes `tmp`."""
    model = float32_model(keras.saving.load_model(run.model_path, compile=False))
    # Temperature, OOD score and abstention threshold fitted on the run's held-out data, built into
    # every signature (trainer/export/trust.py).
    trust = fit_trust(model, run_dir, tta=tta, keep=ood_keep, photo_folder=ood_photos)
    export_savedmodel(model, run.class_names, tmp, tta=tta, trust=trust.params)
    verify_export(model, run.class_names, tmp, tta=tta, trust=trust.params)
    # Warmup requests are the same either way: they only feed inputs, whatever the graph does with them.
    write_warmup_file(tmp, model_name, explain=find_last_conv_layer(model) is not None)
    # The gate runs the exported graph (what users get, --tta included) on the test split.
    if criteria.active:
        assert data is not None  # publish() refuses a gated export without its test split
        try:
            gate = run_gate(tmp, data, tmp.parent, criteria)
        except QualityGateError as exc:
            log.error("gate record of the refused candidate: %s", json.dumps(exc.record))
            raise
    else:
        gate = {"verdict": NOT_GATED}
    card = build_model_card(run_dir, model_name, version, _architecture(run_dir, model), tta=tta)
    card["evaluation_data"] = None if data is None else data.describe()
    card["gate"] = gate
    card.update(trust.card)  # "calibration" and "ood"
    trust.write(tmp, run_dir)  # assets.extra/reference_stats.json and the trust reports
    write_model_card(tmp, card)


def _architecture(run_dir: Path, model: keras.Model) -> str:
    """The architecture the run trained (config.json's model.arch, as trainer/config.py writes it);
    the Keras model's name for a run without one."""
    config_path = run_dir / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    model_section = config.get("model")
    arch = model_section.get("arch") if isinstance(model_section, dict) else None
    return arch if isinstance(arch, str) else str(getattr(model, "name", "unknown"))
