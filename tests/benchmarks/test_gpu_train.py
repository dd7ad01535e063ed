"""The prepared GPU benchmark, checked where no GPU is: its arguments, its arithmetic, a tiny run
under JAX without TensorFlow (as on the GPU machines) writing a well-formed results file, and the
data staging of scripts/gpu-bench.sh (split here, staged over separate calls, reassembled there)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_train
from tests.jax_subprocess import PROJECT_ROOT, run_under_jax

SCRIPT = PROJECT_ROOT / "scripts" / "gpu-bench.sh"


def test_arguments_parse_and_cifar10_needs_a_carried_copy(capsys: pytest.CaptureFixture[str]) -> None:
    args = gpu_train.parse_args(["--data-dir", "/tmp/gpu-bench/data"])
    assert (args.seeds, args.default_seeds, args.target_accuracy) == (5, 1, 0.94)
    assert args.airbench_config == Path("configs/airbench94.yaml")
    assert (PROJECT_ROOT / args.airbench_config).is_file() and (PROJECT_ROOT / args.default_config).is_file()
    assert args.budget_s < 600, "one device command may run 10 minutes"
    with pytest.raises(SystemExit):
        gpu_train.parse_args([])
    assert "needs --data-dir" in capsys.readouterr().err


def test_timing_counts_the_compiling_first_epoch_apart() -> None:
    history = [{"seconds": 12.0}, {"seconds": 2.0}, {"seconds": 2.0}, {"seconds": 2.2}]
    t = gpu_train.timing(history, num_train=50_000)
    assert t["train_seconds"] == pytest.approx(18.2) and t["first_epoch_seconds"] == 12.0
    assert t["train_seconds_excluding_compile"] == pytest.approx(8.0)  # 4 epochs at the steady 2.0 s
    assert t["images_per_second"] == pytest.approx(50_000 * 3 / 6.2, rel=1e-3)


def test_time_to_accuracy_only_when_the_mean_reaches_the_target() -> None:
    def run(acc: float, seconds: float) -> dict:
        return {"status": "done", "test_accuracy": acc - 0.01, "test_accuracy_tta": acc,
                "train_seconds": seconds, "train_seconds_excluding_compile": seconds - 1,
                "images_per_second": 1000.0}  # fmt: skip

    hit = gpu_train.summarize([run(0.945, 20.0), run(0.937, 22.0), {"status": "running"}], 0.94)
    assert hit["accuracy_key"] == "test_accuracy_tta" and hit["runs"] == 2  # scored as the anchor is
    assert hit["reached_target"] and hit["time_to_accuracy_s"] == pytest.approx(21.0)
    miss = gpu_train.summarize([run(0.945, 20.0), run(0.930, 22.0)], 0.94)
    assert not miss["reached_target"] and miss["time_to_accuracy_s"] is None


RUN = """
import sys
from benchmarks.gpu_train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_tiny_run_under_jax_writes_well_formed_results(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    tiny = ["data.num_train=256", "data.num_test=64", "train.epochs=2", "train.batch_size=64",
            "model.width=8"]
    # --budget-s 1: the first run starts, then no other fits: the skipping is checked too.
    argv = ["--dataset", "synthetic", "--seeds", "2", "--default-seeds", "1", "--budget-s", "1",
            "--work-dir", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    for kv in tiny:
        argv += ["--set", kv]
    run_under_jax(RUN, *argv, timeout=600)

    results = json.loads(out.read_text())
    assert results["versions"]["backend"] == "jax" and results["measured_on_gpu"] is False
    assert results["machine"]["devices"] and results["machine"]["gpus"] == 0
    assert results["finished"] and results["complete"] is False
    assert [(s["profile"], s["seed"]) for s in results["skipped"]] == [("airbench94", 1), ("default", 0)]
    airbench, default = results["profiles"]
    assert (airbench["name"], airbench["config"], default["name"]) == (
        "airbench94", "configs/airbench94.yaml", "default")
    (done,) = airbench["runs"]
    assert done["status"] == "done" and done["arch"] == "airbench" and done["epochs"] == 2
    assert 0 < done["num_train"] <= 256
    for key in ("test_accuracy", "test_accuracy_flip_tta", "test_accuracy_tta"):
        assert 0.0 <= done[key] <= 1.0, key
    assert 0 < done["train_seconds"] <= done["wall_seconds"] and done["images_per_second"] > 0
    summary = airbench["summary"]
    assert summary["runs"] == 1 and summary["accuracy_key"] == "test_accuracy_tta"
    assert summary["reached_target"] is (summary["mean_accuracy"] >= 0.94)
    assert default["runs"] == [] and default["summary"] == {}
    assert (tmp_path / "runs" / "airbench94-seed0" / "metrics.json").is_file()


def _script(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)  # fmt: skip


def test_the_data_travels_in_parts_over_separate_calls(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(os.urandom(2500))
    here = tmp_path / "here"
    here.mkdir()
    assert _script("split", str(archive), cwd=here, CHUNK_BYTES="1000").returncode == 0
    parts = sorted((here / ".gpu-data").glob("*.part-*"))
    assert [p.stat().st_size for p in parts] == [1000, 1000, 500]

    stage = tmp_path / "machine-tmp"

    def call(carried: list[Path]) -> Path:
        """A device call's copy of the tree: only the carried parts travel."""
        tree = tmp_path / f"call-{len(list(tmp_path.glob('call-*')))}"
        (tree / ".gpu-data").mkdir(parents=True)
        for p in [here / ".gpu-data" / "SHA256SUMS", *carried]:
            (tree / ".gpu-data" / p.name).write_bytes(p.read_bytes())
        return tree

    assert _script("stage", cwd=call(parts[:1]), STAGE_DIR=str(stage)).returncode == 0
    missing = _script("assemble", cwd=call([]), STAGE_DIR=str(stage))
    assert missing.returncode == 3 and parts[1].name in missing.stderr and parts[2].name in missing.stderr
    assert _script("stage", cwd=call(parts[1:]), STAGE_DIR=str(stage)).returncode == 0
    done = _script("assemble", cwd=call([]), STAGE_DIR=str(stage))
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / archive.name).read_bytes() == archive.read_bytes()

    (stage / "parts" / parts[0].name).write_bytes(b"x" * 1000)  # a corrupt part is refused
    assert _script("assemble", cwd=call([]), STAGE_DIR=str(stage)).returncode == 3


def test_the_script_refuses_unknown_commands_and_parses(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0
    bad = _script("launch", cwd=tmp_path)
    assert bad.returncode == 2 and "usage" in bad.stderr


def _results(accuracies: list[float], *, gpu: bool = True) -> dict:
    runs = [{"seed": i, "status": "done", "test_accuracy": a - 0.005, "test_accuracy_tta": a,
             "train_seconds": 25.0 + i, "train_seconds_excluding_compile": 20.0 + i,
             "images_per_second": 20000.0} for i, a in enumerate(accuracies)]  # fmt: skip
    return {
        "command": "python -m benchmarks.gpu_train --data-dir /tmp/gpu-bench/data",
        "machine": {"cpu_count": 16, "gpus": int(gpu), "devices": [{"platform": "gpu", "kind": "H100"}],
                    "nvidia_smi": ["NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04"]},
        "versions": {"backend": "jax", "keras": "3.15.1", "jax": "0.11.2"},
        "data": {"dataset": "cifar10", "overrides": []},
        "measured_on_gpu": gpu, "complete": False,
        "profiles": [{"name": "airbench94", "config": "configs/airbench94.yaml", "seeds": [0, 1, 2, 3, 4],
                      "runs": runs, "summary": gpu_train.summarize(runs, 0.94)},
                     {"name": "default", "config": "configs/default.yaml", "seeds": [0], "runs": [],
                      "summary": {}}],
        "skipped": [{"profile": "default", "seed": 0, "why": "about 300 s needed, 12 s of --budget-s left"}],
    }  # fmt: skip


def test_the_report_shows_not_measured_rows_until_a_gpu_run_exists(tmp_path: Path) -> None:
    from benchmarks import report

    body = "\n".join(report.gpu_section(tmp_path))
    assert body.count("not measured on a GPU |") == 2 and "configs/airbench94.yaml" in body

    (tmp_path / "gpu_train.json").write_text(json.dumps(_results([0.945, 0.941, 0.939, 0.942])))
    body = "\n".join(report.gpu_section(tmp_path))
    assert "not measured on a GPU" not in body and "NVIDIA H100" in body
    (row,) = [line for line in body.splitlines() if line.startswith("| airbench94")]
    assert "| 4 of 5 |" in row and "94.17% (6-view TTA)" in row and "26.5 s" in row  # mean 0.94175
    assert "| default (`configs/default.yaml`) | 0 of 1 | not measured |" in body
    assert "Skipped to stay within the time budget: default seed 0" in body and "did not complete" in body

    (tmp_path / "gpu_train.json").write_text(json.dumps(_results([0.93, 0.935], gpu=False)))
    body = "\n".join(report.gpu_section(tmp_path))
    assert "not reached" in body and "This run had no GPU: not measured on a GPU" in body
