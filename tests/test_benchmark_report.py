"""docs/benchmarks.md rendering (benchmarks/report.py) from small fake result files: no training.

Checks that every section appears, names its run, shows the side-by-side ratios and the met/MISSED
verdicts, and says "not measured" where a results file is absent.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report

NOW = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
TITLES = (
    "## Training throughput",
    "## XLA on vs off",
    "## Small real data",
    "## Serving latency",
    "## GPU training",
)


def _machine(**extra: Any) -> dict[str, Any]:
    return {"platform": "Linux-test", "processor": "Test CPU", "cpu_count": 2, "gpus": 0,
            "load_average_1m": 1.25, "load_average_1m_end": 2.5, **extra}  # fmt: skip


def _xla(on_ips: float = 150.0, off_ips: float = 100.0, kept: bool = True) -> dict[str, Any]:
    def side(requested: bool, ips: float) -> dict[str, Any]:
        return {"jit_compile_requested": requested, "jit_compile": requested and kept,
                "images_per_s": ips, "ms_per_step": 256_000 / ips, "first_step_s": 9.0}  # fmt: skip

    return {
        "profile": "configs/default.yaml", "profile_jit_compile": "auto", "arch": "bn_cnn", "width": 64,
        "augment": {"translate": 4, "flip": True, "cutout": 8, "rotation": 0.0, "brightness": 0.0},
        "batch_size": 256, "seed": 0, "steps": 12, "warmup": 3, "data": "synthetic shapes (1024 images)",
        "load_average_1m_start": 1.5, "load_average_1m_end": 1.75, "xla_error": None, "params": 1_150_666,
        "on": side(True, on_ips), "off": side(False, off_ips), "xla_kept": kept,
        "speedup": round(on_ips / off_ips, 3),
    }  # fmt: skip


def train_json(xla: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "command": "python -m benchmarks.train_throughput --steps 12",
        "machine": _machine(),
        "versions": {"keras": "3.0", "backend": "tensorflow", "numpy": "2.0"},
        "results": [{"arch": "bn_cnn", "width": 32, "params": 289642, "batch_size": 128, "steps": 12,
                     "bare_images_per_s": 200.0, "full_images_per_s": 180.0, "bare_ms_per_step": 640.0,
                     "full_ms_per_step": 711.1, "overhead": 0.111}],
        "max_overhead": 0.111,
        "target_max_overhead": 0.2,
        "xla": xla,
    }  # fmt: skip


def _contender(accs: list[float], cpu: float, epochs: list[int] | None = None) -> dict[str, Any]:
    runs = [{"seed": i, "test_accuracy": a, "cpu_s": cpu, "wall_s": cpu}
            for i, a in enumerate(accs)]  # fmt: skip
    for run, e in zip(runs, epochs or [], strict=False):
        run["epochs"] = e
    mean = sum(accs) / len(accs)
    return {"runs": runs, "mean_accuracy": mean, "std_accuracy": 0.01, "min_accuracy": min(accs),
            "mean_cpu_s": cpu}  # fmt: skip


def small_data_json() -> dict[str, Any]:
    ours = _contender([0.98, 0.97], 120.0)
    ours["runs"][0]["recipe"] = ["recipe: batch 32 (auto)"]
    return {
        "command": "python -m benchmarks.small_data --seeds 2",
        "data": {"name": "scikit-learn digits", "train": 1437, "test": 360, "split_seed": 0},
        "epochs": 10,
        "machine": {"cpus": 2, "processor": "x86_64", "load_average_1m": 3.0},
        "ours": ours,  # mean 97.50%
        "seed_cnn": _contender([0.95, 0.94], 20.0, [10, 10]),  # 94.50%: ours better
        "seed_cnn_same_cpu": _contender([0.99, 0.98], 118.0, [55, 61]),  # 98.50%: ours worse
    }  # fmt: skip


def serving_json() -> dict[str, Any]:
    def row(app: str, scenario: str, clients: int, rps: float) -> dict[str, Any]:
        images = 64 if scenario == "64 images" else 1
        return {"app": app, "scenario": scenario, "clients": clients, "images_per_request": images,
                "requests": 100, "errors": 0, "rps": rps, "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 9.0,
                "images_per_s": rps * images}  # fmt: skip

    return {
        "machine": {"cpus": 2, "platform": "Linux-test", "python": "3.11.7"},
        "settings": {"duration_s": 8.0, "workers": 2, "arch": "bn_cnn", "width": 16, "run_dir": None},
        "scenarios": [row("naive", "1 image", 1, 10.0), row("naive", "1 image", 16, 20.0),
                      row("gateway", "1 image", 1, 200.0), row("gateway", "1 image", 16, 400.0),
                      row("gateway", "64 images", 1, 20.0), row("gateway", "64 images", 4, 30.0)],
        "bare_model": {"batch64_images_per_s": 2000.0, "batch64_ms": 32.0, "single_image_ms": 1.4},
        "targets": {"16 clients: gateway rps >= 10x naive": True, "1 client: gateway p50 < 5 ms": False},
    }  # fmt: skip


def write(folder: Path, name: str, payload: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(payload))


def section(text: str, title: str) -> str:
    """The body of the section whose heading starts with `title`, up to the next `## ` heading."""
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.fixture
def full_results(tmp_path: Path) -> Path:
    write(tmp_path, "train_throughput.json", train_json(_xla()))
    write(tmp_path, "small_data.json", small_data_json())
    write(tmp_path, "serving_latency.json", serving_json())
    return tmp_path


def test_every_section_is_rendered_in_order(full_results: Path) -> None:
    text = report.render(full_results, now=NOW)
    positions = [text.index(title) for title in TITLES]
    assert positions == sorted(positions)
    assert "Written 2026-01-02 03:04 UTC." in text


def test_every_measured_section_names_its_run(full_results: Path) -> None:
    text = report.render(full_results, now=NOW)
    for title in TITLES[:4]:
        body = section(text, title)
        run = next(line for line in body.splitlines() if line.startswith("Run: `python -m benchmarks."))
        for part in ("data: ", "seeds: ", "machine: ", "load average"):
            assert part in run, (title, run)
    assert "load average (1 min) 1.2 at start, 2.5 at end" in section(text, "## Training throughput")
    assert "load average (1 min) 1.5 at start, 1.8 at end" in section(text, "## XLA on vs off")
    assert "seeds: 0, 1" in section(text, "## Small real data")
    assert "load average (1 min) 3.0 when the run finished" in section(text, "## Small real data")


def test_xla_table_shows_both_sides_the_ratio_and_what_keras_kept(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## XLA on vs off")
    assert "bn_cnn width 64" in body and "translate 4, flip, cutout 8" in body and "batch 256" in body
    assert re.search(r"\| XLA on \| True \| True \| 150\.0 \|", body)
    assert re.search(r"\| XLA off \| False \| False \| 100\.0 \|", body)
    assert "XLA on runs at 1.50x the images/s of XLA off" in body
    assert "dropped" not in body


def test_xla_dropped_by_keras_is_said(tmp_path: Path) -> None:
    write(tmp_path, "train_throughput.json", train_json(_xla(on_ips=101.0, kept=False)))
    body = section(report.render(tmp_path, now=NOW), "## XLA on vs off")
    assert re.search(r"\| XLA on \| True \| False \|", body)
    assert "Keras dropped XLA" in body


def test_training_results_without_xla_say_not_measured(tmp_path: Path) -> None:
    write(tmp_path, "train_throughput.json", train_json(None))
    text = report.render(tmp_path, now=NOW)
    training = section(text, "## Training throughput")
    assert "| bn_cnn (32) | 289,642 | 128 | 200.0 | 180.0 | 11.1% |" in training
    assert "not measured" in section(text, "## XLA on vs off").lower()


def test_small_data_table_and_verdicts(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Small real data")
    assert "scikit-learn digits, 1437 train / 360 test images" in body
    assert "| ours | 10 | 97.50% +- 1.00% | 97.00% | 120 |" in body
    assert "| seed tutorial CNN | 10 | 94.50% +- 1.00% | 94.00% | 20 |" in body
    assert "| seed CNN, same CPU time | 55-61 | 98.50% +- 1.00% | 98.00% | 118 |" in body
    assert "mean accuracy at 10 epochs: met (97.50% vs 94.50%)" in body
    assert "mean accuracy at the same CPU time: MISSED (97.50% vs 98.50%)" in body
    assert "- recipe: batch 32 (auto)" in body


def test_serving_section_keeps_its_ratio_and_targets(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Serving latency")
    assert "the gateway answers 20.0x the naive app's requests per second" in body
    assert "| 16 clients: gateway rps >= 10x naive | met |" in body
    assert "| 1 client: gateway p50 < 5 ms | MISSED |" in body


def test_missing_results_say_not_measured(tmp_path: Path) -> None:
    text = report.render(tmp_path, now=NOW)
    for title in TITLES:
        assert "not measured" in section(text, title).lower(), title
    assert "Not measured on a GPU" in section(text, "## GPU training")
    assert f"`{tmp_path / 'small_data.json'}` is missing (`make bench-small-data` writes it)" in text
    assert "Run:" not in text


def test_gpu_results_replace_not_measured(full_results: Path) -> None:
    gpu_run = {"command": "python -m trainer train --config configs/default.yaml",
               "machine": {"cpus": 16, "gpus": 1}, "test_accuracy": 0.94}  # fmt: skip
    write(full_results, "gpu_default.json", gpu_run)
    body = section(report.render(full_results, now=NOW), "## GPU training")
    assert "not measured" not in body.lower()
    assert "gpu_default.json" in body and '"test_accuracy": 0.94' in body


def test_main_writes_the_document_from_the_given_folder(full_results: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    assert report.main(["--results", str(full_results), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Benchmarks\n")
