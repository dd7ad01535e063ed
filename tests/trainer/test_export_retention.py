"""Retention and publishing that cannot hurt serving (trainer/export/retention.py), with real processes,
real locks and real directories.

The version directories here hold a stand-in saved_model.pb: what TF Serving's file-system source and
contract/versions.py look at. Real SavedModels through the same code are in test_export_publish.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from contract.signatures import SAVED_MODEL_FILE
from contract.versions import published_versions
from tests.deploy.test_rollback_recipe import SED as DOCUMENTED_PIN_SED
from trainer.export.retention import (
    HIGH_WATER_FILE,
    LOCK_FILE,
    prune_versions,
    publish_version,
    read_serving_config,
    reclaim_temporaries,
    write_high_water,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "serving" / "tfserving" / "models.config"
K8S_CONFIG = ROOT / "k8s" / "tfserving" / "models.config"
HOUR = 3600.0

# A publisher in its own process: waits for the start file (so all start together), then publishes
# `count` versions whose saved_model.pb records which process wrote which number.
PUBLISHER = """
import os, sys, time
from pathlib import Path
from trainer.export.retention import publish_version

model_dir, start, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
while not start.exists():
    time.sleep(0.001)

def write(tmp, version):
    tmp.mkdir()
    time.sleep(0.05)  # an export takes a while: the window in which another could take the same number
    (tmp / "saved_model.pb").write_text(f"{os.getpid()} {version}")

for _ in range(count):
    print(publish_version(model_dir, write).name, flush=True)
"""

# Holds the publish lock until its stdin closes or it is killed.
LOCK_HOLDER = """
import sys
from pathlib import Path
from trainer.export.retention import publish_lock

with publish_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def write_version(tmp: Path, version: int) -> None:
    """A version directory as TF Serving's file-system source and contract/versions.py see it."""
    tmp.mkdir()
    (tmp / SAVED_MODEL_FILE).write_text(f"version {version}")
    (tmp / "variables").mkdir()
    (tmp / "variables" / "variables.index").write_bytes(b"index")


def publish_n(model_dir: Path, count: int, **kwargs) -> list[int]:
    return [int(publish_version(model_dir, write_version, **kwargs).name) for _ in range(count)]


def age(path: Path, seconds: float) -> None:
    """Make everything under `path` look last written `seconds` ago."""
    then = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (then, then))
    os.utime(path, (then, then))


def pinned_config(tmp_path: Path, version: int) -> Path:
    """models.config after docs/deploy.md's "Pin a version" recipe (its sed, run as written), pinned to
    `version` instead of 6."""
    (tmp_path / "k8s" / "tfserving").mkdir(parents=True)
    shutil.copy(K8S_CONFIG, tmp_path / "k8s" / "tfserving" / "models.config")
    pin = tmp_path / "overlays" / "pin"
    pin.mkdir(parents=True)
    sed = DOCUMENTED_PIN_SED.replace("versions: 6/", f"versions: {version}/")
    subprocess.run(["bash", "-c", sed], cwd=pin, check=True, timeout=10)
    return pin / "models.config"


def config_with(tmp_path: Path, policy: str, extra: str = "", name: str = "cifar10") -> Path:
    path = tmp_path / "models.config"
    path.write_text(
        "model_config_list {\n  config {\n"
        f'    name: "{name}"\n    base_path: "/models/{name}"\n    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ {policy} }}\n{extra}  }}\n}}\n"
    )
    return path


@contextmanager
def lock_held_by_another_process(model_dir: Path) -> Iterator[subprocess.Popen]:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(model_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)


# --- --keep and what TF Serving serves ---------------------------------------------------------------


