"""Write docs/benchmarks.md from the JSON results of the benchmarks in benchmarks/results/.

`make bench` runs the benchmarks (each writes benchmarks/results/*.json with its own command,
machine and figures) and then this, so the document always shows the figures of the last run
next to how they were obtained: every section names its run (command, data, seeds, machine, load
average), and a section whose results file is absent says "not measured". Figures are side-by-side
ratios from one run: the machines are shared and noisy, and absolute numbers move with their load.

    python -m benchmarks.report [--results benchmarks/results] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks/results")
OUT = Path("docs/benchmarks.md")
GPU_RESULTS = "gpu_*.json"  # a GPU training run's results, when one exists
# The prepared GPU benchmark (benchmarks/gpu_train.py, run by scripts/gpu-bench.sh on a lent machine):
# the profiles it trains, as (name, config, seeds); its rows say "not measured on a GPU" until it ran.
GPU_TRAIN = "gpu_train.json"
GPU_TRAIN_PROFILES = (("airbench94", "configs/airbench94.yaml", 5), ("default", "configs/default.yaml", 1))


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def machine_text(m: dict[str, Any]) -> str:
    """The machine a run recorded, in words (the benchmarks record different subsets)."""
    cpus = m.get("cpu_count", m.get("cpus"))
    cpu = ", ".join(m[k] for k in ("processor", "vector_isa") if m.get(k))
    parts = [f"{cpus} CPU cores" + (f" ({cpu})" if cpu else "")]
    if "gpus" in m:
        parts.append(f"{m['gpus']} GPUs")
    parts += [m[k] if k == "platform" else f"Python {m[k]}" for k in ("platform", "python") if m.get(k)]
    return ", ".join(parts)


def load_text(start: float | None, end: float | None = None, *, when: str = "at start") -> str:
    """The 1-minute load average the run recorded (how busy the shared machine was)."""
    parts = [f"{start:.1f} {when}" if start is not None else "",
             f"{end:.1f} at end" if end is not None else ""]  # fmt: skip
    recorded = ", ".join(p for p in parts if p)
    return f"load average (1 min) {recorded}" if recorded else "load average not recorded"


def run_line(command: str, *, data: str, seeds: str, machine: str, load: str) -> str:
    return f"Run: `{command.strip()}`; data: {data}; seeds: {seeds}; machine: {machine}; {load}."


def not_measured(path: Path, make_target: str) -> list[str]:
    return [f"Not measured: `{path}` is missing (`{make_target}` writes it).", ""]


def _train_run_line(
    data: dict[str, Any], what: str, seeds: str, start: float | None, end: float | None
) -> str:
    m = data["machine"]
    versions = data["versions"]
    machine = f"{machine_text(m)}; Keras {versions['keras']} on {versions['backend']}"
    return run_line(data["command"], data=what, seeds=seeds, machine=machine, load=load_text(start, end))


def training_section(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    lines = [
        _train_run_line(data, "synthetic shapes (trainer.data.synthetic, seed 0), in memory", "0",
                        m.get("load_average_1m"), m.get("load_average_1m_end")),
        "",
        "Bare step: `train_on_batch` on one fixed in-memory batch. Full path: `fit` with shuffling, the",
        "augmentation layers and the input pipeline. Target: the pipeline adds at most 20% to the bare step.",
        "",
        "| arch (width) | params | batch | bare images/s | full images/s | pipeline overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in data["results"]:
        lines.append(
            f"| {r['arch']} ({r['width']}) | {r['params']:,} | {r['batch_size']} "
            f"| {r['bare_images_per_s']:.1f} | {r['full_images_per_s']:.1f} | {100 * r['overhead']:.1f}% |"
        )
    lines += [
        "",
        f"Largest overhead {100 * data['max_overhead']:.1f}%: target "
        f"{met(data['max_overhead'] <= data['target_max_overhead'])}.",
        "",
    ]
    return lines + _device_data_lines(data.get("data_on_device"), data["machine"])


def _device_data_lines(device: dict[str, Any] | None, machine: dict[str, Any]) -> list[str]:
    """The data held on the device vs fed from the host (trainer/device_data.py), per profile."""
    if not device:
        return ["Data on the device vs fed from the host: not measured in this run.", ""]
    where = f"{machine['gpus']} GPU(s)" if machine.get("gpus") else "this CPU (host and device share memory)"
    lines = [
        f"Data on the device vs fed from the host, on {where}: {device['method']}; data: {device['data']}.",
        "",
        "| profile | arch (width) | batch | steps/execution | host images/s | device images/s "
        "| device/host |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in device["results"]:
        if "error" in r:
            lines.append(f"| {r['profile']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['profile']} | {r['arch']} ({r['width']}) | {r['batch_size']} | {r['steps_per_execution']} "
            f"| {r['host_images_per_s']:.1f} | {r['device_images_per_s']:.1f} | {r['speedup']:.2f}x |"
        )
    return [*lines, ""]


def _augment_text(augment: dict[str, Any]) -> str:
    parts = [f"translate {augment['translate']}" if augment.get("translate") else "",
             "flip" if augment.get("flip") else "",
             f"cutout {augment['cutout']}" if augment.get("cutout") else "",
             f"rotation {augment['rotation']:g}" if augment.get("rotation") else "",
             f"brightness {augment['brightness']:g}" if augment.get("brightness") else ""]  # fmt: skip
    return ", ".join(p for p in parts if p) or "none"


def xla_section(data: dict[str, Any]) -> list[str]:
    x = data.get("xla")
    if not x:
        return ["Not measured: the training results hold no XLA comparison (`make bench-train` adds it).", ""]
    lines = [
        _train_run_line(data, x["data"], str(x.get("seed", 0)), x.get("load_average_1m_start"),
                        x.get("load_average_1m_end")),
        "",
        f"The model `{x['profile']}` trains: {x['arch']} width {x['width']} ({x['params']:,} parameters),",
        f"augmentation {_augment_text(x['augment'])}, the profile's optimizer recipe, "
        f"batch {x['batch_size']};",
        "built and compiled by the trainer's `make_model` with `jit_compile=True` and with `False`.",
        f"Their steps alternate on the same batches; medians of {x['steps']} steps after {x['warmup']} "
        "warm-up steps.",
        "`model.jit_compile` is read back from the compiled model: Keras silently trains without XLA",
        "when a layer cannot compile.",
        "",
    ]  # fmt: skip
    if x.get("xla_error"):
        lines += [f"XLA on: not measured: the trainer refused XLA for this model: {x['xla_error']}", ""]
    lines += [
        "| step | jit_compile requested | model.jit_compile (compiled model) | images/s | ms/step "
        "| first step s (trace + compile) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in ("on", "off"):
        if name in x:
            r = x[name]
            lines.append(f"| XLA {name} | {r['jit_compile_requested']} | {r['jit_compile']} "
                         f"| {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['first_step_s']:.1f} |")
    lines.append("")
    if "speedup" in x:
        lines.append(f"XLA on runs at {x['speedup']:.2f}x the images/s of XLA off on this machine"
                     + ("." if x["xla_kept"] else
                        ", but Keras dropped XLA for the 'on' model: both ran without XLA."))
    asked = x["profile_jit_compile"]
    why = " (auto: XLA only when a GPU is present)" if asked == "auto" else ""
    lines += [f"The profile asks for `train.jit_compile: {asked}`{why}.", ""]
    return lines


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _epochs_text(runs: list[dict[str, Any]], default: int) -> str:
    epochs = sorted({int(r.get("epochs", default)) for r in runs})
    return str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"


def small_data_section(data: dict[str, Any]) -> list[str]:
    d, m = data["data"], data["machine"]
    ours, seed, same_cpu = data["ours"], data["seed_cnn"], data["seed_cnn_same_cpu"]
    epochs = int(data["epochs"])
    seeds = ", ".join(str(r["seed"]) for r in ours["runs"])
    described = (f"{d['name']}, {d['train']} train / {d['test']} test images "
                 f"(stratified split, seed {d['split_seed']})")  # fmt: skip
    lines = [
        run_line(data["command"], data=described, seeds=seeds, machine=machine_text(m),
                 load=load_text(m.get("load_average_1m"), when="when the run finished")),
        "",
        f"Ours: `python -m trainer train --dataset imagefolder --data-dir ROOT --epochs {epochs}` with only "
        "the seed added. Seed CNN: TensorFlow's CNN tutorial model (conv32-pool-conv64-pool-conv64-dense64,",
        "Adam 1e-3, batch 32, pixels / 255) on the same pixels. Same CPU time: the seed CNN given as many",
        "epochs as fit into our run's CPU time (at most 100). CPU seconds are user + system of the",
        "training process. Test accuracy on the held-out split, mean +- standard deviation over the seeds.",
        "",
        "| contender | epochs | test accuracy (mean +- std) | worst seed | mean CPU s |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, r in (("ours", ours), ("seed tutorial CNN", seed), ("seed CNN, same CPU time", same_cpu)):
        accuracy = f"{_percent(r['mean_accuracy'])} +- {_percent(r['std_accuracy'])}"
        lines.append(f"| {name} | {_epochs_text(r['runs'], epochs)} | {accuracy} "
                     f"| {_percent(r['min_accuracy'])} | {r['mean_cpu_s']:.0f} |")
    lines += [""]
    for label, other in ((f"at {epochs} epochs", seed), ("at the same CPU time", same_cpu)):
        ok = ours["mean_accuracy"] >= other["mean_accuracy"]
        lines.append(f"Ours >= the seed CNN's mean accuracy {label}: {met(ok)} "
                     f"({_percent(ours['mean_accuracy'])} vs {_percent(other['mean_accuracy'])}).")
    recipe = ours["runs"][0].get("recipe") if ours["runs"] else None
    if recipe:
        seed0 = ours["runs"][0]["seed"]
        lines += ["", f"What our trainer chose for this data (seed {seed0}), as it printed it:", ""]
        lines += [f"- {line}" for line in recipe]
    lines.append("")
    return lines


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _serving_model_text(model: dict[str, Any]) -> str:
    width = f" width {model['width']}" if model.get("width") is not None else ""
    profile = ""
    if model.get("profile"):
        profile = f", {model['profile']} resolved for {model['num_train']:,} images"
    return f"{model['arch']}{width} ({model['params']:,} parameters{profile}); weights {model['weights']}"


def _large_batches_text(data: dict[str, Any]) -> str:
    """What the gateway's workers chose for large batches at load (runtime auto), if recorded."""
    chosen = data.get("gateway_large_batches") or []
    return f": {'; '.join(chosen)}" if chosen else ""


