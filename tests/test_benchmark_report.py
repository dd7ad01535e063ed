"""docs/benchmarks.md rendering (benchmarks/report.py) from small fake result files: no training.

Checks that every section appears, names its run, shows the side-by-side ratios and the met/MISSED
verdicts, and says "not measured" where a results file is absent. At the end: how the serving
benchmark turns hey's per-request CSV into its figures (no timing assertions).
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
    "## Served graph",
    "## Large photos",
    "## GPU training",
)


def _machine(**extra: Any) -> dict[str, Any]:
    return {"platform": "Linux-test", "processor": "Test CPU", "cpu_count": 2, "gpus": 0,
            "load_average_1m": 1.25, "load_average_1m_end": 2.5, **extra}  # fmt: skip


def _served_model() -> dict[str, Any]:
    """The model the serving benchmarks record: the default profile's, untrained."""
    return {"profile": "configs/default.yaml", "arch": "bn_cnn", "width": 64, "params": 1_150_666,
            "num_train": 50_000, "weights": "untrained (seed 0)"}  # fmt: skip


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
    """A results file as benchmarks/serving_latency.py writes it (figures made up, ratios consistent)."""
    from benchmarks import serving_latency as bench

    def run(app: str, images: int, clients: int, rps: float, p99: float = 40.0, errors: int = 0) -> dict:
        codes = {"200": 100} | ({"503": errors} if errors else {})
        return {"app": app, "images_per_request": images, "clients": clients, "requests": 100 + errors,
                "ok": 100, "errors": errors, "status_codes": codes, "rps": rps, "images_per_s": rps * images,
                "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": p99, "max_ms": 120.0}  # fmt: skip

    lite = {"runtime": "litert", **bench.bare_summary([
        {"batch": 1, "calls": 50, "median_ms": 5.0, "images_per_s": 200.0, "cpu_ms_per_image": 6.0},
        {"batch": 8, "calls": 50, "median_ms": 25.0, "images_per_s": 320.0, "cpu_ms_per_image": 4.5},
        {"batch": 64, "calls": 10, "median_ms": 160.0, "images_per_s": 400.0, "cpu_ms_per_image": 4.0},
    ])}  # fmt: skip
    on_tf = {"runtime": "tensorflow", **bench.bare_summary([
        {"batch": 1, "calls": 50, "median_ms": 7.0, "images_per_s": 143.0, "cpu_ms_per_image": 9.0},
        {"batch": 64, "calls": 10, "median_ms": 200.0, "images_per_s": 320.0, "cpu_ms_per_image": 5.0},
    ])}  # fmt: skip
    rows = [{**lite, "runtimes": [on_tf, lite]}]  # the limit: the faster runtime, as measure_bare_model picks
    results = {
        "command": "python -m benchmarks.serving_latency --duration 8",
        "machine": _machine(),
        "settings": {"quick": False, "duration_s": 8.0, "warmup_s": 1.0, "bare_duration_s": 3.0, "workers": 2,
                     "client": "hey (/usr/bin/hey), closed loop, -t 20 s", "request_deadline_s": 10.0,
                     "litserve": "--workers 1 --max-batch-size 64 --batch-timeout-s 0.005",
                     "gateway_runtime": "auto"},
        "gateway_large_batches": [
            "batches of 16+ images run on TensorFlow (a batch of 32: TensorFlow 42.1 ms of CPU, "
            "LiteRT 50.3 ms)"
        ],
        "model": _served_model(),
        "bare_model": rows[0],
        "runs": [run(bench.GATEWAY, 1, 1, 150.0), run(bench.GATEWAY, 1, 16, 300.0, p99=80.0),
                 run(bench.GATEWAY, 64, 2, 5.5), run(bench.NAIVE, 1, 1, 10.0), run(bench.NAIVE, 1, 16, 15.0),
                 run(bench.LITSERVE, 1, 16, 250.0), run(bench.TFSERVING, 1, 16, 100.0, errors=2),
                 run(bench.LEAN, 1, 16, 320.0)],
    }  # fmt: skip
    # CPU of the 16-client gateway level: 7 ms per request in its processes, 0.5 in hey, batches of 5.
    results["runs"][1].update(server_cpu_ms_per_request=7.0, client_cpu_ms_per_request=0.5, mean_batch=5.0)
    results["runs"][4].update(server_cpu_ms_per_request=120.0, client_cpu_ms_per_request=0.5)  # naive, 16
    results["runs"][7].update(server_cpu_ms_per_request=6.5, client_cpu_ms_per_request=0.5)  # lean, 16
    # The lean route with no model, 16 clients: 1.2 ms per request, outside the table's runs.
    results["no_model"] = {**run(bench.NO_MODEL, 1, 16, 1500.0), "server_cpu_ms_per_request": 1.2,
                           "client_cpu_ms_per_request": 0.3}  # fmt: skip
    bench.add_ratios(results)
    results["targets"] = bench.check_targets(results)
    results["cpu_budget"] = bench.cpu_budget(results)
    results["startup"] = {"workers": 2, "cases": [
        {"cache": "off", "seconds": 10.04, "worker_rss_mib": [950, 952], "converted": 2, "from_cache": 0,
         "load_s": [2.8, 2.9]},
        {"cache": "cold", "seconds": 10.0, "worker_rss_mib": [907, 947], "converted": 1, "from_cache": 1,
         "load_s": [2.9, 2.9]},
        {"cache": "warm", "seconds": 7.8, "worker_rss_mib": [908, 908], "converted": 0, "from_cache": 2,
         "load_s": [0.3, 0.3]},
    ]}  # fmt: skip
    return results


