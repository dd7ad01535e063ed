"""The model base directory, watched the way TensorFlow Serving's file-system source watches it.

Layout: BASE/<model name>/<version>/saved_model.pb. Like TF Serving, only all-digit directory names
are versions (anything else, e.g. a half-written `.tmp-3` or `3.partial`, is ignored; the rule is
contract/versions.py's, shared with the gateway and the publisher), and the default version policy
serves only the latest version; with `all_versions=True` every version is served (TF Serving's
`model_version_policy { all {} }`). A version that disappears or is superseded is unloaded and then
reported with state END, as GetModelStatus does after a rollout.

With `model_config` (TF Serving's --model_config_file: a text ModelServerConfig, re-read on every
poll as with --model_config_file_poll_wait_seconds) the models, base paths and version policies
(`latest { num_versions }`, `all {}`, `specific { versions }`) come from the file, and so do the
`version_labels`, which ModelSpec.version_label resolves (server_core.cc GetModelVersionForLabel;
an unknown label is INVALID_ARGUMENT "Unrecognized servable version label: <label>"). As in
ServerCore::UpdateModelVersionLabelMap, a label may only point at an AVAILABLE version; with
`allow_version_labels_for_unavailable_models` (the server flag) a new label may point anywhere, but
an existing label may still only move to an AVAILABLE version. A config whose labels break that
rule is refused as a whole (FAILED_PRECONDITION "Request to assign label to version N of model M,
which is not currently available for inference", kept in `config_error`): the labels in force stay.

A version that fails to load is reported as END with the loader's own error in its status
(basic_manager.cc publishes {id, kEnd, error}; get_model_status_impl.cc copies it through
ToStatusProto). Known simplifications (codes and messages are unaffected; timing is not):
  * TF Serving (file_system_storage_path_source.cc) takes any child whose name safe_strto64 parses
    as a version and tries to load it, saved_model.pb or not; the double waits for saved_model.pb,
    which stands in for the server retrying a failed load (--max_num_load_retries=5, 60 s apart).
    Names such as "0" or "007" that TF Serving would parse are not versions here (see
    contract/versions.py: nothing publishes them, and "007" is not the directory of version 7).
  * Those retries keep a failing version in LOADING for minutes; the double reports END at once.
  * START / LOADING / UNLOADING are never observed: loads and unloads here are synchronous.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from contract.versions import published_versions
from tests.tfserving_double.servable import CODES_BY_VALUE, Servable, ServingError


@dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    state: str  # "AVAILABLE" or "END" (names of ModelVersionStatus.State)
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


def _load_error(path: Path, err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status TF Serving's C++ loader would report for this Python loader failure."""
    if isinstance(err, tf.errors.OpError):  # TensorFlow's own status (e.g. restoring variables)
        return CODES_BY_VALUE.get(err.error_code, grpc.StatusCode.UNKNOWN), err.message
    if isinstance(err, OSError) and "Cannot parse file" in str(err):
        # Python's loader words it "Cannot parse file ..."; the C++ one (ReadBinaryProto) says:
        return grpc.StatusCode.DATA_LOSS, f"Can't parse {path / 'saved_model.pb'} as binary proto"
    return grpc.StatusCode.UNKNOWN, str(err)


