"""Publishing: versions only grow, never appear half-written, pass the quality gate, and get pruned."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from contract.signatures import WARMUP_PATH
from contract.versions import published_versions
from tests.tfserving_session import TFServingSession
from tests.trainer.test_export_gate import make_worse_run
from tests.trainer.test_export_retention import age
from trainer.export import cli
from trainer.export.model_card import read_model_card
from trainer.export.publish import publish
from trainer.export.retention import HIGH_WATER_FILE, LOCK_FILE
from trainer.export.warmup import read_warmup_file

pytestmark = pytest.mark.slow


def _base_with_version_1(exported_model, tmp_path: Path) -> Path:
    """A private copy of the session's model base, holding the complete version 1."""
    base = tmp_path / "models"
    shutil.copytree(exported_model.base_path, base)
    return base


def _add_version_2_as_a_copy(base: Path) -> None:
    """Version 2 as a copy of version 1: an earlier publish, for tests of numbering and retention, which
    go by the version directories (a publish costs ~10 s here)."""
    shutil.copytree(base / "cifar10" / "1", base / "cifar10" / "2")


def _entries(model_dir: Path) -> list[str]:
    """Everything in the model directory but the high-water mark and the publish lock, which belong there."""
    return sorted(p.name for p in model_dir.iterdir() if p.name not in (HIGH_WATER_FILE, LOCK_FILE))


def _export_command(run_dir: Path, base: Path, *extra: str) -> list[str]:
    flags = ["--run-dir", str(run_dir), "--model-base", str(base), *extra]
    return [sys.executable, "-m", "trainer.export", *flags]


def _temporary_has_files(model_dir: Path) -> bool:
    for name in _entries(model_dir):
        if name.startswith(".tmp-"):
            try:
                return any((model_dir / name).iterdir())
            except FileNotFoundError:  # renamed into place between listing and looking
                return False
    return False


def test_published_version_is_complete_with_assets(exported_model):
    assert exported_model.version == 1
    assert (exported_model.path / "saved_model.pb").is_file()
    assert (exported_model.path / "variables" / "variables.index").is_file()
    assert (exported_model.path / WARMUP_PATH).is_file()
    # Only the version directory: no temporary left beside it.
    assert _entries(exported_model.base_path / exported_model.name) == ["1"]


def test_model_card_describes_the_model(exported_model):
    card = read_model_card(exported_model.path)
    dataset = json.loads((exported_model.run_dir / "dataset.json").read_text())
    metrics = json.loads((exported_model.run_dir / "metrics.json").read_text())
    assert card["model_name"] == "cifar10" and card["version"] == 1
    assert card["class_names"] == list(exported_model.class_names)
    assert card["dataset"]["name"] == dataset["name"]
    assert card["dataset"]["synthetic"] is bool(dataset["synthetic"])
    assert card["normalization"]["mean"] == dataset["mean"] and card["normalization"]["std"] == dataset["std"]
    assert card["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert card["metrics"]["per_class"] == metrics["per_class"]
    assert card["training_config"] == json.loads((exported_model.run_dir / "config.json").read_text())
    environment = card["training_environment"]  # the session fixture trains under TensorFlow on CPU
    assert environment["keras_backend"] == "tensorflow" and environment["device"] == "CPU"
    assert environment["keras_version"] and environment["backend_version"]
    assert card["architecture"] == card["training_config"]["model"]["arch"]
    assert card["code_revision"] is None or len(card["code_revision"]) >= 40
    assert card["created_at"].endswith("+00:00")
    sigs = card["input_contract"]["signatures"]
    assert sigs["serving_default"]["inputs"]["images"]["shape"] == [-1, 32, 32, 3]
    assert sigs["serving_bytes"]["inputs"]["image_bytes"]["dtype"] == "string"


def test_model_card_architecture_is_the_runs_configured_arch(tmp_path):
    """config.json as training writes it (Config.to_dict()) names the architecture; a run without
    one falls back to the Keras model's name."""
    from types import SimpleNamespace

    from trainer.config import Config
    from trainer.export.publish import _architecture

    config = Config()
    config.model.arch = "resnet9"
    config.save(tmp_path / "config.json")
    model = SimpleNamespace(name="functional")
    assert _architecture(tmp_path, model) == "resnet9"
    (tmp_path / "config.json").unlink()
    assert _architecture(tmp_path, model) == "functional"


def test_warmup_records_parse_and_run_through_the_serving_loader(exported_model, exported_session):
    import tensorflow as tf

    records = read_warmup_file(exported_model.path / WARMUP_PATH)
    signatures = {r.predict_log.request.model_spec.signature_name for r in records}
    # The trained CNN has a conv block, so its Grad-CAM signatures are warmed too.
    assert signatures == {"serving_default", "serving_bytes", "explain", "explain_bytes"}
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == exported_model.name
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        out = exported_session.run(request.model_spec.signature_name, inputs)
        batch = len(next(iter(inputs.values())))
        assert out["probabilities"].shape == (batch, len(exported_model.class_names))
        if "heatmap" in out:
            assert out["heatmap"].shape == (batch, 32, 32)
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)