def bn_folding_json() -> dict[str, Any]:
    def timing(ms1: float, ms64: float) -> dict[str, dict[str, float]]:
        return {"1": {"calls": 100, "median_ms": ms1, "images_per_s": 1000 / ms1},
                "64": {"calls": 20, "median_ms": ms64, "images_per_s": 64_000 / ms64}}  # fmt: skip

    variants = {"unfolded": timing(5.0, 200.0), "BN folded (the export)": timing(4.9, 160.0)}
    variants["unfolded"]["64"]["median_cpu_ms"] = 390.0
    return {
        "command": "python -m benchmarks.bn_folding --duration 20",
        "machine": _machine(),
        "model": _served_model(),
        "duration_s": 20.0, "parity_atol": 1e-5, "helps_threshold": 0.05,
        "parity": {"unfolded": {"max_abs_difference": 0.0, "within_atol": True},
                   "BN folded (the export)": {"max_abs_difference": 4e-7, "within_atol": True},
                   "XLA (Keras model, jit_compile)": {"error": "InvalidArgumentError: unsupported op"}},
        "timings": {b: {name: t[b] for name, t in variants.items()} for b in ("1", "64")},
        "verdict": {"BN folded (the export)": {"speedup": {"1": 5.0 / 4.9, "64": 1.25},
                                               "cpu_speedup": {"1": 1.1, "64": 1.3}, "helps": True}},
    }  # fmt: skip


def photo_decode_json(serve: bool = True) -> dict[str, Any]:
    """A results file as benchmarks/photo_decode.py writes it (figures made up)."""

    def decode(name: str, width: int, height: int, scale: int, whole: float, reduced: float) -> dict:
        return {"photo": name, "width": width, "height": height, "photos": 8, "mean_file_kib": width // 2,
                "scale": f"1/{scale}", "whole_ms": whole, "reduced_ms": reduced, "speedup": whole / reduced,
                "max_pixel_difference": 1, "mean_pixel_difference": 0.09,
                "share_pixels_changed": 0.09}  # fmt: skip

    def run(app: str, clients: int, rps: float, p50: float) -> dict:
        return {"app": app, "images_per_request": 1, "clients": clients, "requests": 100, "ok": 100,
                "errors": 0, "status_codes": {"200": 100}, "rps": rps, "images_per_s": rps, "p50_ms": p50,
                "p90_ms": p50 * 1.2, "p99_ms": p50 * 1.5, "max_ms": p50 * 2,
                "server_cpu_ms_per_request": 1000 / rps, "client_cpu_ms_per_request": 1.4}  # fmt: skip

    data = {
        "command": "python -m benchmarks.photo_decode --out x.json",
        "machine": _machine(),
        "photos": {"source": "CIFAR-10 sample photos (cifar10-sample)", "per_size": 8, "noise_levels": 8,
                   "jpeg_quality": 90},
        "decode": [decode("VGA", 640, 480, 2, 2.0, 1.1), decode("12 Mpx phone", 4032, 3024, 8, 102.0, 22.0)],
        "memory": {"whole_mib": 91.3, "reduced_mib": 1.1},
        "folder": {"files": 32, "threads": 2, "one_thread_s": 0.8, "threads_s": 0.45, "speedup": 0.8 / 0.45},
    }  # fmt: skip
    if serve:
        data["serve"] = {"photo": "the first 12 Mpx phone photo (2076 KiB)",
                         "model": _served_model(),
                         "runs": [run("gateway", 1, 26.2, 37.3), run("naive", 1, 4.2, 214.3)]}  # fmt: skip
    return data


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
    write(tmp_path, "bn_folding.json", bn_folding_json())
    write(tmp_path, "photo_decode.json", photo_decode_json())
    return tmp_path


