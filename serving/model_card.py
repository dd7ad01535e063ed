"""What the gateway tells people about the served version, from its exported model card.

trainer/export writes `<base>/<name>/<version>/assets.extra/model_card.json`. The gateway reads it
where it can see the model base (always for the embedded backend; for TensorFlow Serving when the
gateway mounts the same volume) so /v1/models and the page can say what the model was trained on,
above all when it was trained on synthetic shapes (the offline demo), whose answers on real photos
mean nothing. A card that is missing or unreadable gives None: the card informs, it never gates.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from contract.signatures import MODEL_CARD_PATH

log = logging.getLogger(__name__)


def card_summary(model_base_path: Path, model_name: str, version: int | None) -> dict[str, Any] | None:
    """The fields a caller of /v1/models needs from the card, or None when it cannot be read."""
    if version is None:
        return None
    path = Path(model_base_path) / model_name / str(version) / MODEL_CARD_PATH
    return _summary(str(path), model_name, version)


@functools.lru_cache(maxsize=16)  # a published version never changes, so its card is read once
def _summary(path: str, model_name: str, version: int) -> dict[str, Any] | None:
    try:
        card = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("model card %s is unreadable (%s); /v1/models omits it", path, error)
        return None
    if not isinstance(card, dict):
        return None
    if card.get("model_name") != model_name or card.get("version") != version:
        # A base that is not the one TensorFlow Serving reads (another copy, a stale checkout):
        # better no card than another model's.
        log.warning("model card %s describes %s/%s, not %s/%s; ignored", path,
                    card.get("model_name"), card.get("version"), model_name, version)
        return None
    dataset = card.get("dataset") if isinstance(card.get("dataset"), dict) else {}
    metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
    return {
        "dataset": dataset.get("name"),
        "synthetic": bool(dataset.get("synthetic", False)),
        "architecture": card.get("architecture"),
        "test_time_augmentation": card.get("test_time_augmentation", "none"),  # older cards predate --tta
        "test_accuracy": metrics.get("test_accuracy"),
        "created_at": card.get("created_at"),
    }
