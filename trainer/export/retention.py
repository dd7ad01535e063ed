"""Numbering, locking and pruning the versions under MODEL_BASE/<name>/, so publishing cannot hurt serving.

Imports no TensorFlow (publish.py does the export; this module only moves directories), so its
rules are quick to test with real processes.

* **One publisher at a time.** Every publish holds an exclusive `flock` on MODEL_DIR/.publish.lock
  while it gates, numbers, writes, renames and prunes: two exports started together both publish,
  one after the other, with different numbers. The lock belongs to the open file, so it is released
  when the exporter exits or is killed, whatever its PID (export runs as PID 1 in every pod). On NFS,
  Linux turns flock into an NFS lock that every client sees, unless the share is mounted with
  `local_lock=flock|all` or `nolock`.
* **Leftovers are reclaimed by lock and age, never by PID.** `.tmp-*` (a version being written, a
  state file being replaced) and `.trash-*` (a pruned version being deleted) are removed only by a
  publisher that holds the lock, and only when nothing in them was written for STALE_AFTER_S: a
  lock that another node cannot see (see above) still cannot cost a running export its directory.
* **--keep never removes what TF Serving is told to serve.** With the model server's config
  (`--serving-config`, the models.config passed to `--model_config_file`), every version it pins
  (`specific { versions }`), labels (`version_labels`) or serves (`latest { num_versions: N }` keeps
  the N newest, `all {}` keeps all) is kept beside the newest --keep, and the log says why. So is
  every version MODEL_DIR/labels.json names (`stable`, `canary`: contract/labels.py), with or without
  the config; an unreadable labels.json prunes nothing.
* **State is durable.** The version directory is fsynced file by file before it is renamed into
  place, and the model directory after; the high-water mark is written to a temporary file, fsynced,
  renamed over the old one, and the directory fsynced, so a crash leaves the old or the new number.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from contract.labels import Labels, LabelsError, read_labels
from contract.versions import published_versions, version_directories

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# The highest version number ever published here. Versions only grow: after a bad version's folder is
# removed (a rollback), the next export must not reuse its number, or servers and caches that saw the
# old one would take different weights for the same version.
HIGH_WATER_FILE = ".last-version"
LOCK_FILE = ".publish.lock"
# A leftover must have seen no write for this long before it is reclaimed. An export writes its
# directory within minutes; a night passes between two scheduled exports.
STALE_AFTER_S = 3600.0


# --- the publish lock -------------------------------------------------------------------------------


@contextmanager
def publish_lock(model_dir: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold MODEL_DIR/.publish.lock exclusively; yields True once held.

    With blocking=False, yields False at once when another process holds it. The lock file stays
    (removing it would let two processes lock two different files); it records the holder's host,
    PID and start time for the message another publisher prints while it waits.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another export"
            log.info("waiting for %s, held by %s", path, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {started}\n".encode(), 0)
        yield True
    finally:
        os.close(fd)  # releases the lock


# --- leftovers --------------------------------------------------------------------------------------


def _last_written(path: Path) -> float:
    """The newest modification time in `path` (a file, or a directory and everything under it)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _reclaim_locked(model_dir: Path, min_age_s: float) -> list[Path]:
    """reclaim_temporaries' work; the caller holds the publish lock."""
    removed = []
    now = time.time()
    for path in sorted(model_dir.iterdir()):
        if not path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        try:
            age = now - _last_written(path)
        except FileNotFoundError:
            continue
        if age < min_age_s:
            # Under the lock no export of ours writes here, so this one was written by an exporter the
            # lock does not reach (another node with node-local locks) or only just died: leave it.
            log.warning(
                "leaving %s: written %.0f s ago, and leftovers are reclaimed only after %.0f s without "
                "a write (an export elsewhere may still be writing it)",
                path,
                age,
                min_age_s,
            )
            continue
        _remove(path)
        removed.append(path)
        log.info("reclaimed %s, left by an export that died (no write for %.0f s)", path, age)
    if removed:
        _fsync_dir(model_dir)
    return removed


