"""Stable and canary labels (trainer/export/labels.py, `python -m trainer.export promote|rollback|canary`):
atomic, idempotent, refusing unsafe moves; retention keeps labelled versions; models.config rewritten
as TF Serving parses it.

Version directories hold a stand-in saved_model.pb (what contract/versions.py and TF Serving's
file-system source look at) and a model card with a gate verdict: label moves never load a model.
The gate that writes real verdicts on real models is tested in test_export_gate.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.labels import LABELS_FILE, Labels, LabelsError, parse_labels, read_labels
from contract.signatures import MODEL_CARD_PATH
from contract.versions import published_versions
from tests.trainer.test_export_retention import (
    ROOT,
    SHIPPED_CONFIG,
    lock_held_by_another_process,
    publish_n,
    write_version,
)
from trainer.export import cli, labels
from trainer.export.retention import prune_versions, publish_version

MODEL = "cifar10"


def _model_base(tmp_path: Path, count: int = 3, failed: tuple[int, ...] = ()) -> Path:
    """MODEL_BASE with versions 1..count published; those in `failed` carry a failed gate verdict."""
    base = tmp_path / "models"
    assert publish_n(base / MODEL, count) == list(range(1, count + 1))
    for version in range(1, count + 1):
        verdict = "failed" if version in failed else "passed"
        card = base / MODEL / str(version) / MODEL_CARD_PATH
        card.parent.mkdir(parents=True)
        gate = {"verdict": verdict, "reasons": ["too poor"]}
        card.write_text(json.dumps({"version": version, "gate": gate}))
    return base


def _cli(base: Path, *argv: str, config: Path | None = None) -> int:
    extra = ["--serving-config", str(config)] if config is not None else []
    return cli.main([argv[0], *argv[1:], "--model-base", str(base), *extra])


def _labels(base: Path) -> dict | None:
    path = base / MODEL / LABELS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _parsed_config(path: Path):
    """models.config parsed by TF Serving's own proto, as the model server reads it."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


# --- the file ---------------------------------------------------------------------------------------


def test_labels_file_round_trips_and_rejects_what_the_gateway_could_not_route():
    labels_ = Labels(stable=4, canary=5, canary_percent=12.5, mode="shadow")
    assert parse_labels(json.dumps(labels_.to_dict())) == labels_
    assert set(labels_.to_dict()) == {"stable", "canary", "canary_percent", "mode"}
    for bad, message in [
        ("{", "not JSON"),
        ('{"canary": 2}', "'stable' must be a version number"),
        ('{"stable": true}', "'stable' must be a version number"),
        ('{"stable": 1, "canary": 0}', "'canary' must be"),
        ('{"stable": 1, "canary_percent": 101}', "from 0 to 100"),
        ('{"stable": 1, "mode": "mirror"}', "'mode' must be one of split, shadow"),
    ]:
        with pytest.raises(LabelsError, match=message):
            parse_labels(bad)


def test_no_labels_file_means_the_newest_version_serves(tmp_path, capsys):
    base = _model_base(tmp_path)
    assert read_labels(base / MODEL) is None
    assert _cli(base, "labels") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["served"] == 3 and shown["labels_json"] is None
    # The file is not a stray entry for the version listing (no warning, not a version).
    assert published_versions(base / MODEL) == [3, 2, 1]


# --- moves ------------------------------------------------------------------------------------------


def test_canary_promote_rollback_change_the_labels_and_are_idempotent(tmp_path, capsys):
    base = _model_base(tmp_path)
    # Without labels.json version 3 serves; a canary of 2 would run against stable 3. Use 3 as canary of 2:
    assert _cli(base, "promote", "2") == 0
    assert _labels(base) == {"stable": 2, "canary": None, "canary_percent": 0.0, "mode": "split"}
    assert _cli(base, "canary", "3", "--percent", "10") == 0
    assert _labels(base) == {"stable": 2, "canary": 3, "canary_percent": 10.0, "mode": "split"}
    mtime = os.stat(base / MODEL / LABELS_FILE).st_mtime_ns
    capsys.readouterr()
    assert _cli(base, "canary", "3", "--percent", "10") == 0  # again: nothing changes, not even the file
    assert capsys.readouterr().out.startswith("nothing to do")
    assert os.stat(base / MODEL / LABELS_FILE).st_mtime_ns == mtime

    assert _cli(base, "canary", "3", "--percent", "25", "--shadow") == 0
    assert _labels(base) == {"stable": 2, "canary": 3, "canary_percent": 25.0, "mode": "shadow"}
    assert _cli(base, "promote", "--canary") == 0
    assert _labels(base) == {"stable": 3, "canary": None, "canary_percent": 0.0, "mode": "split"}
    assert _cli(base, "promote", "3") == 0  # idempotent
    assert "already stable" in capsys.readouterr().out
    assert _labels(base)["stable"] == 3

    # Rollback goes to the stable before; `--from 3` retried does not step back twice.
    assert _cli(base, "rollback", "--from", "3") == 0
    assert _labels(base)["stable"] == 2
    assert _cli(base, "rollback", "--from", "3") == 0
    assert _labels(base)["stable"] == 2
    assert "already rolled back" in capsys.readouterr().out
    assert _cli(base, "rollback") == 0  # 2 became stable after the newest (3) that served unlabelled
    assert _labels(base)["stable"] == 3
    assert _cli(base, "rollback") == cli.EXIT_REFUSED  # nothing earlier recorded
    assert "no earlier stable version" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        ([], ["promote", "2"], "failed the export gate (too poor)"),
        ([], ["canary", "2", "--percent", "5"], "failed the export gate"),
        ([], ["promote", "9"], "version 9 is not published"),
        ([["promote", "3"]], ["canary", "3"], "version 3 is stable; a canary must be another version"),
        ([], ["promote", "--canary"], "no canary to promote"),
        (
            [["promote", "1"], ["promote", "3"], ["rm", "1"]],
            ["rollback"],
            "previous stable version 1 was deleted",
        ),
    ],
)
def test_unsafe_moves_are_refused_with_a_reason_and_change_nothing(tmp_path, capsys, setup, argv, message):
    base = _model_base(tmp_path, failed=(2,))
    for step in setup:
        if step[0] == "rm":
            shutil.rmtree(base / MODEL / step[1])
        else:
            assert _cli(base, *step) == 0
    before = _labels(base)
    capsys.readouterr()
    assert _cli(base, *argv) == cli.EXIT_REFUSED
    assert message in capsys.readouterr().err
    assert _labels(base) == before