def test_keep_never_removes_the_version_pinned_by_the_documented_recipe(tmp_path, caplog):
    """The issue's reproduction: pin version 6 as docs/deploy.md says, then five nightly publishes with
    --keep 5. By number alone the fifth removes version 6, and every gateway goes unready."""
    model_dir = tmp_path / "models" / "cifar10"
    publish_n(model_dir, 6)
    config = pinned_config(tmp_path, 6)
    caplog.set_level(logging.INFO, logger="trainer.export.retention")
    publish_n(model_dir, 5, keep=5, serving_config=config)
    assert published_versions(model_dir) == [11, 10, 9, 8, 7, 6]
    assert f"kept version 6 beyond --keep 5: pinned: specific {{ versions: 6 }} in {config}" in caplog.text
    assert "removed version 5" in caplog.text


def test_keep_never_removes_a_labelled_version(tmp_path, caplog):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 4)
    config = config_with(
        tmp_path, "latest { num_versions: 1 }", '    version_labels { key: "stable" value: 2 }\n'
    )
    caplog.set_level(logging.INFO, logger="trainer.export.retention")
    assert prune_versions(model_dir, 1, serving_config=config) == [1, 3]
    assert published_versions(model_dir) == [4, 2]
    assert "kept version 2 beyond --keep 1: labelled 'stable' (version_labels)" in caplog.text


def test_keep_never_removes_a_version_the_latest_policy_serves(tmp_path):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 5)
    config = config_with(tmp_path, "latest { num_versions: 3 }")
    assert prune_versions(model_dir, 1, serving_config=config) == [1, 2]
    assert published_versions(model_dir) == [5, 4, 3]


def test_keep_removes_nothing_when_every_version_is_served(tmp_path):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 3)
    assert prune_versions(model_dir, 1, serving_config=config_with(tmp_path, "all {}")) == []
    assert published_versions(model_dir) == [3, 2, 1]


def test_a_config_entry_matches_by_name_or_by_base_path(tmp_path):
    config = config_with(tmp_path, "specific { versions: 2 versions: 3 }", name="cifar10")
    (policy,) = read_serving_config(config, "cifar10")
    assert (policy.kind, policy.specific) == ("specific", (2, 3))
    # Served under another name from the same directory: still this model's versions.
    config.write_text(config.read_text().replace('name: "cifar10"', 'name: "images"'))
    (policy,) = read_serving_config(config, "cifar10")
    assert (policy.name, policy.specific) == ("images", (2, 3))


def test_a_config_for_another_model_protects_nothing_and_says_so(tmp_path, caplog):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 3)
    config = config_with(tmp_path, "specific { versions: 1 }", name="mnist")
    assert prune_versions(model_dir, 1, serving_config=config) == [1, 2]
    assert "serves no model named 'cifar10'" in caplog.text


def test_the_shipped_config_serves_the_newest_version(tmp_path):
    """serving/tfserving/models.config, as TF Serving reads it: latest, one version, no labels."""
    (policy,) = read_serving_config(SHIPPED_CONFIG, "cifar10")
    assert (policy.kind, policy.latest, policy.specific, policy.labels) == ("latest", 1, (), {})


def test_a_broken_or_missing_config_removes_nothing(tmp_path, caplog):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 3)
    broken = tmp_path / "models.config"
    broken.write_text("model_config_list { config { name: cifar10 ")
    with pytest.raises(ValueError, match=f"--serving-config {broken} is not a TF Serving ModelServerConfig"):
        prune_versions(model_dir, 1, serving_config=broken)
    with pytest.raises(FileNotFoundError, match="does not exist; pass the models.config TF Serving reads"):
        prune_versions(model_dir, 1, serving_config=tmp_path / "missing.config")
    # Publishing still works (the new version is out), but nothing is pruned until the config is fixed.
    assert publish_version(model_dir, write_version, keep=1, serving_config=broken).name == "4"
    assert published_versions(model_dir) == [4, 3, 2, 1]
    assert "published" in caplog.text and "pruned nothing" in caplog.text


def test_pinned_version_that_is_not_published_is_reported(tmp_path, caplog):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 2)
    prune_versions(model_dir, 1, serving_config=config_with(tmp_path, "specific { versions: 9 }"))
    assert "version 9 is pinned" in caplog.text and "TF Serving cannot serve it" in caplog.text
    assert published_versions(model_dir) == [2]