def test_next_export_gets_the_next_version_and_cli_prints_its_path(exported_model, tmp_path, capsys):
    base = _base_with_version_1(exported_model, tmp_path)
    before = (base / "cifar10" / "1" / "saved_model.pb").read_bytes()
    code = cli.main(["--run-dir", str(exported_model.run_dir), "--model-base", str(base)])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(base / "cifar10" / "2")
    assert published_versions(base / "cifar10") == [2, 1]  # newest first
    assert (base / "cifar10" / "1" / "saved_model.pb").read_bytes() == before  # untouched
    assert read_model_card(base / "cifar10" / "2")["version"] == 2


def test_export_killed_midway_leaves_only_complete_versions(exported_model, tmp_path):
    base = _base_with_version_1(exported_model, tmp_path)
    model_dir = base / "cifar10"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer.export",
            "--run-dir",
            str(exported_model.run_dir),
            "--model-base",
            str(base),
        ],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        # Kill once the export has started filling its temporary directory (SavedModel files going in).
        while not _temporary_has_files(model_dir):
            assert proc.poll() is None, f"export ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "export never started writing"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # What TF Serving would see: only all-digit names count as versions, and only version 1 is there.
    assert [n for n in _entries(model_dir) if n.isdigit()] == ["1"]
    with TFServingSession.load(model_dir / "1") as session:  # and it is intact
        assert "serving_default" in session.signature_defs

    # The dead export's leftover is reclaimed once nothing has written to it for an hour (its
    # exporter was PID 1, like every pod's, so its PID says nothing), and version 2 publishes normally.
    (leftover,) = [model_dir / n for n in _entries(model_dir) if n.startswith(".tmp-")]
    age(leftover, 2 * 3600)
    path = publish(exported_model.run_dir, base, "cifar10")
    assert path == model_dir / "2"
    assert _entries(model_dir) == ["1", "2"]


