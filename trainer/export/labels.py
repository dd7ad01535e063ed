"""Stable and canary labels: `python -m trainer.export promote|rollback|canary|labels`.

MODEL_BASE/<name>/labels.json (contract/labels.py) says which version users get (`stable`) and which
one gets a share of the traffic or a mirrored copy of it (`canary`); the gateway reads it. Every move:

* runs under the publish lock (trainer/export/retention.py), so it never interleaves with a publish,
  a prune or another move, and writes the file atomically (temporary file, fsync, rename, directory
  fsync): a reader sees the old labels or the new ones;
* is idempotent: asking for the labels that are already there changes nothing and says so;
* refuses unsafe moves with the reason: a version that is not published (never was, or deleted), a
  version whose model card says it failed the gate, a canary equal to stable, a rollback with no
  earlier stable or to one that was deleted.

Rollback needs the stable versions before the current one: they are kept, oldest first, in
MODEL_BASE/<name>/.labels-history.json (hidden, so neither TF Serving nor the gateway sees it). It is
written before labels.json: a crash between the two leaves one extra entry, which a rollback skips.

With `serving_config` (TF Serving's models.config), the same labels go there too: `version_labels`
{stable, canary} and `model_version_policy { specific { versions: [stable, canary] } }`, so the model
server loads exactly the labelled versions. TF Serving re-reads the file every
--model_config_file_poll_wait_seconds; it refuses a label that points at a version it has not loaded
yet unless it runs with --allow_version_labels_for_unavailable_models (docs/deploy.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from contract.labels import CANARY, LABELS_FILE, MODES, SPLIT, STABLE, Labels, LabelsError, read_labels
from contract.signatures import MODEL_CARD_PATH
from contract.versions import published_versions
from trainer.export.retention import publish_lock, write_state_file

log = logging.getLogger(__name__)

HISTORY_FILE = ".labels-history.json"
FAILED_VERDICT = "failed"  # trainer/export/gate.py's verdict of a candidate that did not pass


class LabelMoveRefused(RuntimeError):
    """The asked-for label change is unsafe; nothing was changed."""


@dataclass(frozen=True)
class Change:
    before: Labels | None
    after: Labels | None  # None only when nothing changed and there are no labels
    changed: bool
    message: str


# --- reading ----------------------------------------------------------------------------------------


def current_labels(model_dir: Path) -> Labels | None:
    """labels.json's labels, or None without one (the newest version takes all traffic)."""
    return read_labels(model_dir)


def effective_stable(model_dir: Path, labels: Labels | None) -> int | None:
    """The version users get today: labels.json's stable, else the newest published version."""
    if labels is not None:
        return labels.stable
    published = published_versions(model_dir)
    return published[0] if published else None


def _read_history(model_dir: Path) -> list[int]:
    try:
        data = json.loads((model_dir / HISTORY_FILE).read_text())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise LabelMoveRefused(
            f"{model_dir / HISTORY_FILE} is not JSON ({exc}); without it rollback cannot know the earlier "
            "stable versions: delete it and use `promote VERSION` instead of rollback"
        ) from None
    stables = data.get("stables", []) if isinstance(data, dict) else []
    return [v for v in stables if isinstance(v, int) and not isinstance(v, bool)]


def _write_history(model_dir: Path, stables: list[int]) -> None:
    write_state_file(model_dir / HISTORY_FILE, json.dumps({"stables": stables}) + "\n")


# --- checks -----------------------------------------------------------------------------------------


def _check_servable(model_dir: Path, version: int, role: str) -> None:
    """Refuse a version that is not published or whose model card says it failed the gate."""
    if version not in published_versions(model_dir):
        raise LabelMoveRefused(
            f"version {version} is not published under {model_dir} (no {version}/saved_model.pb: never "
            f"published, or deleted), so it cannot be {role}; published: "
            f"{published_versions(model_dir) or 'none'}"
        )
    card_path = model_dir / str(version) / MODEL_CARD_PATH
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        log.warning("version %d has no readable model card: its gate verdict cannot be checked", version)
        return
    gate = card.get("gate") if isinstance(card, dict) else None
    if isinstance(gate, dict) and gate.get("verdict") == FAILED_VERDICT:
        why = "; ".join(gate.get("reasons") or []) or "see its model card"
        raise LabelMoveRefused(
            f"version {version} failed the export gate ({why}), so it cannot be {role}; publish a version "
            "that passes it"
        )


# --- writing ----------------------------------------------------------------------------------------