def serving_section(data: dict[str, Any]) -> list[str]:
    if "runs" not in data:  # written by the benchmark before it measured the default profile's model
        return ["Not measured: `serving_latency.json` is from an older version of the benchmark; "
                "`make bench-serve` rewrites it.", ""]  # fmt: skip
    s, m, bare = data["settings"], data.get("machine", {}), data["bare_model"]
    lines = []
    if s.get("quick"):
        lines += ["**A --quick smoke run: levels of a few seconds, figures not meaningful.**", ""]
    lines += [
        run_line(data["command"], data="random-pixel 32x32 PNG uploads (numpy seed 0); model: "
                 + _serving_model_text(data["model"]), seeds="0",
                 machine=machine_text(m) if m else "not recorded",
                 load=load_text(m.get("load_average_1m"), m.get("load_average_1m_end"))),
        "",
        "The bare model is the published SavedModel's `serving_default` called in the benchmark's process",
        "(no HTTP), at each batch size, on TensorFlow and on its LiteRT conversion (what the embedded",
        "gateway runs by default, serving/backends/litert.py); the faster runtime's best batched images/s",
        f"(here {bare.get('runtime', 'tensorflow')}) is the most this CPU gives for the model.",
        f"The gateway runs under gunicorn as `make serve` starts it ({s['workers']} workers, runtime "
        f"{s.get('gateway_runtime', 'tensorflow')}{_large_batches_text(data)}); the naive app",
        "(a Flask route calling Keras `model.predict` per upload, the same model file) under the same",
        f"gunicorn settings; LitServe (benchmarks/litserve_app.py, {s.get('litserve') or 'not run'}) batches",
        "the same SavedModel with its own dynamic batching after the same decode and resize; the lean app",
        "(benchmarks/lean_flask.py) is a Flask route doing only that decode and one call of the gateway's",
        "LiteRT conversion per upload, under the same gunicorn settings.",
        f"Load: {s['client']}: each client sends its next request when the answer to",
        f"its last arrives, for {s['duration_s']:g} s per level after {s['warmup_s']:g} s not counted.",
        "Errors are answers other than 200 (hey's CSV lists only requests that got an answer).",
        "",
        "| bare model, in process | runtime | ms per call (median) | images/s | CPU ms per image |",
        "|---|---|---:|---:|---:|",
    ]  # fmt: skip
    for runtime in bare.get("runtimes") or [bare]:
        name = runtime.get("runtime", "tensorflow")
        for b in runtime["batches"]:
            lines.append(f"| batch {b['batch']} | {name} | {b['median_ms']:.2f} | {b['images_per_s']:.0f} "
                         f"| {_opt(b.get('cpu_ms_per_image'), '.2f')} |")  # fmt: skip
    lines += [
        "",
        "\"Of bare\": images/s as a fraction of the faster runtime's best batched images/s (its batch-64",
        "images/s for 64-image requests). \"vs naive\", \"vs LitServe\": req/s over the naive app's, over",
        "LitServe's, at the same clients. CPU ms/request: CPU seconds of the server's processes (\"server\")",
        "and of hey (\"hey\", on the same cores) over the level, per answered request; \"batch\": images per",
        "model call in the gateway (its /metrics).",
        "",
        "| app | images/request | clients | req/s | images/s | of bare | vs naive | vs LitServe | p50 ms "
        "| p90 ms | p99 ms | errors | server CPU ms/request | hey CPU ms/request | batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["runs"]:
        codes = {c: n for c, n in r["status_codes"].items() if c != "200"}
        errors = str(r["errors"])
        if codes:
            errors += " (" + ", ".join(f"{n}x {c}" for c, n in codes.items()) + ")"
        vs = f"{r['vs_naive']:.1f}x" if r.get("vs_naive") is not None else "-"
        vs_lit = f"{r['vs_litserve']:.2f}x" if r.get("vs_litserve") is not None else "-"
        latencies = " | ".join(_opt(r[k], ".1f") for k in ("p50_ms", "p90_ms", "p99_ms"))
        lines.append(
            f"| {r['app']} | {r['images_per_request']} | {r['clients']} | {r['rps']:.1f} "
            f"| {r['images_per_s']:.0f} | {r['fraction_of_bare']:.0%} | {vs} | {vs_lit} | {latencies} "
            f"| {errors} | {_opt(r.get('server_cpu_ms_per_request'), '.2f')} "
            f"| {_opt(r.get('client_cpu_ms_per_request'), '.2f')} | {_opt(r.get('mean_batch'), '.1f')} |"
        )
    lines += ["", "| target (issue 14) | measured | result |", "|---|---|---|"]
    lines += [f"| {t['name']} | {t['text']} | {met(t['met'])} |" for t in data["targets"]]
    lines += ["", *_cpu_budget_lines(data.get("cpu_budget"), data["bare_model"])]
    return lines + _startup_lines(data.get("startup"))


def _startup_lines(startup: dict[str, Any] | None) -> list[str]:
    """The gateway's start with the LiteRT conversion cache off, cold and warm (worker_startup.py)."""
    if not startup:
        return ["Start-up with the LiteRT conversion cache: not measured in this run.", ""]
    lines = [
        f"Start-up (benchmarks/worker_startup.py, the same model, {startup['workers']} workers): seconds",
        "from starting gunicorn until every worker serves on LiteRT; \"cold\" is a machine's first start",
        "with the conversion cache (serving/backends/litert_cache.py), \"warm\" a restart after it.",
        "",
        "| conversion cache | start to all workers on LiteRT, s | workers converting "
        "| workers reading the cache | per worker: convert or read, and check, s | worker RSS, MiB |",
        "|---|---:|---:|---:|---|---|",
    ]
    for case in startup["cases"]:
        lines.append(
            f"| {case['cache']} | {case['seconds']:.1f} | {case['converted']} | {case['from_cache']} "
            f"| {', '.join(f'{s:.1f}' for s in case['load_s'])} "
            f"| {', '.join(str(r) for r in case['worker_rss_mib'])} |"
        )
    return [*lines, ""]


def _cpu_budget_lines(budget: dict[str, Any] | None, bare: dict[str, Any]) -> list[str]:
    """Where a request's CPU goes at 16 clients, against what the 70% and naive-ratio targets leave:
    a short list, one figure per line."""
    if not budget:
        return ["CPU per request: not measured (results written before the benchmark recorded CPU).", ""]
    model = f"{budget['model_best_ms']:.2f} ms per image at its best batch ({bare['batched_best_batch']})"
    if budget.get("model_at_mean_batch_ms") is not None:
        runtime = budget.get("model_at_mean_batch_runtime")
        on = f" on {runtime} (the gateway's runtime at that batch)" if runtime else ""
        model = (f"{budget['model_at_mean_batch_ms']:.2f} ms per image{on} at the batch nearest the "
                 f"gateway's mean of {budget['mean_batch']:.1f}; {model}")  # fmt: skip
    lines = [
        f"Where the CPU of a request goes at 16 clients (servers and hey share the {budget['cores']} cores):",
        "",
        f"- the gateway's processes: {budget['gateway_ms']:.2f} ms per request; "
        f"hey: {budget['client_ms']:.2f} ms",
        f"- the bare model: {model}",
        f"- so the gateway spends about {budget['gateway_beside_model_ms']:.2f} ms per request beside the "
        "model (HTTP parsing, Flask, decoding, threads, loopback TCP)",
        f"- the 70% target allows {budget['allowed_ms']:.2f} ms per request in all on these cores: "
        f"{budget['allowed_beside_model_ms']:.2f} ms beside the model at its best batch and hey",
    ]
    if budget.get("naive_ms") is not None:
        lines.append(
            f"- the naive app spends {budget['naive_ms']:.2f} ms per request (hey's included); both saturate "
            f"the cores, so {budget['naive_ratio']:g}x its req/s leaves the gateway "
            f"{budget['allowed_for_naive_ratio_ms']:.2f} ms per request"
        )
    if budget.get("lean_ms") is not None:
        lines.append(
            f"- the lean app (a Flask route that only decodes the upload and calls the same LiteRT model, "
            f"benchmarks/lean_flask.py) spends {budget['lean_ms']:.2f} ms per request and reaches "
            f"{budget['lean_fraction_of_bare']:.0%} of bare, {_opt(budget['lean_vs_naive'], '.1f')}x the "
            "naive app: the least work per upload of a Flask app under gunicorn (no batching, so no strict "
            "bound); the gateway, with its "
            f"batching, limits, metrics and trust fields, answers {_opt(budget['gateway_vs_lean'], '.2f')}x "
            "its req/s"
        )
    if budget.get("no_model_ms") is not None:
        lines.append(
            "- the same route with no model (benchmarks/lean_flask.py, model=False: parse, decode, resize, "
            f"a fixed answer) spends {budget['no_model_ms']:.2f} ms per request "
            f"({budget['no_model_rps']:.0f} req/s): HTTP and Flask before any model runs. With it, the "
            "model at its best batch and hey, the 70% target leaves "
            f"{budget['allowed_beside_http_ms']:.2f} ms per request for everything the gateway adds "
            "(batching, limits, deadlines, request ids, metrics, drift, trust fields); the gateway spends "
            f"{budget['gateway_beside_model_ms'] - budget['no_model_ms']:.2f} ms on them"
        )
    return [*lines, ""]


def _ms_cell(timing: dict[str, float]) -> str:
    cpu = f" (CPU {timing['median_cpu_ms']:.1f})" if "median_cpu_ms" in timing else ""
    return f"{timing['median_ms']:.2f}{cpu}"


def _cpu_speedup(verdict: dict[str, Any], batch: str) -> str:
    cpu = verdict.get("cpu_speedup", {}).get(batch)
    return f" (CPU {cpu:.2f}x)" if cpu is not None else ""


def bn_folding_section(data: dict[str, Any]) -> list[str]:
    m, model = data["machine"], data["model"]
    batches = sorted(data["timings"], key=int)
    lines = [
        run_line(data["command"],
                 data=f"random pixels (numpy seeds 0 and 1); model: {_serving_model_text(model)}",
                 seeds="0", machine=machine_text(m),
                 load=load_text(m.get("load_average_1m"), m.get("load_average_1m_end"))),
        "",
        "Each variant is the model's `serving_default` graph on TensorFlow (what TF Serving runs, and the",
        "graph the embedded gateway converts to LiteRT: see the serving section for that runtime), timed",
        f"in one process round-robin for {data['duration_s']:g} s per batch size (median ms per call).",
        "Unfolded: the export with `fold_bn=False`; BN folded: the export as `make serve` publishes it,",
        "every batch norm folded into its convolution; frozen: variables turned into constants (grappler",
        "then sees the weights); XLA: the Keras model's inference under `jit_compile=True`. Parity: the",
        f"largest probability difference from the Keras model (must be <= {data['parity_atol']:.0e}).",
        "CPU: the process's CPU ms per call (all TensorFlow threads), less moved by other processes.",
        "",
        "| variant | parity | " + " | ".join(f"batch {b} ms" for b in batches)
        + " | speed-up vs unfolded | helps |",
        "|---|---:|" + "---:|" * len(batches) + "---|---|",
    ]  # fmt: skip
    for name, check in data["parity"].items():
        if "error" in check:
            lines.append(f"| {name} | failed: {check['error']} |" + " - |" * len(batches) + " - | - |")
            continue
        ms = " | ".join(_ms_cell(data["timings"][b][name]) for b in batches)
        v = data["verdict"].get(name)
        speed = "-"
        if v:
            speed = ", ".join(f"{v['speedup'][b]:.2f}x at batch {b}{_cpu_speedup(v, b)}" for b in batches)
        helps = ("yes" if v["helps"] else "no") if v else "-"
        lines.append(f"| {name} | {check['max_abs_difference']:.1e} | {ms} | {speed} | {helps} |")
    folded = next((v for name, v in data["verdict"].items() if name.startswith("BN folded (")), None)
    threshold = f"{data['helps_threshold']:.0%}"
    if folded is not None:
        lines += ["", "Batch-norm folding, which the export does: "
                  + ("helps on this run" if folded["helps"] else "does NOT help on this run")
                  + f" (helps: at least {threshold} faster at one batch size, not slower at the other, "
                  "with parity)."]  # fmt: skip
    helped = [name for name, v in data["verdict"].items() if v and v["helps"]]
    for name in (name for name in helped if not name.startswith("BN folded (")):
        lines += ["", f"{name} also helps on this run; the export does not use it: "
                  + next((why for key, why in NOT_IN_EXPORT.items() if key in name), "not evaluated for it.")]
    lines.append("")
    return lines


# Why a variant bn_folding.py measures is not what the export ships, when a run finds it helps.
NOT_IN_EXPORT = {
    "XLA": "the exported signature cannot be compiled whole (its string `classes` output has no XLA "
    "kernel), and the embedded gateway runs the signature's LiteRT conversion, faster than any "
    "TensorFlow variant here at batch 1 (the serving section's bare model).",
    "frozen": "the gateway's LiteRT conversion already turns the weights into constants, so freezing "
    "would change only what TensorFlow Serving runs; not adopted on one run's figures.",
}


GPU_TRAIN_HEADER = [
    "| profile | seeds | mean test accuracy (min..max) | training s, mean | without compile | "
    "time to 94% | images/s |",
    "|---|---:|---:|---:|---:|---:|---:|",
]


def gpu_train_section(data: dict[str, Any] | None) -> list[str]:
    """benchmarks/gpu_train.py's table: per profile, the seeds' mean accuracy (airbench's 6-view TTA for
    the airbench profile, as its anchor is scored), training time and speed; "not measured on a GPU"
    rows until a GPU machine ran it, and also when the run it shows had no GPU."""
    goal = ("Goal: mean test accuracy of at least 94.0% over 5 seeds in at most 30 s of training on one "
            "H100 (airbench94's anchor: 94.01% in 3.29 s on an A100, PyTorch).")
    if data is None:
        lines = ["Prepared, not run: `make bench-gpu-prepare` here, then `scripts/gpu-bench.sh` on a lent "
                 "GPU machine (README, \"Training fast\"). " + goal, "", *GPU_TRAIN_HEADER]
        for name, config, seeds in GPU_TRAIN_PROFILES:
            lines.append(f"| {name} (`{config}`) | {seeds} | not measured on a GPU | | | | |")
        return lines + [""]
    m, versions = data["machine"], data["versions"]
    gpus = m.get("nvidia_smi") or [d["kind"] for d in m.get("devices", [])]
    machine = (f"{machine_text(m)}; accelerators: {', '.join(gpus) or 'none'}; "
               f"Keras {versions['keras']} on {versions['backend']} (JAX {versions['jax']})")
    data_text = data["data"]["dataset"] + (f" ({', '.join(data['data']['overrides'])})"
                                           if data["data"]["overrides"] else "")
    seeds = "; ".join(f"{p['name']}: {', '.join(map(str, p['seeds']))}" for p in data["profiles"])
    lines = [run_line(data["command"], data=data_text, seeds=seeds, machine=machine,
                      load=load_text(m.get("load_average_1m"), m.get("load_average_1m_end"))), "", goal, ""]
    if not data["measured_on_gpu"]:
        lines += ["This run had no GPU: not measured on a GPU (a CPU run of the same code).", ""]
    lines += GPU_TRAIN_HEADER
    for p in data["profiles"]:
        s = p["summary"]
        if not s.get("runs"):
            lines.append(f"| {p['name']} (`{p['config']}`) | 0 of {len(p['seeds'])} | not measured | | | | |")
            continue
        tta = " (6-view TTA)" if s["accuracy_key"] == "test_accuracy_tta" else ""
        spread = f"{_percent(s['min_accuracy'])}..{_percent(s['max_accuracy'])}"
        reach = f"{s['time_to_accuracy_s']:.1f} s" if s["reached_target"] else "not reached"
        lines.append(
            f"| {p['name']} (`{p['config']}`) | {s['runs']} of {len(p['seeds'])} | "
            f"{_percent(s['mean_accuracy'])}{tta} ({spread}) | "
            f"{s['mean_train_seconds']:.1f} | {s['mean_train_seconds_excluding_compile']:.1f} | {reach} | "
            f"{s['mean_images_per_second']:,.0f} |"
        )
    lines.append("")
    if data["skipped"]:
        skipped = ", ".join(f"{s['profile']} seed {s['seed']} ({s['why']})" for s in data["skipped"])
        lines += [f"Skipped to stay within the time budget: {skipped}.", ""]
    if not data["complete"]:
        lines += ["The run did not complete: the figures are those of the runs that finished.", ""]
    return lines


def gpu_section(results: Path) -> list[str]:
    """GPU training runs, when any wrote results; their layout is the run's own, so shown as recorded
    (benchmarks/gpu_train.py's as a table)."""
    title = "## GPU training"
    paths = sorted(results.glob(GPU_RESULTS))
    if not paths:
        return [title, "", f"Not measured on a GPU: no GPU run exists (no `{results / GPU_RESULTS}`).", "",
                *gpu_train_section(None)]
    lines = [title, ""]
    if (results / GPU_TRAIN).is_file():
        lines += gpu_train_section(json.loads((results / GPU_TRAIN).read_text()))
        paths.remove(results / GPU_TRAIN)
    for path in paths:
        data = json.loads(path.read_text())
        m = data.get("machine", {})
        lines += [
            f"### {path.name}",
            "",
            run_line(str(data.get("command", "not recorded")), data=str(data.get("data", "not recorded")),
                     seeds=str(data.get("seeds", data.get("seed", "not recorded"))),
                     machine=machine_text(m) if m else "not recorded",
                     load=load_text(m.get("load_average_1m"))),
            "",
            "```json",
            json.dumps({k: v for k, v in data.items() if k not in ("command", "machine")}, indent=2),
            "```",
            "",
        ]  # fmt: skip
    return lines


def photo_decode_section(data: dict[str, Any]) -> list[str]:
    """Large JPEGs: whole vs reduced decode to the model's pixels, memory, and the gateway end to end."""
    photos = data["photos"]
    what = (f"{photos['per_size']} {photos['source']} per size, upscaled with +-{photos['noise_levels']} "
            f"levels of noise, JPEG quality {photos['jpeg_quality']}")  # fmt: skip
    m = data["machine"]
    lines = [
        run_line(data["command"], data=what, seeds="noise seeds 0..7", machine=machine_text(m),
                 load=load_text(m.get("load_average_1m"), m.get("load_average_1m_end"))),  # fmt: skip
        "",
        "Upload -> the model's 32x32 pixels in one thread: *whole* decodes every pixel first (what every "
        "path did before), *reduced* lets libjpeg scale the DCT while decoding "
        "(`contract/preprocess.py`, the same pixels in the exported graph). Pixel difference: between "
        "the two ways' 32x32 results, in levels of 0..255.",
        "",
        "| photo | file | scale | whole ms | reduced ms | speed-up | max / mean pixel difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["decode"]:
        lines.append(
            f"| {r['photo']} ({r['width']}x{r['height']}) | {r['mean_file_kib']} KiB | {r['scale']} | "
            f"{r['whole_ms']:.1f} | {r['reduced_ms']:.1f} | {r['speedup']:.1f}x | "
            f"{r['max_pixel_difference']} / {r['mean_pixel_difference']:.3f} |"
        )
    memory = data["memory"]
    lines += ["", f"Peak RSS rise of one 12 Mpx decode (fresh process): whole {memory['whole_mib']:.0f} MiB, "
              f"reduced {memory['reduced_mib']:.0f} MiB.", ""]  # fmt: skip
    folder = data.get("folder")
    if folder:
        lines += [
            f"Training data: the trainer reads an image folder of {folder['files']} such 12 Mpx photos in "
            f"{folder['one_thread_s']:.2f} s on one decoding thread, {folder['threads_s']:.2f} s on "
            f"{folder['threads']} (its default, one per CPU): {folder['speedup']:.1f}x.",
            "",
        ]
    serve = data.get("serve")
    if serve:
        lines += [
            f"End to end, {serve['photo']} as the one upload of each request (hey, closed loop), served "
            f"by the gateway as `make serve` runs it and by the naive app (whole decode, Keras "
            f"`model.predict`), both on {_serving_model_text(serve['model'])}:",
            "",
            "| app | clients | req/s | p50 ms | p99 ms | server CPU ms/request | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in serve["runs"]:
            lines.append(f"| {r['app']} | {r['clients']} | {r['rps']:.1f} | {_opt(r['p50_ms'], '.1f')} | "
                         f"{_opt(r['p99_ms'], '.1f')} | {_opt(r['server_cpu_ms_per_request'], '.1f')} | "
                         f"{r['errors']} |")  # fmt: skip
        lines.append("")
    return lines


Section = Callable[[dict[str, Any]], list[str]]
# (results file, the make target that writes it, the sections drawn from it: (title, body), in document
# order)
SOURCES: tuple[tuple[str, str, tuple[tuple[str, Section], ...]], ...] = (
    ("train_throughput.json", "make bench-train", (
        ("## Training throughput (`make bench-train`)", training_section),
        ("## XLA on vs off, training step (`make bench-train`)", xla_section),
    )),
    ("small_data.json", "make bench-small-data", (
        ("## Small real data: our trainer vs a seed tutorial CNN (`make bench-small-data`)",
         small_data_section),
    )),
    ("serving_latency.json", "make bench-serve", (
        ("## Serving latency and throughput (`make bench-serve`)", serving_section),
    )),
    ("bn_folding.json", "make bench-serve", (
        ("## Served graph: batch-norm folding, freezing, XLA (`make bench-serve`)", bn_folding_section),
    )),
    ("photo_decode.json", "make bench-decode", (
        ("## Large photos: reduced JPEG decoding (`make bench-decode`)", photo_decode_section),
    )),
)  # fmt: skip


def render(results: Path = RESULTS, now: datetime | None = None) -> str:
    """The whole document from the JSON files in `results`."""
    now = now or datetime.now(UTC)
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`benchmarks/report.py`) from the last run's results in",
        "`benchmarks/results/`. Every comparison is side by side in one run on one machine; these",
        "machines are shared, so read the ratios, not the absolute figures. Each section names the run",
        "behind its figures (command, data, seeds, machine, load average).",
        f"Written {now:%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    for name, target, sections in SOURCES:
        path = results / name
        data = json.loads(path.read_text()) if path.is_file() else None
        for title, section in sections:
            lines += [title, ""]
            lines += section(data) if data is not None else not_measured(path, target)
    lines += gpu_section(results)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmarks' JSON files")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render(args.results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
