"""Locust users uploading the mix from payloads.py to POST /v1/predict, and one user asking
POST /v1/explain (its share of the load: at most one explanation in flight, as the page's button
sends them, within the gateway's explain concurrency per worker).

Run headless through `make loadtest` (loadtest/run.py), or by hand:
    locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 30s --host http://127.0.0.1:8080
Each request is named by its kind ("good ...", "bad ...") so Locust's CSV files give figures per
kind; a bad input counts as a success only when it gets the 4xx it must get.
With LOAD_API_KEY set (loadtest/run.py sets it), good requests carry that API key.
"""

from __future__ import annotations

import json
import random

from locust import FastHttpUser, between, events, task
from locust.env import Environment

from loadtest.payloads import RequestKind, api_key, build_explain_mix, build_mix

MIX: list[RequestKind] = []
EXPLAIN_MIX: list[RequestKind] = []


@events.init.add_listener
def _build_mix(environment: Environment, **_kwargs: object) -> None:
    # Once per process, before users start: encoding hundreds of images per request would
    # otherwise measure the load generator instead of the gateway.
    MIX[:] = build_mix()
    EXPLAIN_MIX[:] = build_explain_mix()


def check(kind: RequestKind, images: int, status: int, text: str) -> str | None:
    """Why this response is wrong for this kind of request, or None when it is right."""
    if status not in kind.expected:
        return f"status {status}, expected {sorted(kind.expected)}: {text[:200]}"
    if status != 200:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return f"200 with a body that is not JSON: {text[:200]}"
    results = body.get(kind.result_field) if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != images:
        return f"200 without {images} {kind.result_field}: {text[:200]}"
    return None


def send(user: FastHttpUser, mix: list[RequestKind], turn: int) -> None:
    """One request of a kind drawn from `mix` by weight, judged by check()."""
    kind = random.choices(mix, weights=[k.weight for k in mix])[0]
    body = random.choice(kind.bodies)
    with user.client.post(
        kind.path,
        data=body.data,
        headers=kind.headers(body, api_key(), turn),
        name=kind.name,
        catch_response=True,
    ) as response:
        status = response.status_code or 0  # 0: no HTTP answer (refused, reset, timed out)
        text = (response.text or "") if status else f"no answer: {response.error!r}"
        problem = check(kind, body.images, status, text)
        if problem:
            response.failure(problem)
        else:
            response.success()


class Uploader(FastHttpUser):
    wait_time = between(0.0, 0.05)  # near closed-loop: users retry quickly, as impatient apps do
    # A request still unanswered after this is recorded as a failure (a hang), before run.py's
    # --stop-timeout ends the run and would drop it unrecorded.
    network_timeout = 10.0
    connection_timeout = 5.0

    turn = 0

    @task
    def predict(self) -> None:
        self.turn += 1
        send(self, MIX, self.turn)


class Explainer(FastHttpUser):
    """Exactly one user of the run (fixed_count) explains, pausing as a person looking at overlays
    would: explain's concurrency cap per worker (GATEWAY_EXPLAIN_CONCURRENCY, 2) is never exceeded by
    the load test itself, so any 503 explain_busy here is a defect."""

    fixed_count = 1
    wait_time = between(0.05, 0.2)
    network_timeout = 10.0
    connection_timeout = 5.0
    turn = 0

    @task
    def explain(self) -> None:
        self.turn += 1
        send(self, EXPLAIN_MIX, self.turn)