def test_a_move_waits_for_the_publish_lock(tmp_path):
    """A label move never interleaves with a publish or prune in another process."""
    base = _model_base(tmp_path)
    with lock_held_by_another_process(base / MODEL) as holder:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.export", "promote", "1", "--model-base", str(base)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
        assert _labels(base) is None  # still waiting
        holder.stdin.close()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _labels(base)["stable"] == 1


def test_labels_file_is_replaced_atomically(tmp_path, monkeypatch):
    """Written to a temporary file, fsynced and renamed over labels.json, then the directory fsynced:
    a reader sees the old labels or the new, and a crash before the rename leaves the old ones."""
    base = _model_base(tmp_path)
    labels.promote(base / MODEL, 1)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def crash(src, dst):
        events.append(("replace", str(dst)))
        if str(dst).endswith(LABELS_FILE):
            raise OSError("power cut (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        labels.set_canary(base / MODEL, 3, 10.0)
    assert read_labels(base / MODEL) == Labels(stable=1)  # the old labels, whole
    assert not [p for p in (base / MODEL).iterdir() if p.name.startswith(".tmp-")]  # no leftover
    (replace_at,) = [i for i, (op, dst) in enumerate(events) if op == "replace" and dst.endswith(LABELS_FILE)]
    assert any(op == "fsync" and ".tmp-labels.json" in what for op, what in events[:replace_at])

    monkeypatch.setattr(os, "replace", real_replace)
    events.clear()
    labels.set_canary(base / MODEL, 3, 10.0)
    assert read_labels(base / MODEL) == Labels(stable=1, canary=3, canary_percent=10.0)
    assert events[-1] == ("fsync", str(base / MODEL))  # the rename made durable


# --- retention ----------------------------------------------------------------------------------------


def test_retention_never_removes_a_labelled_version(tmp_path, caplog):
    base = _model_base(tmp_path)
    model_dir = base / MODEL
    labels.promote(model_dir, 1)
    labels.set_canary(model_dir, 2, 5.0)
    caplog.set_level("INFO")
    publish_n(model_dir, 3, keep=1)  # 4, 5, 6 with --keep 1, no serving config
    assert published_versions(model_dir) == [6, 2, 1]
    assert "kept version 1 beyond --keep 1: labelled 'stable' in labels.json" in caplog.text
    assert "kept version 2 beyond --keep 1: labelled 'canary' in labels.json" in caplog.text

    (model_dir / LABELS_FILE).write_text("{broken")
    assert prune_versions(model_dir, 1) == []  # unknown labels: nothing is removed
    assert published_versions(model_dir) == [6, 2, 1]
    assert "pruned nothing" in caplog.text


# --- TF Serving's models.config ---------------------------------------------------------------------


def test_models_config_gets_the_labels_and_loads_the_labelled_versions(tmp_path):
    base = _model_base(tmp_path)
    config = tmp_path / "models.config"
    config.write_text(SHIPPED_CONFIG.read_text())
    assert _cli(base, "promote", "1", config=config) == 0
    assert _cli(base, "canary", "3", "--percent", "10", config=config) == 0
    (entry,) = _parsed_config(config).model_config_list.config
    assert (entry.name, entry.base_path) == ("cifar10", "/models/cifar10")
    assert list(entry.model_version_policy.specific.versions) == [1, 3]
    assert dict(entry.version_labels) == {"stable": 1, "canary": 3}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    # Promoted: the previous stable stays loaded, unlabelled, so that a rollback's label move points
    # at a loaded version (TF Serving refuses to move a label to one it has not loaded).
    assert _cli(base, "promote", "--canary", config=config) == 0
    (entry,) = _parsed_config(config).model_config_list.config
    assert list(entry.model_version_policy.specific.versions) == [1, 3]
    assert dict(entry.version_labels) == {"stable": 3}
    assert _cli(base, "rollback", config=config) == 0
    (entry,) = _parsed_config(config).model_config_list.config
    assert dict(entry.version_labels) == {"stable": 1}
    assert list(entry.model_version_policy.specific.versions) == [1, 3]

    # Retention reads the rewritten config too.
    assert _cli(base, "canary", "2", "--percent", "0", config=config) == 0
    publish_version(base / MODEL, write_version, keep=1, serving_config=config)
    assert published_versions(base / MODEL) == [4, 3, 2, 1]


def test_a_config_without_the_model_is_refused_before_labels_change(tmp_path, capsys):
    base = _model_base(tmp_path)
    config = tmp_path / "models.config"
    config.write_text(SHIPPED_CONFIG.read_text().replace('name: "cifar10"', 'name: "other"')
                      .replace("/models/cifar10", "/models/other"))  # fmt: skip
    assert _cli(base, "promote", "1", config=config) == 1
    assert "has no entry for model 'cifar10'" in capsys.readouterr().err
    assert _labels(base) is None
