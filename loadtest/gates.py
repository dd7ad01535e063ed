"""Pass/fail gates over Locust's `<prefix>_stats.csv`.

A load run passes only when
  * it made requests at all (an unreachable gateway must not pass by making none),
  * no good request failed (error rate on good requests is exactly 0),
  * no bad input got anything but its expected 4xx (a 5xx or a 200 for garbage is a defect too),
  * the p99 latency over all requests is at or under the gate.

The p99 gate (P99_GATE_MS) comes from figures measured on the 2-core development machine while
other engineers' test suites ran on it (`make loadtest` defaults: embedded backend, 2 gunicorn
workers x 8 threads, 8 users, 30 s): about 88 requests/s, p50 30 ms, p99 240-250 ms, max 1.3 s, no
failures (2026-11-23). The gate is 1 s, four times the measured p99: it catches a hang, a pile-up
or a lost worker without failing on a neighbour's CPU load. On a quiet or bigger machine, pass a
tighter --p99-gate-ms.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

P99_GATE_MS = 1000.0
AGGREGATED = "Aggregated"


@dataclass
class Verdict:
    requests: int = 0
    good_requests: int = 0
    good_failures: int = 0
    bad_requests: int = 0
    bad_failures: int = 0
    p99_ms: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # Locust writes "N/A" for percentiles of names with no requests


def evaluate(stats_csv: Path, p99_gate_ms: float = P99_GATE_MS) -> Verdict:
    """Read Locust's stats CSV and apply the gates; `problems` names each gate that failed and why."""
    if not stats_csv.is_file():
        return Verdict(problems=[f"{stats_csv} is missing: Locust did not run or did not write its CSV"])
    with stats_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    verdict = Verdict()
    for row in rows:
        name, count, failures = row["Name"], int(row["Request Count"]), int(row["Failure Count"])
        if name == AGGREGATED:
            verdict.requests = count
            verdict.p99_ms = _number(row["99%"])
        elif name.startswith("good"):
            verdict.good_requests += count
            verdict.good_failures += failures
        else:
            verdict.bad_requests += count
            verdict.bad_failures += failures
    if verdict.requests == 0:
        verdict.problems.append("no requests were made: is the gateway reachable at the given URL?")
    if verdict.good_failures:
        verdict.problems.append(
            f"{verdict.good_failures} of {verdict.good_requests} good requests failed (gate: 0); "
            f"see {stats_csv.name.replace('_stats.csv', '_failures.csv')} for the reasons"
        )
    if verdict.bad_failures:
        verdict.problems.append(
            f"{verdict.bad_failures} of {verdict.bad_requests} bad inputs did not get their expected 4xx"
        )
    if verdict.p99_ms is not None and verdict.p99_ms > p99_gate_ms:
        verdict.problems.append(
            f"p99 latency {verdict.p99_ms:.0f} ms is over the gate of {p99_gate_ms:.0f} ms"
        )
    return verdict
