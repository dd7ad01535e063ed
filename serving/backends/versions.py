"""Finding published versions under MODEL_BASE/<name>/, as TensorFlow Serving does."""

from __future__ import annotations

from pathlib import Path


def published_versions(model_dir: Path) -> list[int]:
    """All-digit version directories holding a saved_model.pb, highest first.

    Publishing writes a version under a temporary name and renames it into place, so a directory
    with an all-digit name and a saved_model.pb is complete.
    """
    try:
        entries = list(model_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    versions = [
        int(entry.name)
        for entry in entries
        if entry.name.isdigit() and int(entry.name) > 0 and (entry / "saved_model.pb").is_file()
    ]
    return sorted(versions, reverse=True)


def latest_version(model_dir: Path) -> int | None:
    """The highest complete version, or None."""
    versions = published_versions(model_dir)
    return versions[0] if versions else None