def test_every_section_is_rendered_in_order(full_results: Path) -> None:
    text = report.render(full_results, now=NOW)
    positions = [text.index(title) for title in TITLES]
    assert positions == sorted(positions)
    assert "Written 2026-01-02 03:04 UTC." in text


def test_every_measured_section_names_its_run(full_results: Path) -> None:
    text = report.render(full_results, now=NOW)
    for title in TITLES[:-1]:  # all but the GPU section, which shows a run's own files
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


def test_serving_section_names_the_model_and_the_bare_limits(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Serving latency")
    assert "bn_cnn width 64 (1,150,666 parameters, configs/default.yaml resolved for 50,000 images)" in body
    assert "weights untrained" in body
    assert "| batch 1 | litert | 5.00 | 200 |" in body and "| batch 64 | litert | 160.00 | 400 |" in body
    assert "| batch 1 | tensorflow | 7.00 | 143 | 9.00 |" in body  # both runtimes are listed
    assert "faster runtime's best batched images/s\n(here litert)" in body
    assert "hey (/usr/bin/hey), closed loop" in body
    assert "quick" not in body.lower()
    # What runtime auto gave large batches on this machine, and the timing that decided it.
    assert ("runtime auto: batches of 16+ images run on TensorFlow (a batch of 32: TensorFlow 42.1 ms of "
            "CPU, LiteRT 50.3 ms)") in body.replace("\n", " ")


def test_serving_rows_show_fraction_of_bare_ratio_to_naive_and_errors(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Serving latency")
    # 300 images/s of the bare model's best batched 400; 300 req/s over the naive app's 15 at 16 clients.
    # ... and over LitServe's 250.
    assert "| gateway | 1 | 16 | 300.0 | 300 | 75% | 20.0x | 1.20x | 3.0 | 4.0 | 80.0 | 0 |" in body
    # 64-image requests against the bare batch-64 figure: 5.5 x 64 = 352 of 400.
    assert "| gateway | 64 | 2 | 5.5 | 352 | 88% | - | - |" in body
    assert "| naive | 1 | 16 | 15.0 | 15 | 4% | - | 0.06x |" in body
    assert "| LitServe | 1 | 16 | 250.0 | 250 | 62% | 16.7x | - |" in body
    assert "| gateway + TF Serving double | 1 | 16 | 100.0 | 100 | 25% | 6.7x | 0.40x |" in body
    assert "--max-batch-size 64 --batch-timeout-s 0.005" in body
    assert "| 2 (2x 503) |" in body


def test_serving_targets_are_computed_from_the_figures(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Serving latency")
    assert "| 16 clients: gateway req/s >= 15x the naive app's | 20.0x | met |" in body
    assert "| 16 clients: gateway p99 < 100 ms | 80.0 ms | met |" in body
    assert "req/s >= 1x LitServe's (its dynamic batching) | 1.20x (300 vs 250 req/s) | met |" in body
    assert "of the bare model's batched images/s | 75% (300 of 400) | met |" in body
    # p50 3.0 ms against bare batch 1 (5.0 ms) + 3 ms.
    assert "| 1 client: gateway p50 <= bare batch-1 latency + 3 ms | 3.00 ms vs 8.00 ms | met |" in body
    assert "batch-64 images/s | 88% (352 of 400, 2 clients) | met |" in body
    # The TF Serving run's two 503s count against the gateway.
    assert "| no error at any gateway load level | 2 errors in 402 requests | MISSED |" in body
    assert "| no answer later than the request deadline (10 s) | slowest 120 ms | met |" in body


def test_serving_cpu_per_request_and_the_budget_of_the_70_percent_target(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Serving latency")
    assert "| batch 8 | litert | 25.00 | 320 | 4.50 |" in body
    # The 16-client row carries its CPU figures; rows measured without them say "-".
    assert "| 80.0 | 0 | 7.00 | 0.50 | 5.0 |" in body
    assert "| gateway | 1 | 1 | 150.0 |" in body and "| 0 | - | - | - |" in body
    # 70% of 400 images/s on 2 cores: 2000 / 280 = 7.14 ms per request in all; beside the model at its
    # best batch (4.0) and hey (0.5): 2.64. The mean batch of 5 is nearest the measured batch 8 (4.5 ms
    # per image), so the gateway spends 7.0 - 4.5 = 2.50 ms beside the model.
    assert "- the gateway's processes: 7.00 ms per request; hey: 0.50 ms\n" in body
    assert ("- the bare model: 4.50 ms per image on litert (the gateway's runtime at that batch) at the "
            "batch nearest the gateway's mean of 5.0; 4.00") in body
    assert "- so the gateway spends about 2.50 ms per request beside the model" in body
    assert "allows 7.14 ms per request in all on these cores: 2.64 ms beside the model" in body
    # The naive app: 120 + 0.5 ms per request; 15x its req/s leaves 120.5 / 15 - 0.5 = 7.53 ms.
    assert "- the naive app spends 120.50 ms per request" in body
    assert "so 15x its req/s leaves the gateway 7.53 ms per request" in body
    # The lean app at 16 clients: 320 req/s of 400 images/s is 80% of bare, 320 / 15 = 21.3x the naive
    # app; the gateway's 300 req/s are 0.94x its.
    assert "benchmarks/lean_flask.py) spends 6.50 ms per request and reaches 80% of bare, 21.3x the" in body
    assert "answers 0.94x its req/s" in body
    # The route with no model: 1.2 ms; the 2.64 ms beside the model less that leaves 1.44 for what the
    # gateway adds, on which it spends 2.50 - 1.2 = 1.30.
    assert "a fixed answer) spends 1.20 ms per request (1500 req/s): HTTP and Flask" in body
    assert "the 70% target leaves 1.44 ms per request for everything the gateway adds" in body
    assert "the gateway spends 1.30 ms on them" in body
    assert "Flask route, no model" not in body.split("| target (issue 14)")[0]  # no row in the table


def test_the_lean_app_lines_are_left_out_when_it_was_not_run(tmp_path: Path) -> None:
    from benchmarks import serving_latency as bench

    data = serving_json()
    data["runs"] = [r for r in data["runs"] if r["app"] != bench.LEAN]  # --skip lean
    del data["no_model"]  # its route with no model is skipped with it
    data["cpu_budget"] = bench.cpu_budget(data)
    write(tmp_path, "serving_latency.json", data)
    body = section(report.render(tmp_path, now=NOW), "## Serving latency")
    assert "the naive app spends 120.50 ms per request" in body
    assert "lean_flask" not in body.split("| app |")[1]  # the lines after the budget, not the intro


def test_start_up_with_the_conversion_cache_off_cold_and_warm(full_results: Path, tmp_path: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Serving latency")
    assert "| off | 10.0 | 2 | 0 | 2.8, 2.9 | 950, 952 |" in body
    assert "| warm | 7.8 | 0 | 2 | 0.3, 0.3 | 908, 908 |" in body
    data = serving_json()
    del data["startup"]  # a run with --skip startup, or from before the cache
    write(tmp_path, "serving_latency.json", data)
    assert "conversion cache: not measured" in section(report.render(tmp_path, now=NOW), "## Serving latency")


def test_results_without_cpu_figures_say_so(tmp_path: Path) -> None:
    data = serving_json()
    del data["cpu_budget"]
    write(tmp_path, "serving_latency.json", data)
    assert "CPU per request: not measured" in section(report.render(tmp_path, now=NOW), "## Serving latency")


def test_bare_cpu_is_read_at_the_nearest_measured_batch() -> None:
    from benchmarks import serving_latency as bench

    bare = serving_json()["bare_model"]
    assert bench.bare_cpu_at(bare, 1.0) == 6.0
    assert bench.bare_cpu_at(bare, 2.5) == 6.0  # log scale: 2.5 is nearer 1 than 8
    assert bench.bare_cpu_at(bare, 3.0) == 4.5
    assert bench.bare_cpu_at(bare, 40.0) == 4.0
    assert bench.bare_cpu_at({"batches": [{"batch": 1}]}, 2.0) is None  # results without CPU figures


def test_serving_targets_missed_when_the_gateway_falls_short(tmp_path: Path) -> None:
    from benchmarks import serving_latency as bench

    data = serving_json()
    slow = next(r for r in data["runs"] if (r["app"], r["clients"]) == (bench.GATEWAY, 16))
    slow.update(rps=100.0, images_per_s=100.0, p99_ms=250.0)
    data["runs"] = [r for r in data["runs"] if r["app"] != bench.TFSERVING]
    bench.add_ratios(data)
    data["targets"] = bench.check_targets(data)
    write(tmp_path, "serving_latency.json", data)
    body = section(report.render(tmp_path, now=NOW), "## Serving latency")
    assert "| 16 clients: gateway req/s >= 15x the naive app's | 6.7x | MISSED |" in body
    assert "| 16 clients: gateway p99 < 100 ms | 250.0 ms | MISSED |" in body
    assert "LitServe's (its dynamic batching) | 0.40x (100 vs 250 req/s) | MISSED |" in body
    assert "batched images/s | 25% (100 of 400) | MISSED |" in body
    assert "| no error at any gateway load level | 0 errors in 300 requests | met |" in body


def test_serving_levels_not_run_are_missed_not_crashed(tmp_path: Path) -> None:
    """A run with --skip naive: the ratio to the naive app cannot be computed, so that target is missed."""
    from benchmarks import serving_latency as bench

    data = serving_json()
    data["runs"] = [r for r in data["runs"] if r["app"] != bench.NAIVE]
    bench.add_ratios(data)
    data["targets"] = bench.check_targets(data)
    write(tmp_path, "serving_latency.json", data)
    body = section(report.render(tmp_path, now=NOW), "## Serving latency")
    assert "| 16 clients: gateway req/s >= 15x the naive app's | not measured | MISSED |" in body


def test_quick_serving_run_is_flagged(tmp_path: Path) -> None:
    data = serving_json()
    data["settings"]["quick"] = True
    write(tmp_path, "serving_latency.json", data)
    assert "--quick smoke run" in section(report.render(tmp_path, now=NOW), "## Serving latency")


def test_serving_results_of_the_old_benchmark_say_rerun(tmp_path: Path) -> None:
    write(tmp_path, "serving_latency.json", {"settings": {}, "scenarios": [], "bare_model": {}})
    body = section(report.render(tmp_path, now=NOW), "## Serving latency")
    assert "older version of the benchmark" in body and "make bench-serve" in body


def test_bn_folding_section_compares_with_the_unfolded_graph(full_results: Path) -> None:
    body = section(report.render(full_results, now=NOW), "## Served graph")
    assert "| variant | parity | batch 1 ms | batch 64 ms | speed-up vs unfolded | helps |" in body
    assert "| unfolded | 0.0e+00 | 5.00 | 200.00 (CPU 390.0) | - | - |" in body
    folded = "| 4.90 | 160.00 | 1.02x at batch 1 (CPU 1.10x), 1.25x at batch 64 (CPU 1.30x) | yes |"
    assert folded in body
    assert "| XLA (Keras model, jit_compile) | failed: InvalidArgumentError: unsupported op |" in body
    assert "Batch-norm folding, which the export does: helps on this run" in body


def test_bn_folding_that_does_not_help_is_said(tmp_path: Path) -> None:
    data = bn_folding_json()
    data["verdict"]["BN folded (the export)"]["helps"] = False
    write(tmp_path, "bn_folding.json", data)
    body = section(report.render(tmp_path, now=NOW), "## Served graph")
    assert "does NOT help on this run" in body


def test_another_variant_that_helps_says_why_the_export_does_not_use_it(tmp_path: Path) -> None:
    data = bn_folding_json()
    name = "BN folded + frozen"
    data["parity"][name] = {"max_abs_difference": 5e-7, "within_atol": True}
    for batch, ms in (("1", 4.0), ("64", 150.0)):
        data["timings"][batch][name] = {"calls": 100, "median_ms": ms, "images_per_s": 1.0}
    data["verdict"][name] = {"speedup": {"1": 1.25, "64": 1.33}, "cpu_speedup": {"1": 1.2, "64": 1.3},
                             "helps": True}  # fmt: skip
    write(tmp_path, "bn_folding.json", data)
    body = section(report.render(tmp_path, now=NOW), "## Served graph")
    assert "BN folded + frozen also helps on this run; the export does not use it: the gateway's" in body
    assert "Batch-norm folding, which the export does: helps on this run" in body
    # A variant that does not help gets no such line.
    data["verdict"][name]["helps"] = False
    write(tmp_path, "bn_folding.json", data)
    assert "also helps" not in section(report.render(tmp_path, now=NOW), "## Served graph")


def test_large_photo_section_shows_both_decodes_memory_and_the_gateway_beside_the_naive_app(
    full_results: Path,
) -> None:
    body = section(report.render(full_results, now=NOW), "## Large photos")
    assert "| 12 Mpx phone (4032x3024) | 2016 KiB | 1/8 | 102.0 | 22.0 | 4.6x | 1 / 0.090 |" in body
    assert "| VGA (640x480) | 320 KiB | 1/2 | 2.0 | 1.1 | 1.8x | 1 / 0.090 |" in body
    assert "whole 91 MiB, reduced 1 MiB" in body
    assert "folder of 32 such 12 Mpx photos in 0.80 s on one decoding thread, 0.45 s on 2" in body
    assert "one per CPU): 1.8x." in body
    assert "| gateway | 1 | 26.2 | 37.3 | 55.9 | 38.2 | 0 |" in body
    assert "| naive | 1 | 4.2 | 214.3 |" in body
    assert "data: 8 CIFAR-10 sample photos (cifar10-sample) per size" in body
    assert "the first 12 Mpx phone photo (2076 KiB) as the one upload of each request" in body
    assert "bn_cnn width 64 (1,150,666 parameters" in body


def test_large_photo_section_without_the_http_runs(tmp_path: Path) -> None:
    write(tmp_path, "photo_decode.json", photo_decode_json(serve=False))
    body = section(report.render(tmp_path, now=NOW), "## Large photos")
    assert "| 12 Mpx phone (4032x3024)" in body and "End to end" not in body


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


# -- the serving benchmark's own arithmetic on hey's output (benchmarks/serving_latency.py) ------------


def _answers(rows: list[tuple[float, int, float]]):
    from benchmarks.serving_latency import Answer

    return [Answer(latency, status, offset) for latency, status, offset in rows]


def test_summary_counts_only_the_measured_window_and_non_200_as_errors() -> None:
    from benchmarks.serving_latency import summarize

    rows = [(9.0, 200, 0.2)]  # warm-up: not counted, but its latency is the slowest answer
    rows += [(0.010 * (i + 1), 200, 1.0 + i * 0.01) for i in range(100)]  # 10..1000 ms
    rows += [(0.002, 503, 1.5), (0.003, 429, 1.6)]
    rows += [(0.001, 200, 3.0)]  # sent after the window: not counted
    s = summarize(_answers(rows), warmup_s=1.0, duration_s=2.0, images_per_request=4)
    assert (s["requests"], s["ok"], s["errors"]) == (102, 100, 2)
    assert s["status_codes"] == {"200": 100, "429": 1, "503": 1}
    assert s["rps"] == 50.0 and s["images_per_s"] == 200.0
    assert s["p50_ms"] == pytest.approx(500.0) and s["p99_ms"] == pytest.approx(990.0)
    assert s["max_ms"] == pytest.approx(9000.0)


def test_summary_of_a_level_without_answers_has_no_latencies() -> None:
    from benchmarks.serving_latency import summarize

    s = summarize(_answers([(0.5, 200, 0.1)]), warmup_s=1.0, duration_s=2.0, images_per_request=1)
    assert (s["requests"], s["rps"], s["p50_ms"], s["p99_ms"]) == (0, 0.0, None, None)


def test_parse_refuses_output_that_is_not_heys_csv() -> None:
    from benchmarks.serving_latency import parse_hey_csv

    with pytest.raises(ValueError, match="not hey's CSV"):
        parse_hey_csv("Summary:\n  Total: 1.0 secs\n")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/hey").exists(), reason="hey missing: `apt-get install -y hey`")
def test_real_hey_output_is_read_with_status_codes_and_offsets(tmp_path: Path) -> None:
    """hey against a real HTTP server answering 200 and 503 in turn: every answer is read back."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from benchmarks import serving_latency as bench

    seen: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.headers["Content-Type"] == bench.CONTENT_TYPE
            self.send_response(503 if len(seen) % 2 == 0 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = tmp_path / "body"
        body.write_bytes(bench.multipart("images", bench.sample_pngs(2)))
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/predict"
        answers = bench.run_hey(url, body, clients=2, seconds=1.0, timeout_s=5)
    finally:
        server.shutdown()
    assert len(answers) == len(seen) > 10
    assert seen[0] == body.read_bytes()
    assert {a.status for a in answers} == {200, 503}
    assert all(0 <= a.offset_s < 1.5 and 0 < a.latency_s < 1 for a in answers)
    s = bench.summarize(answers, warmup_s=0.0, duration_s=1.0, images_per_request=2)
    assert s["errors"] == sum(a.status == 503 for a in answers if a.offset_s < 1.0) > 0


def test_process_tree_cpu_counts_every_process_below_the_server() -> None:
    """A server whose work runs in a grandchild (as gunicorn's workers, LitServe's inference workers):
    its CPU is counted, and a root that has ended counts nothing instead of failing."""
    import subprocess
    import sys
    import time

    import psutil

    from benchmarks import serving_latency as bench

    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    root = psutil.Process(parent.pid)
    seen = 0.0
    while parent.poll() is None:
        seen = max(seen, bench.tree_cpu_s([root]))
        time.sleep(0.02)
    assert seen >= 0.4  # most of the grandchild's 0.6 s, read while it still ran
    assert bench.tree_cpu_s([root]) == 0.0


def test_batch_totals_are_read_from_the_gateways_metrics() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from benchmarks import serving_latency as bench

    registry = CollectorRegistry()
    histogram = Histogram("gateway_batch_size", "Images in each model call", registry=registry,
                          buckets=(1, 2, 4, 8))  # fmt: skip
    for size in (1, 3, 8):
        histogram.observe(size)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            payload = generate_latest(registry) if self.path == "/metrics" else b""
            self.send_response(200 if payload else 404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert bench.batch_totals(url) == (12.0, 3.0)
        registry.unregister(histogram)  # a server without batching (the TF Serving backend): no figure
        assert bench.batch_totals(url) is None
    finally:
        server.shutdown()
    assert bench.batch_totals(url) is None  # nothing answers


def test_training_section_shows_data_on_the_device_beside_the_host(tmp_path: Path) -> None:
    data = train_json(None)
    data["data_on_device"] = {
        "data": "synthetic shapes", "method": "alternating fit epochs",
        "results": [
            {"profile": "configs/default.yaml", "arch": "bn_cnn", "width": 64, "batch_size": 64,
             "steps_per_execution": 8, "host_images_per_s": 100.0, "device_images_per_s": 150.0,
             "speedup": 1.5},
            {"profile": "configs/airbench94.yaml",
             "error": "profile configs/airbench94.yaml not found; skipped"},
        ],
    }  # fmt: skip
    write(tmp_path, "train_throughput.json", data)
    training = section(report.render(tmp_path, now=NOW), "## Training throughput")
    assert "on this CPU (host and device share memory)" in training
    assert "| configs/default.yaml | bn_cnn (64) | 64 | 8 | 100.0 | 150.0 | 1.50x |" in training
    assert "| configs/airbench94.yaml | profile configs/airbench94.yaml not found; skipped |" in training
    del data["data_on_device"]
    write(tmp_path, "train_throughput.json", data)
    training = section(report.render(tmp_path, now=NOW), "## Training throughput")
    assert "Data on the device vs fed from the host: not measured in this run." in training


def test_the_machine_line_names_the_vector_instructions(tmp_path: Path) -> None:
    """Which runtime is faster for large batches turns on AVX-512: the figures say which CPU had it."""
    from benchmarks.machine import vector_isa

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n")
    assert vector_isa(cpuinfo) == "AVX-512"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    assert vector_isa(cpuinfo) == "AVX2"
    assert vector_isa(tmp_path / "missing") == ""
    text = report.machine_text(_machine(vector_isa="AVX-512"))
    assert text.startswith("2 CPU cores (Test CPU, AVX-512)")


def test_the_model_beside_the_gateway_is_timed_on_the_runtime_the_gateway_used() -> None:
    """Where TensorFlow is the bare limit (AVX-512) but the gateway's small batches ran on LiteRT, the
    CPU the gateway spends beside the model is reckoned with LiteRT's figure at that batch."""
    from benchmarks import serving_latency as bench

    lite = {"runtime": "litert", **bench.bare_summary([
        {"batch": 1, "calls": 50, "median_ms": 1.6, "images_per_s": 630.0, "cpu_ms_per_image": 3.1},
        {"batch": 4, "calls": 50, "median_ms": 6.1, "images_per_s": 650.0, "cpu_ms_per_image": 3.0},
        {"batch": 64, "calls": 10, "median_ms": 100.0, "images_per_s": 640.0, "cpu_ms_per_image": 3.1},
    ])}  # fmt: skip
    on_tf = {"runtime": "tensorflow", **bench.bare_summary([
        {"batch": 1, "calls": 50, "median_ms": 2.2, "images_per_s": 450.0, "cpu_ms_per_image": 4.0},
        {"batch": 4, "calls": 50, "median_ms": 7.4, "images_per_s": 540.0, "cpu_ms_per_image": 3.4},
        {"batch": 64, "calls": 10, "median_ms": 85.0, "images_per_s": 750.0, "cpu_ms_per_image": 2.6},
    ])}  # fmt: skip
    g16 = {"app": bench.GATEWAY, "images_per_request": 1, "clients": 16, "mean_batch": 4.0,
           "server_cpu_ms_per_request": 4.5, "client_cpu_ms_per_request": 0.2}  # fmt: skip
    results = {"machine": {"cpu_count": 2}, "settings": {"gateway_runtime": "auto"},
               "gateway_large_batches": ["batches of 16+ images run on TensorFlow (a batch of 32: ...)"],
               "bare_model": {**on_tf, "runtimes": [on_tf, lite]}, "runs": [g16]}  # fmt: skip
    budget = bench.cpu_budget(results)
    assert budget["model_at_mean_batch_runtime"] == "litert" and budget["model_at_mean_batch_ms"] == 3.0
    assert abs(budget["gateway_beside_model_ms"] - 1.5) < 1e-9
    assert bench.gateway_runtime_at(results, 64) == "tensorflow"  # what the race gave large batches
    results["gateway_large_batches"] = ["batches of 16+ images run on LiteRT (a batch of 32: ...)"]
    assert bench.gateway_runtime_at(results, 64) == "litert"
    results["settings"]["gateway_runtime"] = "tensorflow"
    assert bench.gateway_runtime_at(results, 4) == "tensorflow"
    assert bench.cpu_budget(results)["model_at_mean_batch_ms"] == 3.4
