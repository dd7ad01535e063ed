"""`python -m trainer`: flags, config precedence, exit codes and messages, a real subprocess run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import build_parser, main, resolve_config


def test_parser_accepts_the_documented_flags() -> None:
    parser = build_parser()
    args = parser.parse_args([
        "train", "--dataset", "cifar10", "--data-dir", "/data", "--epochs", "3", "--arch", "resnet9",
        "--config", "configs/quick.yaml", "--set", "optim.lr=0.2", "--set", "train.seed=1",
        "--resume", "--run-dir", "runs/quick",
    ])  # fmt: skip
    assert args.command == "train" and args.resume and args.overrides == ["optim.lr=0.2", "train.seed=1"]
    assert parser.parse_args(["evaluate", "--run-dir", "r"]).run_dir == Path("r")
    sweep = parser.parse_args(["sweep", "--param", "model.dropout", "--values", "0.0,0.5", "--run-dir", "s"])
    assert sweep.param == "model.dropout"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dataset", "mnist", "--run-dir", "r"])


def test_export_subcommand_is_hooked_up() -> None:
    pytest.importorskip("trainer.export.cli")
    args = build_parser().parse_args(["export", "--run-dir", "r", "--model-base", "models"])
    assert callable(args.handler)


def test_config_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 9\n  batch_size: 32\nmodel:\n  width: 8\n")
    args = build_parser().parse_args([
        "train", "--config", str(path), "--epochs", "4", "--set", "train.epochs=5", "--arch", "plain_cnn",
        "--run-dir", str(tmp_path / "r"),
    ])  # fmt: skip
    config = resolve_config(args)
    assert config.train.epochs == 5  # --set beats --epochs beats the file
    assert config.train.batch_size == 32 and config.model.width == 8  # from the file
    assert config.model.arch == "plain_cnn"


def test_unknown_key_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--run-dir", str(tmp_path / "r"), "--set", "model.dropot=0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.dropot" in err and "dropout" in err and "Traceback" not in err
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for a rejected command


@pytest.mark.slow
def test_resume_reuses_the_runs_config_and_refuses_changes(
    trained_run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run_dir, run)
    # No --config: the run's own config.json is used; it already finished, so nothing retrains.
    assert main(["train", "--resume", "--run-dir", str(run)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["train", "--resume", "--run-dir", str(run), "--set", "optim.lr=0.5"]) == 1
    err = capsys.readouterr().err
    assert "optim.lr (run: 0.1, now: 0.5)" in err and "new --run-dir" in err


@pytest.mark.slow
def test_evaluate_rewrites_metrics(trained_run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run_dir, run)
    original = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "reports")
    assert main(["evaluate", "--run-dir", str(run)]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["test_accuracy"] == pytest.approx(original["test_accuracy"])
    assert again["confusion_matrix"] == original["confusion_matrix"]
    assert (run / "reports" / "confusion_matrix.png").is_file()


def test_evaluate_without_a_model_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run-dir", str(tmp_path)]) == 1
    assert "train first" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_trainer_trains_a_run(project_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "cli-run"
    cmd = [
        sys.executable, "-m", "trainer", "train", "--dataset", "synthetic", "--epochs", "1",
        "--set", "data.num_train=200", "--set", "data.num_test=50", "--set", "model.width=4",
        "--set", "train.batch_size=50", "--set", "train.tensorboard=false", "--run-dir", str(run),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(project_root)}
    proc = subprocess.run(cmd, cwd=project_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained on SYNTHETIC data" in proc.stdout
    assert "epoch 1/1" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["synthetic"] is True and metrics["num_test"] == 50
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 1
