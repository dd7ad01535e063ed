"""The model base directory, watched the way TensorFlow Serving's file-system source watches it.

Layout: BASE/<model name>/<version>/saved_model.pb. Like TF Serving, only all-digit directory names
are versions (anything else, e.g. a half-written `.tmp-3` or `3.partial`, is ignored), and the
default version policy serves only the latest version; with `all_versions=True` every version is
served (TF Serving's `model_version_policy { all {} }`). A version that disappears or is superseded
is unloaded and then reported with state END, as GetModelStatus does after a rollout.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.tfserving_double.servable import Servable, ServingError


@dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    state: str  # "AVAILABLE" or "END" (names of ModelVersionStatus.State)
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


def _versions_on_disk(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        # isdecimal, not isdigit: "²" is a digit to Python but not to TF Serving's parser.
        if child.name.isascii() and child.name.isdecimal() and (child / "saved_model.pb").is_file()
    )


class ModelRegistry:
    """Loaded versions per model name; `refresh()` brings them in line with the directory."""

    def __init__(self, model_base: Path, *, all_versions: bool = False) -> None:
        self.model_base = Path(model_base)
        self.all_versions = all_versions
        self._lock = threading.Lock()
        self._loaded: dict[str, dict[int, Servable]] = {}
        self._states: dict[str, dict[int, VersionState]] = {}

    def refresh(self) -> None:
        """Load new versions, unload removed or superseded ones. Safe to call from any thread."""
        names = [p.name for p in self.model_base.iterdir() if p.is_dir()] if self.model_base.is_dir() else []
        for name in sorted(set(names) | set(self._loaded)):
            on_disk = _versions_on_disk(self.model_base / name)
            wanted = on_disk if self.all_versions else on_disk[-1:]
            self._sync_model(name, wanted)

    def _sync_model(self, name: str, wanted: list[int]) -> None:
        loaded = self._loaded.get(name, {})
        with self._lock:
            states = self._states.setdefault(name, {})
        for version in wanted:
            if version in loaded or states.get(version, VersionState("")).error_code != grpc.StatusCode.OK:
                continue  # loaded already, or failed before: TF Serving does not retry a failed load
            try:
                servable = Servable(name, version, self.model_base / name / str(version))
            except Exception as err:  # any load failure is reported through GetModelStatus
                with self._lock:
                    states[version] = VersionState("END", grpc.StatusCode.UNKNOWN, f"failed to load: {err}")
                continue
            with self._lock:
                self._loaded.setdefault(name, {})[version] = servable
                states[version] = VersionState("AVAILABLE")
        # The new version is loaded before the old one goes: no gap in availability.
        for version in sorted(set(self._loaded.get(name, {})) - set(wanted)):
            with self._lock:
                servable = self._loaded[name].pop(version)
                states[version] = VersionState("END")
            servable.close()

    def get(self, name: str, version: int | None) -> Servable:
        """The servable for a request; NOT_FOUND worded like TF Serving's ServableHandle lookup."""
        with self._lock:
            versions = self._loaded.get(name, {})
            if version is None:
                if versions:
                    return versions[max(versions)]
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})"
                )
            if version in versions:
                return versions[version]
        raise ServingError(
            grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})"
        )

    def status(self, name: str, version: int | None) -> dict[int, VersionState]:
        """version -> state, for GetModelStatus (all versions, or the one asked for)."""
        with self._lock:
            states = dict(self._states.get(name, {}))
        if not states:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        if version is None:
            return states
        if version not in states:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
        return {version: states[version]}

    def close(self) -> None:
        with self._lock:
            servables = [s for versions in self._loaded.values() for s in versions.values()]
            self._loaded.clear()
        for servable in servables:
            servable.close()