def _apply(
    model_dir: Path,
    before: Labels | None,
    after: Labels,
    message: str,
    *,
    history: list[int] | None = None,
    serving_config: Path | None = None,
    model_name: str | None = None,
) -> Change:
    """Write the new labels (history first), and models.config when given; the caller holds the lock."""
    if after.canary is not None and after.canary == after.stable:
        raise LabelMoveRefused(f"canary and stable would both be version {after.stable}; use another version")
    changed = before != after
    # A models.config that cannot take the labels fails the move before labels.json changes.
    config_text = None
    if serving_config is not None:
        stables = history if history is not None else _read_history(model_dir)
        standby = _standby(model_dir, after, stables)
        config_text = render_serving_config(serving_config, model_name or model_dir.name, after, standby)
    if history is not None:
        _write_history(model_dir, history)
    if changed:
        write_state_file(model_dir / LABELS_FILE, json.dumps(after.to_dict()) + "\n")
        log.info("%s: %s", model_dir / LABELS_FILE, json.dumps(after.to_dict()))
    if serving_config is not None and config_text is not None:
        write_state_file(serving_config, config_text)
        log.info("%s: versions %s, labels %s", serving_config, sorted({*after.versions(), *standby}),
                 {STABLE: after.stable, CANARY: after.canary})
    return Change(before, after, changed, message if changed else f"nothing to do: {message}")


def promote(
    model_dir: Path,
    version: int | None = None,
    *,
    canary: bool = False,
    serving_config: Path | None = None,
    model_name: str | None = None,
) -> Change:
    """Make `version` (or, with canary=True, the current canary) stable; the canary label is cleared
    when it was that version."""
    model_dir = Path(model_dir)
    if (version is None) == (not canary):
        raise ValueError("promote takes a VERSION or --canary, not both")
    with publish_lock(model_dir):
        before = current_labels(model_dir)
        if canary:
            if before is None or before.canary is None:
                stable = effective_stable(model_dir, before)
                raise LabelMoveRefused(f"there is no canary to promote (stable is {stable}); name a VERSION")
            version = before.canary
        assert version is not None
        current = effective_stable(model_dir, before)
        if before is not None and before.stable == version and before.canary != version:
            return _apply(model_dir, before, before, f"version {version} is already stable",
                          serving_config=serving_config, model_name=model_name)
        _check_servable(model_dir, version, STABLE)
        history = _read_history(model_dir)
        if current is not None and current != version:
            history = [*history, current]
        after = Labels(stable=version)
        if before is not None and before.canary not in (None, version):
            after = replace(before, stable=version)  # another canary keeps running against the new stable
        return _apply(model_dir, before, after, f"version {version} is stable (was {current})",
                      history=history, serving_config=serving_config, model_name=model_name)


def rollback(
    model_dir: Path,
    *,
    expect_stable: int | None = None,
    serving_config: Path | None = None,
    model_name: str | None = None,
) -> Change:
    """Make the previous stable version stable again. With `expect_stable` (--from), only when that
    version is stable now: a retried rollback then does nothing instead of stepping back twice."""
    model_dir = Path(model_dir)
    with publish_lock(model_dir):
        before = current_labels(model_dir)
        current = effective_stable(model_dir, before)
        if expect_stable is not None and current != expect_stable:
            return Change(before, before, False,
                          f"nothing to do: stable is {current}, not {expect_stable} (already rolled back?)")
        history = _read_history(model_dir)
        while history and history[-1] == current:  # an entry left by a crash between the two writes
            history.pop()
        if not history:
            raise LabelMoveRefused(
                f"no earlier stable version is recorded for {model_dir} (stable is {current}); "
                "use `promote VERSION` to choose one"
            )
        previous = history[-1]
        if previous not in published_versions(model_dir):
            raise LabelMoveRefused(
                f"the previous stable version {previous} was deleted (no {model_dir / str(previous)}/"
                f"saved_model.pb), so stable {current} cannot be rolled back to it; promote a published "
                f"version instead: {published_versions(model_dir) or 'none'}"
            )
        _check_servable(model_dir, previous, STABLE)
        after = Labels(stable=previous)
        if before is not None and before.canary not in (None, previous):
            after = replace(before, stable=previous)
        return _apply(model_dir, before, after, f"rolled back: version {previous} is stable (was {current})",
                      history=history[:-1], serving_config=serving_config, model_name=model_name)


def set_canary(
    model_dir: Path,
    version: int,
    percent: float,
    *,
    mode: str = SPLIT,
    serving_config: Path | None = None,
    model_name: str | None = None,
) -> Change:
    """Label `version` canary with `percent` of the traffic (mode split) or a mirrored copy (shadow)."""
    model_dir = Path(model_dir)
    with publish_lock(model_dir):
        return set_canary_locked(model_dir, version, percent, mode=mode, serving_config=serving_config,
                                 model_name=model_name)