def reclaim_temporaries(model_dir: Path, *, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete `.tmp-*`/`.trash-*` leftovers of exports that died; returns what was removed.

    Nothing is removed while another process holds the publish lock (its export may own them), nor
    anything written to in the last `min_age_s` seconds. Process IDs are not looked at: in a container
    every exporter is PID 1, so a dead exporter's PID is always "alive".
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    with publish_lock(model_dir, blocking=False) as held:
        if not held:
            log.info("not reclaiming leftovers in %s: an export holds %s", model_dir, model_dir / LOCK_FILE)
            return []
        return _reclaim_locked(model_dir, min_age_s)


# --- durable files and renames ----------------------------------------------------------------------


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries: a rename or removal in it survives a crash only after this."""
    _fsync_path(path)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, so they are on disk before a rename publishes them."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def write_state_file(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically and durably: temporary file, fsync, rename, fsync the directory.

    A crash at any point leaves the old content or the new one, never an empty or torn file.
    """
    tmp = path.parent / f"{TMP_PREFIX}{path.name.lstrip('.')}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def rename_no_overwrite(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place (atomic within one file system) and persist the rename."""
    # os.rename would silently replace an *empty* directory; refuse any existing name instead. A
    # non-empty one makes rename fail anyway, which covers an exporter that the lock did not reach.
    message = f"version {final} appeared while exporting (another export?); not overwriting it"
    if final.exists():
        raise FileExistsError(message)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        raise FileExistsError(message) from exc
    _fsync_dir(final.parent)


# --- version numbers --------------------------------------------------------------------------------


def read_high_water(model_dir: Path) -> int:
    """The highest version ever published under model_dir (0 when none was recorded)."""
    try:
        return int((model_dir / HIGH_WATER_FILE).read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError as exc:
        raise ValueError(
            f"{model_dir / HIGH_WATER_FILE} does not hold a version number; write the highest version "
            "ever published there (or delete it to count from the folders present)"
        ) from exc


def write_high_water(model_dir: Path, version: int) -> None:
    write_state_file(model_dir / HIGH_WATER_FILE, f"{version}\n")


def next_version(model_dir: Path) -> int:
    """One past every version directory present (complete or not: TF Serving sees its number) and past
    the high-water mark (a removed version's number is not reused). Call under the publish lock."""
    return max(version_directories(model_dir)[:1] + [read_high_water(model_dir)]) + 1


def publish_version(
    model_dir: Path,
    write: Callable[[Path, int], None],
    *,
    keep: int | None = None,
    serving_config: Path | None = None,
    model_name: str | None = None,
    gate: Callable[[], None] | None = None,
    on_published: Callable[[int], None] | None = None,
    stale_after_s: float = STALE_AFTER_S,
) -> Path:
    """Publish the next version of model_dir: `write(directory, version)` fills a hidden directory,
    which is fsynced and renamed to MODEL_DIR/<version>; then versions beyond `keep` are pruned
    (see prune_versions). Returns the version's path.

    All of it, `gate()` (a check before anything is written) and `on_published(version)` (e.g.
    labelling the new version canary, before pruning), runs under the publish lock, so concurrent
    publishes queue instead of taking the same number, and labels change with no publish in between.
    """
    model_dir = Path(model_dir)
    if keep is not None and keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}); the newest version is never removed")
    with publish_lock(model_dir):
        if gate is not None:
            gate()
        _reclaim_locked(model_dir, stale_after_s)
        version = next_version(model_dir)
        tmp = model_dir / f"{TMP_PREFIX}{version}-{secrets.token_hex(4)}"
        final = model_dir / str(version)
        try:
            write(tmp, version)
            fsync_tree(tmp)  # the files must be on disk before the rename makes them visible
            rename_no_overwrite(tmp, final)
            write_high_water(model_dir, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("published %s", final)
        if on_published is not None:
            on_published(version)
        if keep is not None:
            try:
                policies = _policies(serving_config, model_name or model_dir.name)
            except (OSError, ValueError) as exc:
                # The version is out; removing old ones without knowing which are pinned could take
                # the served one away, so keep them all until the config is fixed.
                log.error("published %s but pruned nothing: %s", final, exc)
            else:
                _prune_locked(model_dir, keep, policies, serving_config)
    return final


# --- what TF Serving serves -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingPolicy:
    """What one entry of TF Serving's models.config says about this model directory."""

    source: Path
    name: str
    kind: str  # "latest" | "all" | "specific", as in model_version_policy
    latest: int = 1  # latest { num_versions }: how many of the newest versions are served
    specific: tuple[int, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)


def read_serving_config(path: Path, model_name: str) -> list[ServingPolicy]:
    """The entries of a TF Serving models.config (text ModelServerConfig) that serve `model_name`.

    An entry matches by name or by the last component of its base_path (the model server sees the
    model base at its own mount point). Raises FileNotFoundError / ValueError naming the file and
    the fix; [] (with a warning) when no entry serves this model.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--serving-config {path} does not exist; pass the models.config TF Serving reads "
            "(its --model_config_file), mounted into the exporter, or drop the flag"
        ) from None
    try:
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as exc:
        raise ValueError(
            f"--serving-config {path} is not a TF Serving ModelServerConfig ({exc}); fix it (the model "
            "server refuses it too) before publishing, so that pinned versions can be kept"
        ) from None
    policies = []
    for entry in config.model_config_list.config:
        if model_name not in (entry.name, PurePosixPath(entry.base_path).name):
            continue
        policy = entry.model_version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"  # TF Serving's default: the newest one
        policies.append(
            ServingPolicy(
                source=path,
                name=entry.name,
                kind=kind,
                # TF Serving serves max(num_versions, 1) newest versions.
                latest=max(policy.latest.num_versions, 1) if kind == "latest" else 0,
                specific=tuple(policy.specific.versions) if kind == "specific" else (),
                labels=dict(entry.version_labels),
            )
        )
    if not policies:
        log.warning(
            "%s serves no model named %r (or with a base_path ending in it); only --keep decides what stays",
            path,
            model_name,
        )
    return policies


def protected_versions(
    published: list[int], keep: int, policies: list[ServingPolicy], labels: Labels | None = None
) -> dict[int, list[str]]:
    """Version -> why it must stay: among the newest `keep`, served, pinned or labelled by a policy, or
    named by labels.json (`labels`).

    `published` is newest first (contract.versions.published_versions).
    """
    reasons: dict[int, list[str]] = {}

    def protect(version: int, why: str) -> None:
        reasons.setdefault(version, []).append(why)

    for version in published[:keep]:
        protect(version, f"one of the newest {keep} (--keep {keep})")
    for policy in policies:
        where = f"in {policy.source} (model {policy.name!r})"
        if policy.kind == "all":
            for version in published:
                protect(version, f"served: model_version_policy all {{}} {where}")
        elif policy.kind == "latest":
            for version in published[: policy.latest]:
                protect(version, f"served: latest {{ num_versions: {policy.latest} }} {where}")
        for version in policy.specific:
            protect(version, f"pinned: specific {{ versions: {version} }} {where}")
        for label, version in sorted(policy.labels.items()):
            protect(version, f"labelled {label!r} (version_labels) {where}")
    if labels is not None:
        protect(labels.stable, "labelled 'stable' in labels.json")
        if labels.canary is not None:
            protect(labels.canary, "labelled 'canary' in labels.json")
    return reasons


def _policies(serving_config: Path | None, model_name: str) -> list[ServingPolicy]:
    return read_serving_config(serving_config, model_name) if serving_config is not None else []


def _prune_locked(
    model_dir: Path, keep: int, policies: list[ServingPolicy], serving_config: Path | None
) -> list[int]:
    published = published_versions(model_dir)  # newest first, complete versions only
    try:
        labels = read_labels(model_dir)
    except (LabelsError, OSError) as exc:
        # Which versions the gateway serves is unknown: removing any could take the stable one away.
        log.error("pruned nothing: %s", exc)
        return []
    reasons = protected_versions(published, keep, policies, labels)
    for version in sorted(v for v in reasons if v not in published):
        log.warning(
            "version %d is %s, but %s holds no complete version %d (no saved_model.pb): TF Serving "
            "cannot serve it",
            version,
            "; ".join(reasons[version]),
            model_dir,
            version,
        )
    for version in published[keep:]:
        if version in reasons:
            log.info("kept version %d beyond --keep %d: %s", version, keep, "; ".join(reasons[version]))
    doomed = sorted(v for v in published if v not in reasons)  # oldest first
    if doomed and serving_config is None:
        log.warning(
            "pruning without --serving-config: a version TF Serving pins or labels in its models.config "
            "cannot be seen and would be removed; pass the models.config the model server reads"
        )
    for version in doomed:
        # Rename first so the server sees the version vanish at once, not file by file.
        trash = model_dir / f"{TRASH_PREFIX}{version}-{secrets.token_hex(4)}"
        os.rename(model_dir / str(version), trash)
        _fsync_dir(model_dir)
        shutil.rmtree(trash)
        log.info("removed version %d: beyond the newest %d; not served, pinned or labelled", version, keep)
    return doomed


def prune_versions(
    model_dir: Path, keep: int, *, serving_config: Path | None = None, model_name: str | None = None
) -> list[int]:
    """Remove the complete versions that are neither among the newest `keep` (>= 1, so the newest
    always stays) nor served, pinned or labelled by TF Serving's config `serving_config` for
    `model_name` (default: model_dir's name). Returns the versions removed, oldest first.

    Takes the publish lock, so it never runs beside a publish.
    """
    if keep < 1:
        raise ValueError(f"--keep must be at least 1 (got {keep}); the newest version is never removed")
    model_dir = Path(model_dir)
    policies = _policies(serving_config, model_name or model_dir.name)  # a bad config removes nothing
    with publish_lock(model_dir):
        return _prune_locked(model_dir, keep, policies, serving_config)
