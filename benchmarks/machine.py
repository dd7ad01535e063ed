"""The machine a benchmark ran on, recorded beside its figures: a shared machine's results mean
little without its CPU, GPU count and load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def vector_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The widest x86 vector instructions the CPU has ("AVX-512", "AVX2", ...; "" when unknown):
    which runtime runs the model faster depends on it (serving/backends/litert.py, the race)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])  # fmt: skip
    except OSError:
        return ""
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return ""


def load_average() -> float:
    """The 1-minute load average: how busy the shared machine was."""
    return round(os.getloadavg()[0], 2)


def describe() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "vector_isa": vector_isa(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