def test_export_failing_midway_publishes_nothing_and_cleans_up(exported_model, tmp_path, monkeypatch):
    import trainer.export.publish as publish_module

    base = _base_with_version_1(exported_model, tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(publish_module, "write_model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        publish(exported_model.run_dir, base, "cifar10")
    assert _entries(base / "cifar10") == ["1"]


def test_quality_gate_rejects_a_regressing_model_and_keeps_the_served_one(exported_model, tmp_path, capsys):
    """Both versions are measured on the run's test split (trainer/export/gate.py; more cases in
    test_export_gate.py): the worse model is refused although its metrics.json claims the served figure."""
    base = _base_with_version_1(exported_model, tmp_path)
    worse, _ = make_worse_run(exported_model.run_dir, tmp_path / "worse")

    code = cli.main(["--run-dir", str(worse), "--model-base", str(base), "--max-regression", "0.02"])
    assert code == cli.EXIT_REJECTED
    assert "max-regression" in capsys.readouterr().err
    assert _entries(base / "cifar10") == ["1"]

    # A large enough allowance passes, and the card says by how much it regressed.
    path = publish(worse, base, "cifar10", max_regression=0.5)
    assert path == base / "cifar10" / "2"
    assert read_model_card(path)["gate"]["regression"] > 0.02


def test_quality_gate_enforces_min_accuracy(exported_model, tmp_path, capsys):
    base = tmp_path / "models"
    poor, _ = make_worse_run(exported_model.run_dir, tmp_path / "poor")  # two classes of ten swapped
    code = cli.main(["--run-dir", str(poor), "--model-base", str(base), "--min-accuracy", "0.99"])
    assert code == cli.EXIT_REJECTED
    assert "below --min-accuracy 0.9900" in capsys.readouterr().err
    assert published_versions(base / "cifar10") == []


def test_keep_removes_the_oldest_versions_never_the_newest(exported_model, tmp_path):
    base = _base_with_version_1(exported_model, tmp_path)
    _add_version_2_as_a_copy(base)
    newest = publish(exported_model.run_dir, base, "cifar10", keep=2)
    assert newest.name == "3"
    assert _entries(base / "cifar10") == ["2", "3"]
    with pytest.raises(ValueError, match="at least 1"):
        publish(exported_model.run_dir, base, "cifar10", keep=0)
    assert _entries(base / "cifar10") == ["2", "3"]


def test_bad_run_dir_fails_with_a_clear_message(tmp_path, capsys):
    code = cli.main(["--run-dir", str(tmp_path / "nope"), "--model-base", str(tmp_path / "models")])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty-run").mkdir()
    code = cli.main(["--run-dir", str(tmp_path / "empty-run"), "--model-base", str(tmp_path / "models")])
    assert code == 1
    assert "model.keras is missing; train first" in capsys.readouterr().err
    assert not (tmp_path / "models" / "cifar10").exists() or _entries(tmp_path / "models" / "cifar10") == []


def test_publishing_never_replaces_an_existing_version_directory(tmp_path):
    """os.rename would silently replace an empty directory; the publisher refuses (a racing export)."""
    from trainer.export.retention import rename_no_overwrite as _rename_no_overwrite

    tmp, final = tmp_path / ".tmp-2-1", tmp_path / "2"
    tmp.mkdir()
    (tmp / "saved_model.pb").write_bytes(b"new")
    final.mkdir()
    with pytest.raises(FileExistsError, match="not overwriting"):
        _rename_no_overwrite(tmp, final)
    assert list(final.iterdir()) == [] and (tmp / "saved_model.pb").read_bytes() == b"new"


def test_trainer_cli_export_subcommand_publishes_and_prunes(exported_model, tmp_path, capsys):
    from trainer.cli import main

    base = _base_with_version_1(exported_model, tmp_path)
    argv = ["export", "--run-dir", str(exported_model.run_dir), "--model-base", str(base), "--keep", "1"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(base / "cifar10" / "2")
    assert _entries(base / "cifar10") == ["2"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--min-accuracy", "85", "outside 0..1"),
        ("--max-regression", "x", "not a number"),
        ("--keep", "0", "at least 1"),
        ("--min-class-recall", "2", "outside 0..1"),
        ("--canary-percent", "150", "outside 0..100"),
    ],
)
def test_cli_rejects_bad_gate_and_keep_values(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--run-dir", str(tmp_path), "--model-base", str(tmp_path / "models"), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_version_numbers_only_grow_even_after_the_newest_is_removed(exported_model, tmp_path):
    # A rollback that deletes the newest version's folder must not let the next export reuse its
    # number: servers that loaded the old version 2 would otherwise take different weights for "2".
    base = _base_with_version_1(exported_model, tmp_path)
    second = publish(exported_model.run_dir, base, "cifar10")
    assert second.name == "2"
    shutil.rmtree(second)
    third = publish(exported_model.run_dir, base, "cifar10")
    assert third.name == "3"
    assert published_versions(base / "cifar10") == [3, 1]  # newest first
    assert (base / "cifar10" / HIGH_WATER_FILE).read_text().strip() == "3"


def test_two_exports_at_once_both_publish_with_distinct_numbers(exported_model, tmp_path):
    """Two real `python -m trainer.export` processes on one model base: the publish lock queues them.
    Without it both take version 2 and one fails with "appeared while exporting"."""
    base = _base_with_version_1(exported_model, tmp_path)
    procs = [
        subprocess.Popen(
            _export_command(exported_model.run_dir, base),
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == [str(base / "cifar10" / v) for v in ("2", "3")]
    assert published_versions(base / "cifar10") == [3, 2, 1]
    assert [read_model_card(base / "cifar10" / v)["version"] for v in ("2", "3")] == [2, 3]
    assert _entries(base / "cifar10") == ["1", "2", "3"]


def test_keep_spares_the_version_pinned_in_the_serving_config(exported_model, tmp_path, capfd):
    """docs/deploy.md's pin (specific { versions: 1 }), then a nightly export with --keep 1: version 1,
    the one TF Serving serves, stays, the unpinned older version 2 goes; the log says why."""
    base = _base_with_version_1(exported_model, tmp_path)
    _add_version_2_as_a_copy(base)
    config = tmp_path / "models.config"
    shipped = (Path(__file__).resolve().parents[2] / "k8s" / "tfserving" / "models.config").read_text()
    config.write_text(shipped.replace("latest {", "specific {").replace("num_versions: 1", "versions: 1"))
    proc = subprocess.run(
        _export_command(exported_model.run_dir, base, "--keep", "1", "--serving-config", str(config)),
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(base / "cifar10" / "3")
    assert published_versions(base / "cifar10") == [3, 1]
    assert f"kept version 1 beyond --keep 1: pinned: specific {{ versions: 1 }} in {config}" in proc.stderr
    assert "removed version 2" in proc.stderr


def test_a_gated_publish_loads_the_runs_data_once(exported_model, tmp_path, monkeypatch):
    """The gate and the calibration/OOD fit both read the run's splits; an image folder of thousands of
    photos was decoded twice per publish. Loaded once, read-only while shared; loaded afresh after."""
    import trainer.run_files as run_files

    loads = []
    real = run_files.load_dataset

    def counted(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_files, "load_dataset", counted)
    publish(exported_model.run_dir, tmp_path / "models", "cifar10", min_accuracy=0.0)
    assert len(loads) == 1
    config = run_files.read_config(exported_model.run_dir)
    with run_files.reusing_datasets():
        shared = run_files.load_run_dataset(config)
        assert run_files.load_run_dataset(config) is shared and len(loads) == 2
        with pytest.raises(ValueError, match="read-only"):
            shared.x_test[0] = 0
    assert run_files.load_run_dataset(config) is not shared and len(loads) == 3


def test_a_missing_serving_config_fails_before_exporting(exported_model, tmp_path, capsys):
    base = _base_with_version_1(exported_model, tmp_path)
    missing = tmp_path / "nope.config"
    argv = ["--run-dir", str(exported_model.run_dir), "--model-base", str(base)]
    assert cli.main([*argv, "--keep", "1", "--serving-config", str(missing)]) == 1
    assert f"--serving-config {missing} does not exist" in capsys.readouterr().err
    assert _entries(base / "cifar10") == ["1"]


def test_a_model_trained_under_a_mixed_policy_is_exported_in_float32(exported_model, tmp_path):
    """A GPU run saves model.keras with bfloat16 compute per layer; the published graph computes in
    float32 (the contract), so it answers what the same weights give in float32, not in bfloat16."""
    import json as json_mod
    import shutil

    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.export.publish import float32_model

    run = tmp_path / "run"
    shutil.copytree(exported_model.run_dir, run)
    trained = keras.saving.load_model(run / "model.keras", compile=False)
    config = json_mod.loads(
        json_mod.dumps(trained.get_config()).replace('"name": "float32"', '"name": "mixed_bfloat16"')
    )
    mixed = trained.__class__.from_config(config)
    mixed.set_weights(trained.get_weights())
    assert {layer.dtype_policy.name for layer in mixed.layers} >= {"mixed_bfloat16"}
    mixed.save(run / "model.keras")

    pixels = np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    in_float32 = np.asarray(trained(pixels, training=False))
    in_bfloat16 = np.asarray(mixed(pixels, training=False), dtype=np.float32)
    assert np.abs(in_bfloat16 - in_float32).max() > 1e-3  # bfloat16 really answers differently
    rebuilt = float32_model(keras.saving.load_model(run / "model.keras", compile=False))
    assert {layer.dtype_policy.name for layer in rebuilt.layers} == {"float32"}
    np.testing.assert_allclose(np.asarray(rebuilt(pixels, training=False)), in_float32, atol=1e-6)

    path = publish(run, tmp_path / "models", "cifar10")
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    served = signature(images=tf.constant(pixels))["probabilities"].numpy()
    # Served probabilities are the float32 answer calibrated by the fitted temperature T.
    card = json_mod.loads((path / "assets.extra" / "model_card.json").read_text())
    temperature = (card.get("calibration") or {}).get("temperature") or 1.0
    logits = np.log(np.clip(in_float32.astype(np.float64), 1e-30, 1.0)) / temperature
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(served, expected, atol=1e-5)