def test_odd_directory_names_are_neither_versions_nor_pruned(tmp_path, caplog):
    model_dir = tmp_path / "cifar10"
    model_dir.mkdir()
    for name in ("²", "007", "tmp-xyz"):
        (model_dir / name).mkdir()
        (model_dir / name / SAVED_MODEL_FILE).write_bytes(b"x")
    assert publish_n(model_dir, 3, keep=1) == [1, 2, 3]
    assert published_versions(model_dir) == [3]
    assert {"²", "007", "tmp-xyz"} <= {p.name for p in model_dir.iterdir()}  # not ours to delete
    warnings = [r.getMessage() for r in caplog.records if r.name == "contract.versions"]
    assert sum("'²'" in w for w in warnings) == 1 and sum("'tmp-xyz'" in w for w in warnings) == 1


# --- one publisher at a time ------------------------------------------------------------------------


def test_concurrent_publishes_in_separate_processes_take_distinct_numbers_and_lose_none(tmp_path):
    model_dir, start = tmp_path / "models" / "cifar10", tmp_path / "start"
    processes, per_process = 3, 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(model_dir), str(start), str(per_process)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    time.sleep(1.0)  # let every interpreter reach the start line
    start.touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * processes, [err[-2000:] for _, err in outputs]
    printed = sorted(int(line) for out, _ in outputs for line in out.split())
    total = processes * per_process
    assert printed == list(range(1, total + 1))  # every publish got its own number
    assert published_versions(model_dir) == list(range(total, 0, -1))  # and none was lost
    writers = {}
    for version in range(1, total + 1):
        pid, recorded = (model_dir / str(version) / SAVED_MODEL_FILE).read_text().split()
        assert int(recorded) == version  # the directory holds what its writer wrote for that number
        writers.setdefault(pid, []).append(version)
    assert sorted(len(v) for v in writers.values()) == [per_process] * processes
    assert (model_dir / HIGH_WATER_FILE).read_text() == f"{total}\n"
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_a_publish_waits_for_the_lock_and_the_lock_dies_with_its_holder(tmp_path, caplog):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 1)
    caplog.set_level(logging.INFO, logger="trainer.export.retention")
    result: list[Path] = []
    with lock_held_by_another_process(model_dir) as holder:
        waiting = threading.Thread(target=lambda: result.append(publish_version(model_dir, write_version)))
        waiting.start()
        deadline = time.monotonic() + 30
        while "waiting for" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f"held by host {os.uname().nodename} pid {holder.pid}" in caplog.text
        time.sleep(0.2)
        assert waiting.is_alive() and not (model_dir / "2").exists()
        holder.send_signal(signal.SIGKILL)  # a killed exporter's lock goes with its open file
        waiting.join(timeout=30)
    assert result == [model_dir / "2"]
    assert (model_dir / LOCK_FILE).is_file()  # the lock file stays: removing it would split the lock


# --- leftovers --------------------------------------------------------------------------------------


def test_leftovers_are_reclaimed_by_lock_and_age_never_by_pid(tmp_path):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 1)
    # Left by exporters that ran as PID 1, like every pod's: PID 1 is always alive, so a PID check
    # kept these forever.
    dead_export = model_dir / ".tmp-2-1"
    write_version(dead_export, 2)
    dead_prune = model_dir / ".trash-1-1"
    write_version(dead_prune, 1)
    dead_state = model_dir / ".tmp-last-version-1"
    dead_state.write_text("2\n")
    for path in (dead_export, dead_prune, dead_state):
        age(path, 2 * HOUR)
    live = model_dir / ".tmp-3-1"  # written a moment ago: maybe an export the lock cannot see
    write_version(live, 3)

    with lock_held_by_another_process(model_dir):
        assert reclaim_temporaries(model_dir) == []  # an export holds the lock: its leftovers may be live
    assert dead_export.exists() and dead_prune.exists()

    assert sorted(reclaim_temporaries(model_dir)) == sorted([dead_export, dead_prune, dead_state])
    assert live.exists()
    age(live, 2 * HOUR)
    assert reclaim_temporaries(model_dir) == [live]
    assert published_versions(model_dir) == [1]