class ModelRegistry:
    """Loaded versions per model name; `refresh()` brings them in line with the directory."""

    def __init__(
        self,
        model_base: Path,
        *,
        all_versions: bool = False,
        model_config: Path | None = None,
        allow_version_labels_for_unavailable_models: bool = False,
    ) -> None:
        self.model_base = Path(model_base)
        self.all_versions = all_versions
        self.model_config = Path(model_config) if model_config is not None else None
        self.allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._lock = threading.Lock()
        self._loaded: dict[str, dict[int, Servable]] = {}
        self._states: dict[str, dict[int, VersionState]] = {}
        self._labels: dict[str, dict[str, int]] = {}  # model -> label -> version (the map in force)
        self.config_error = ""  # why the last models.config was refused ("" when it was applied)

    def refresh(self) -> None:
        """Load new versions, unload removed or superseded ones. Safe to call from any thread."""
        if self.model_config is not None:
            self._refresh_from_config(self.model_config)
            return
        names = [p.name for p in self.model_base.iterdir() if p.is_dir()] if self.model_base.is_dir() else []
        for name in sorted(set(names) | set(self._loaded)):
            on_disk = published_versions(self.model_base / name)  # newest first
            wanted = on_disk if self.all_versions else on_disk[:1]
            self._sync_model(name, wanted)

    def _refresh_from_config(self, path: Path) -> None:
        try:
            config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
        except text_format.ParseError as error:  # the server logs it and keeps the config in force
            self.config_error = f"Invalid protobuf file: '{path}': {error}"
            return
        entries = list(config.model_config_list.config)
        for entry in entries:
            on_disk = published_versions(Path(entry.base_path))  # newest first
            policy = entry.model_version_policy
            choice = policy.WhichOneof("policy_choice")
            if choice == "all":
                wanted = on_disk
            elif choice == "specific":
                wanted = [v for v in on_disk if v in set(policy.specific.versions)]
            else:  # latest (also the default when no policy is given), num_versions defaulting to 1
                wanted = on_disk[: max(1, policy.latest.num_versions) if choice == "latest" else 1]
            self._sync_model(entry.name, wanted)
        for name in set(self._loaded) - {entry.name for entry in entries}:
            self._sync_model(name, [])  # a model removed from the config is unloaded
        self._update_labels(entries)

    def _update_labels(self, entries: list) -> None:
        """server_core.cc UpdateModelVersionLabelMap: all labels of the config, or none of them."""
        new: dict[str, dict[str, int]] = {}
        with self._lock:
            for entry in entries:
                available = set(self._loaded.get(entry.name, {}))
                for label, version in sorted(entry.version_labels.items()):
                    existing = self._labels.get(entry.name, {}).get(label)
                    allowed = self.allow_unavailable_labels and (existing is None or existing == version)
                    if not allowed and version not in available:
                        self.config_error = (
                            f"Request to assign label to version {version} of model {entry.name}, "
                            "which is not currently available for inference"
                        )
                        return
                    new.setdefault(entry.name, {})[label] = version
            self._labels = new
            self.config_error = ""

    def version_for_label(self, name: str, label: str) -> int:
        """server_core.cc GetModelVersionForLabel."""
        with self._lock:
            version = self._labels.get(name, {}).get(label)
        if version is None:
            message = f"Unrecognized servable version label: {label}"
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)
        return version

    def _sync_model(self, name: str, wanted: list[int]) -> None:
        loaded = self._loaded.get(name, {})
        with self._lock:
            states = self._states.setdefault(name, {})
        for version in wanted:
            if version in loaded or states.get(version, VersionState("")).error_code != grpc.StatusCode.OK:
                continue  # loaded, or ended in error: not reloaded (enable_reload_servables_with_error)
            try:
                servable = Servable(name, version, self.model_base / name / str(version))
            except Exception as err:  # any load failure is reported through GetModelStatus
                code, message = _load_error(self.model_base / name / str(version), err)
                with self._lock:
                    states[version] = VersionState("END", code, message)
                continue
            with self._lock:
                self._loaded.setdefault(name, {})[version] = servable
                states[version] = VersionState("AVAILABLE")
        # AvailabilityPreservingPolicy (the model server's policy): the new version is loaded
        # before an old one goes, and while no wanted version is serving (e.g. the new one failed
        # to load) the newest old one keeps serving; with no wanted version at all, all go.
        serving = set(self._loaded.get(name, {}))
        unwanted = sorted(serving - set(wanted))
        if wanted and not serving & set(wanted):
            unwanted = unwanted[:-1]
        for version in unwanted:
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
