"""The published versions under MODEL_BASE/<name>/, listed once for the gateway, the publisher and tests.

Layout is TensorFlow Serving's: MODEL_BASE/<name>/<version>/saved_model.pb. A child directory is a
version when its name is the plain decimal form of a positive integer: "1", "42". Everything else is
ignored rather than guessed at:
  * hidden or suffixed names (".tmp-3-123", "3.partial"): a publish in progress or a staging copy;
  * "0": the publisher numbers from 1, and the gateway never served a version 0;
  * "007": TF Serving would read it as 7, but every caller addresses version 7 as `model_dir / "7"`,
    which is another directory; the publisher never writes such a name;
  * "²" and other non-ASCII digits: `str.isdigit()` accepts them, `int()` and TF Serving do not.

Each ignored name that is not hidden (".name") is logged once per process as a warning, so a stray
"²" or "tmp-xyz" is seen, not silently skipped on every poll.

A version is *published* once its saved_model.pb exists: the publisher writes under a hidden name
and renames the finished directory into place, so a version-named directory without one is a
hand-made or broken copy.

Every list here is newest first: the gateway tries the newest version first and falls back to older
ones, TF Serving's default policy serves the newest, and the publisher numbers past the newest.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from contract.labels import LABELS_FILE
from contract.signatures import SAVED_MODEL_FILE

log = logging.getLogger(__name__)

# (model directory, entry name) already warned about: the gateway and the TF Serving double list
# versions on every poll, and one warning per stray name is enough.
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


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
    versions = []
    for entry in entries:
        number = version_number(entry.name)
        if number is not None and entry.is_dir():
            versions.append(number)
        # Hidden names are the publisher's own (.tmp-*, .last-version); labels.json says which is stable.
        elif not entry.name.startswith(".") and entry.name != LABELS_FILE:
            _warn_once(entry, number)
    return sorted(versions, reverse=True)


def _warn_once(entry: Path, number: int | None) -> None:
    key = (str(entry.parent), entry.name)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    if number is not None:
        why = "a file, not a version directory"
    elif entry.name.isascii() and entry.name.isdigit():
        why = (
            f"not a version name: versions are 1, 2, ... without leading zeros (TF Serving would still load "
            f"it as version {int(entry.name)}; rename it to {str(int(entry.name))!r} if it is one)"
            if int(entry.name)
            else "not a version name: versions start at 1"
        )
    else:
        why = "not a version name: versions are directories named 1, 2, ... (ASCII digits)"
    log.warning(
        "ignoring %r in %s: %s; move it out or hide it with a leading '.'", entry.name, entry.parent, why
    )


def published_versions(model_dir: Path) -> list[int]:
    """Complete versions under model_dir (a directory holding saved_model.pb), newest first."""
    model_dir = Path(model_dir)
    return [v for v in version_directories(model_dir) if (model_dir / str(v) / SAVED_MODEL_FILE).is_file()]


def latest_version(model_dir: Path) -> int | None:
    """The newest complete version, or None when none is published."""
    versions = published_versions(model_dir)
    return versions[0] if versions else None