def test_publish_reclaims_old_leftovers_and_numbers_past_them(tmp_path):
    model_dir = tmp_path / "cifar10"
    publish_n(model_dir, 1)
    leftover = model_dir / ".tmp-2-1"
    write_version(leftover, 2)
    age(leftover, 2 * HOUR)
    assert publish_n(model_dir, 1) == [2]
    assert not leftover.exists()


# --- durability -------------------------------------------------------------------------------------


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, str]]:
    """(operation, path) for every fsync, rename and replace, in order; the real calls still run."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst)

    def replace(src, dst) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_state_file_is_fsynced_before_and_its_directory_after_the_replace(tmp_path, disk_events):
    model_dir = tmp_path / "cifar10"
    model_dir.mkdir()
    write_high_water(model_dir, 7)
    assert (model_dir / HIGH_WATER_FILE).read_text() == "7\n"
    (replace_at,) = [i for i, (op, _) in enumerate(disk_events) if op == "replace"]
    tmp = disk_events[replace_at][1].split(" -> ")[0]
    assert disk_events[replace_at][1].endswith(f" -> {model_dir / HIGH_WATER_FILE}")
    assert ("fsync", tmp) in disk_events[:replace_at], "the new content must be on disk before the rename"
    assert ("fsync", str(model_dir)) in disk_events[replace_at:], "the rename must be made durable"


def test_version_is_fsynced_then_renamed_into_place_then_its_directory_fsynced(tmp_path, disk_events):
    model_dir = tmp_path / "cifar10"
    final = publish_version(model_dir, write_version)
    renames = [i for i, (op, what) in enumerate(disk_events) if op == "rename" and what.endswith(str(final))]
    (rename_at,) = renames
    tmp = Path(disk_events[rename_at][1].split(" -> ")[0])
    assert tmp.name.startswith(".tmp-1-")
    before = {path for op, path in disk_events[:rename_at] if op == "fsync"}
    inside = {str(tmp / p.relative_to(final)) for p in final.rglob("*")} | {str(tmp)}
    assert inside <= before, f"not fsynced before the rename: {sorted(inside - before)}"
    assert ("fsync", str(model_dir)) in disk_events[rename_at:]



# --- the shipped deployments wire it up -------------------------------------------------------------


def test_nightly_exports_read_the_config_tfserving_serves_from():
    """compose and Kubernetes give the trainer EXPORT_SERVING_CONFIG inside a mount of the very config
    TF Serving reads (in Kubernetes the same generated config map, so a pin overlay reaches both)."""
    from tests.deploy import manifests

    docs = manifests.render()
    cron = manifests.find(docs, "CronJob", "cifar10-train")
    (trainer,) = manifests.containers(cron)
    setting = manifests.env_of(trainer, {})["EXPORT_SERVING_CONFIG"]
    volumes = {v["name"]: v for v in manifests.pod_spec(cron)["volumes"]}
    mount = next(m for m in trainer["volumeMounts"] if setting.startswith(m["mountPath"].rstrip("/") + "/"))
    tfserving = manifests.find(docs, "Deployment", "tfserving")
    served = {v["name"]: v for v in manifests.pod_spec(tfserving)["volumes"]}
    assert volumes[mount["name"]]["configMap"] == served["config"]["configMap"]
    assert mount.get("readOnly") is True

    services = manifests.compose()["services"]
    trainer_env, trainer_volumes = services["trainer"]["environment"], services["trainer"]["volumes"]
    config_dir = str(Path(trainer_env["EXPORT_SERVING_CONFIG"]).parent)
    (source,) = [v.split(":")[0] for v in trainer_volumes if v.split(":")[1] == config_dir]
    assert any(v.split(":")[0] == source for v in services["tfserving"]["volumes"])