def set_canary_locked(
    model_dir: Path,
    version: int,
    percent: float,
    *,
    mode: str = SPLIT,
    serving_config: Path | None = None,
    model_name: str | None = None,
    first_becomes_stable: bool = False,
) -> Change:
    """set_canary for a caller that holds the publish lock (export --as-canary). Without labels.json,
    stable is the newest published version other than `version`; when there is none, `version` is
    made stable if `first_becomes_stable`, else the move is refused."""
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"--percent must be from 0 to 100, got {percent}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    before = current_labels(model_dir)
    if before is not None:
        stable = before.stable
    else:
        others = [v for v in published_versions(model_dir) if v != version]
        if not others and first_becomes_stable:
            _check_servable(model_dir, version, STABLE)
            return _apply(model_dir, None, Labels(stable=version),
                          f"version {version} is stable: no earlier version for it to be the canary of",
                          serving_config=serving_config, model_name=model_name)
        if not others:
            raise LabelMoveRefused(
                f"version {version} is the only published version: there is no stable one for it to be the "
                f"canary of; promote it instead (`promote {version}`)"
            )
        stable = others[0]
    if version == stable:
        raise LabelMoveRefused(f"version {version} is stable; a canary must be another version")
    _check_servable(model_dir, version, CANARY)
    after = Labels(stable=stable, canary=version, canary_percent=float(percent), mode=mode)
    what = "mirrored (shadow)" if mode != SPLIT else f"{percent:g}% of the traffic"
    return _apply(model_dir, before, after, f"version {version} is canary with {what}; stable is {stable}",
                  serving_config=serving_config, model_name=model_name)


def clear_canary(
    model_dir: Path, *, serving_config: Path | None = None, model_name: str | None = None
) -> Change:
    """Remove the canary label: stable takes all traffic."""
    model_dir = Path(model_dir)
    with publish_lock(model_dir):
        before = current_labels(model_dir)
        if before is None:
            raise LabelMoveRefused(f"{model_dir} has no labels.json: there is no canary to stop")
        after = Labels(stable=before.stable)
        return _apply(model_dir, before, after, f"no canary; version {before.stable} takes all traffic",
                      serving_config=serving_config, model_name=model_name)


# --- TF Serving's models.config ---------------------------------------------------------------------


def _standby(model_dir: Path, labels: Labels, stables: list[int]) -> tuple[int, ...]:
    """The previous stable version, when still published: TF Serving keeps it loaded, so a rollback's
    label move points at a loaded version (TF Serving refuses to move a label to one that is not)."""
    published = published_versions(model_dir)
    earlier = [v for v in stables if v not in labels.versions() and v in published]
    return (earlier[-1],) if earlier else ()


def write_serving_config(path: Path, model_name: str, labels: Labels, standby: tuple[int, ...] = ()) -> None:
    """Rewrite models.config atomically (render_serving_config, then temporary file, fsync, rename)."""
    write_state_file(Path(path), render_serving_config(path, model_name, labels, standby))


def render_serving_config(path: Path, model_name: str, labels: Labels, standby: tuple[int, ...] = ()) -> str:
    """models.config's text with `labels`: TF Serving loads the labelled versions (and `standby`, the
    previous stable, unlabelled) and knows the labels, i.e. `specific { versions }` and `version_labels`
    of every entry serving `model_name` (by name or base_path's last component). Comments in the file
    are not kept."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = Path(path)
    try:
        config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--serving-config {path} does not exist; pass TF Serving's models.config"
        ) from None
    except text_format.ParseError as exc:
        raise ValueError(
            f"--serving-config {path} is not a TF Serving ModelServerConfig ({exc}); fix it"
        ) from None
    entries = [
        entry
        for entry in config.model_config_list.config
        if model_name in (entry.name, PurePosixPath(entry.base_path).name)
    ]
    if not entries:
        raise ValueError(f"--serving-config {path} has no entry for model {model_name!r}; add one first")
    for entry in entries:
        entry.model_version_policy.Clear()
        entry.model_version_policy.specific.versions.extend(sorted({*labels.versions(), *standby}))
        entry.version_labels.clear()
        entry.version_labels[STABLE] = labels.stable
        if labels.canary is not None:
            entry.version_labels[CANARY] = labels.canary
    header = (
        "# TensorFlow Serving model config (--model_config_file), text format of\n"
        "# tensorflow.serving.ModelServerConfig, written by `python -m trainer.export promote|rollback|\n"
        f"# canary` from {LABELS_FILE}: the labelled versions and the previous stable are loaded.\n"
        "# TF Serving re-reads it every --model_config_file_poll_wait_seconds; a new label on a version\n"
        "# not loaded yet is refused unless it runs with --allow_version_labels_for_unavailable_models.\n"
    )
    return header + text_format.MessageToString(config)


def describe(model_dir: Path) -> str:
    """`labels`: what labels.json says, or what is served without one."""
    model_dir = Path(model_dir)
    try:
        labels = current_labels(model_dir)
    except LabelsError as exc:
        return f"error: {exc}"
    published = published_versions(model_dir)
    if labels is None:
        newest = published[0] if published else None
        return json.dumps({"labels_json": None, "served": newest, "published": published,
                           "note": "no labels.json: the newest version takes all traffic"})
    history = _read_history(model_dir)
    return json.dumps({**labels.to_dict(), "published": published, "previous_stables": history})
