"""The published versions under MODEL_BASE/<name>/, listed once for the gateway, the publisher and tests.

Layout is TensorFlow Serving's: MODEL_BASE/<name>/<version>/saved_model.pb. A child directory is a
version when its name is the plain decimal form of a positive integer: "1", "42". Everything else is
ignored rather than guessed at:
  * hidden or suffixed names (".tmp-3-123", "3.partial"): a publish in progress or a staging copy;
  * "0": the publisher numbers from 1, and the gateway never served a version 0;
  * "007": TF Serving would read it as 7, but every caller addresses version 7 as `model_dir / "7"`,
    which is another directory; the publisher never writes such a name;
  * "²" and other non-ASCII digits: `str.isdigit()` accepts them, `int()` and TF Serving do not.

A version is *published* once its saved_model.pb exists: the publisher writes under a hidden name
and renames the finished directory into place, so a version-named directory without one is a
hand-made or broken copy.

Every list here is newest first: the gateway tries the newest version first and falls back to older
ones, TF Serving's default policy serves the newest, and the publisher numbers past the newest.
"""

from __future__ import annotations

from pathlib import Path

from contract.signatures import SAVED_MODEL_FILE


def version_number(name: str) -> int | None:
    """The version a directory name stands for, or None when the name is not a version (see above)."""
    if not (name.isascii() and name.isdigit()) or name.startswith("0"):
        return None
    return int(name)


def version_directories(model_dir: Path) -> list[int]:
    """Versions with a directory under model_dir, complete or not, newest first.

    The numbers a new version must not reuse. [] when model_dir does not exist (nothing published
    under that name yet) or is not a directory.
    """
    try:
        entries = list(Path(model_dir).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    versions = [
        number for entry in entries if (number := version_number(entry.name)) is not None and entry.is_dir()
    ]
    return sorted(versions, reverse=True)


def published_versions(model_dir: Path) -> list[int]:
    """Complete versions under model_dir (a directory holding saved_model.pb), newest first."""
    model_dir = Path(model_dir)
    return [v for v in version_directories(model_dir) if (model_dir / str(v) / SAVED_MODEL_FILE).is_file()]


def latest_version(model_dir: Path) -> int | None:
    """The newest complete version, or None when none is published."""
    versions = published_versions(model_dir)
    return versions[0] if versions else None
