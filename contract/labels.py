"""MODEL_BASE/<name>/labels.json: which version is `stable` and which is `canary`, read by the gateway
and written by `python -m trainer.export promote|rollback|canary` (trainer/export/labels.py).

    {"stable": 6, "canary": 7, "canary_percent": 10.0, "mode": "split"}

* `stable`: the version that answers users; `canary`: a version that gets `canary_percent` (0..100) of
  the traffic (mode "split") or a mirrored copy of it whose answers are only compared (mode "shadow");
  null when there is none.
* No file: no labels, the newest complete version takes all traffic (contract/versions.py).

The writer replaces the file atomically (temporary file, fsync, rename, directory fsync), so a reader
sees the old labels or the new ones, never a torn file. This module only parses; it imports nothing
of the product, so the gateway and the trainer read the file the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.json"
STABLE = "stable"
CANARY = "canary"
SPLIT = "split"
SHADOW = "shadow"
MODES = (SPLIT, SHADOW)


class LabelsError(ValueError):
    """labels.json exists but does not say which version is stable."""


@dataclass(frozen=True)
class Labels:
    stable: int
    canary: int | None = None
    canary_percent: float = 0.0
    mode: str = SPLIT

    def to_dict(self) -> dict[str, Any]:
        return {
            STABLE: self.stable,
            CANARY: self.canary,
            "canary_percent": self.canary_percent,
            "mode": self.mode,
        }

    def versions(self) -> tuple[int, ...]:
        """The labelled versions, stable first."""
        return (self.stable,) if self.canary is None else (self.stable, self.canary)


def _version(value: Any, key: str, path: Path, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    # bool is an int in Python; `true` is no version number.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LabelsError(
            f"{path}: {key!r} must be a version number (1, 2, ...){' or null' if optional else ''}, "
            f"got {value!r}; fix it with `python -m trainer.export promote VERSION`"
        )
    return value


def parse_labels(text: str, path: Path | str = LABELS_FILE) -> Labels:
    """Labels from the text of a labels.json; LabelsError naming the problem and the fix."""
    path = Path(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelsError(
            f"{path} is not JSON ({exc}); rewrite it with `python -m trainer.export promote VERSION`"
        ) from None
    if not isinstance(data, dict):
        raise LabelsError(f"{path} must hold a JSON object with 'stable', got {type(data).__name__}")
    stable = _version(data.get(STABLE), STABLE, path, optional=False)
    canary = _version(data.get(CANARY), CANARY, path, optional=True)
    percent = data.get("canary_percent", 0.0)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0.0 <= percent <= 100.0:
        raise LabelsError(f"{path}: 'canary_percent' must be a number from 0 to 100, got {percent!r}")
    mode = data.get("mode", SPLIT)
    if mode not in MODES:
        raise LabelsError(f"{path}: 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    assert stable is not None  # optional=False
    return Labels(stable=stable, canary=canary, canary_percent=float(percent), mode=mode)


def read_labels(model_dir: Path | str) -> Labels | None:
    """The labels of MODEL_BASE/<name> (model_dir), or None when it has no labels.json."""
    path = Path(model_dir) / LABELS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return parse_labels(text, path)
