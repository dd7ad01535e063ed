"""The load harness: its gates judge Locust's CSV correctly, and a short real run passes them.

The short run is `make loadtest` in miniature (4 users, 8 s, against a gunicorn gateway run.py starts
on the session's model, with an API key and a rate limit as in production, and prediction sampling
on for every request): the same locustfile, the same request mix (explanations and the 401 kinds
included), the same gates.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from loadtest import run
from loadtest.gates import evaluate
from loadtest.payloads import EXPLAIN_PATH, build_explain_mix, build_mix

# Locust 2.x's stats CSV header, as written by locust.stats.StatsCSVFileWriter.
HEADER = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
          "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
          "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]


def write_stats(path: Path, rows: list[tuple[str, int, int, str]]) -> Path:
    """rows: (name, requests, failures, p99)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for name, count, failures, p99 in rows:
            values = dict.fromkeys(HEADER, "0")
            values.update({"Type": "POST" if name != "Aggregated" else "", "Name": name,
                           "Request Count": str(count), "Failure Count": str(failures), "99%": p99})
            writer.writerow([values[h] for h in HEADER])
    return path


def test_gates_pass_a_clean_run(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "x_stats.csv", [
        ("good 1 jpeg 32px", 90, 0, "120"), ("bad empty file", 10, 0, "8"), ("Aggregated", 100, 0, "120"),
    ])
    verdict = evaluate(stats, p99_gate_ms=500)
    assert verdict.passed, verdict.problems
    assert (verdict.good_requests, verdict.bad_requests, verdict.p99_ms) == (90, 10, 120.0)


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([("good 1 png 32px", 50, 1, "100"), ("Aggregated", 50, 1, "100")], "good requests failed"),
        ([("bad not an image", 5, 2, "10"), ("good 1 png 32px", 50, 0, "90"), ("Aggregated", 55, 2, "90")],
         "did not get their expected 4xx"),
        ([("good 1 png 32px", 50, 0, "900"), ("Aggregated", 50, 0, "900")], "over the gate"),
        ([("Aggregated", 0, 0, "N/A")], "no requests were made"),
    ],
)
def test_gates_fail_with_the_reason(tmp_path: Path, rows: list, reason: str) -> None:
    verdict = evaluate(write_stats(tmp_path / "x_stats.csv", rows), p99_gate_ms=500)
    assert not verdict.passed
    assert any(reason in p for p in verdict.problems), verdict.problems


def test_gates_fail_when_locust_wrote_nothing(tmp_path: Path) -> None:
    verdict = evaluate(tmp_path / "missing_stats.csv")
    assert not verdict.passed and "missing" in verdict.problems[0]


def test_mix_has_good_and_bad_requests_with_their_statuses(tmp_path: Path) -> None:
    mix = build_mix(limit=5, photo_dir=tmp_path)  # no photos there: the generated fallback
    good = [k for k in mix if k.good]
    bad = [k for k in mix if not k.good]
    assert good and bad and all(k.expected == {200} for k in good)
    assert all(min(k.expected) >= 400 and max(k.expected) < 500 for k in bad)
    assert any(b.images > 1 for k in good for b in k.bodies), "no multi-image requests"
    too_many = next(k for k in bad if "too many" in k.name).bodies[0].data
    assert too_many.count(b'name="images"') == 6  # one over the limit of 5
    assert sum(k.weight for k in bad) * 10 < sum(k.weight for k in good), "bad inputs must be a small share"
    assert not any(k.auth != "valid" for k in mix), "a gateway without keys must not get the 401 kinds"


def test_keyed_mix_sends_the_key_both_ways_and_401_kinds_without_it(tmp_path: Path) -> None:
    mix = build_mix(limit=5, photo_dir=tmp_path, keyed=True)
    by_auth = {k.auth: k for k in mix}
    assert by_auth["missing"].expected == by_auth["wrong"].expected == {401}
    assert not by_auth["missing"].good and not by_auth["wrong"].good
    good, body = by_auth["valid"], by_auth["valid"].bodies[0]
    assert good.headers(body, "c10_k", 0)["Authorization"] == "Bearer c10_k"
    assert good.headers(body, "c10_k", 1)["X-API-Key"] == "c10_k"
    missing = by_auth["missing"].headers(body, "c10_k", 0)
    assert "Authorization" not in missing and "X-API-Key" not in missing
    assert "c10_k" not in str(by_auth["wrong"].headers(body, "c10_k", 1))


def test_explain_mix_stays_within_the_gateways_explain_cap(tmp_path: Path) -> None:
    from serving.config import Settings

    mix = build_explain_mix(photo_dir=tmp_path)
    assert mix and all(k.good and k.path == EXPLAIN_PATH and k.result_field == "explanations" for k in mix)
    assert max(b.images for k in mix for b in k.bodies) <= Settings().max_explain_images


@pytest.mark.load
@pytest.mark.slow
def test_short_load_run_passes_the_gates(
    exported_model, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # run.py starts its own gateway (one worker, to spare the 2-core machine) with a minted API key.
    rc = run.main(["--model-base", str(exported_model.base_path), "--model-name", exported_model.name,
                   "--workers", "1", "--users", "4", "--spawn-rate", "4", "--time", "8s",
                   "--results-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "with an API key" in out.out
    stats = next(tmp_path.glob("load-*_stats.csv"))
    verdict = evaluate(stats)
    assert verdict.good_requests >= 20 and verdict.bad_requests >= 1, out.out
    assert "PASS: all load gates met" in out.out
    rows = {row["Name"]: row for row in csv.DictReader(stats.open())}
    assert {"good 1 jpeg 640px", "good 4 mixed 32-256px"} <= set(rows), set(rows)
    # The explain share and the API-key traffic were sent (and answered as they must be: gates above).
    explained = sum(int(r["Request Count"]) for n, r in rows.items() if n.startswith("good explain"))
    assert explained >= 3, rows.keys()
    assert {"bad missing api key", "bad wrong api key"} & set(rows), set(rows)
    assert {p.name.split("_", 1)[1] for p in tmp_path.glob("load-*.csv")} >= {"stats.csv", "failures.csv"}
    # The gates held with every predict request sampled, and the sample kept each of them (none
    # dropped by a full queue or a failed write): at least one image per good predict request.
    from serving.sampling import SampleStore

    predicts = sum(int(r["Request Count"]) for n, r in rows.items()
                   if n.startswith("good") and not n.startswith("good explain"))  # fmt: skip
    assert "==> prediction sample:" in out.out
    with SampleStore(tmp_path / "samples", create=False) as store:
        assert store.count() >= predicts > 0
        records = list(store.records())
    assert len({r.request_id for r in records}) >= predicts  # a record per request, by its own id
    assert {r.model_version for r in records} == {exported_model.version}


@pytest.mark.load
@pytest.mark.slow
def test_load_run_fails_against_a_gateway_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from loadtest.gateway_process import free_port

    rc = run.main(["--url", f"http://127.0.0.1:{free_port()}", "--users", "2", "--time", "4s",
                   "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    # Refused connections are failed good requests; on a slow start Locust may not even get to send.
    assert "good requests failed" in err or "no requests were made" in err, err
