"""SIGTERM while requests sit in the batching queue: every accepted request is answered, then the
gateway exits (what a Kubernetes rollout or scale-down does to a pod)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from loadtest.gateway_process import running_gateway
from tests.drills.conftest import copy_model_base
from tests.drills.traffic import small_png

pytestmark = [pytest.mark.drill, pytest.mark.slow]


def test_sigterm_loses_no_queued_request(exported_model, tmp_path) -> None:
    base = tmp_path / "models"
    copy_model_base(exported_model, base)
    env = {
        "GATEWAY_MODEL_BASE_PATH": str(base),
        "GATEWAY_MODEL_NAME": exported_model.name,
        "GATEWAY_TFSERVING_ADDRESS": "",
        "GATEWAY_DEADLINE_S": "30",
        # Small batches of large requests: the queue is many batches deep when the signal arrives.
        "GATEWAY_MAX_BATCH_SIZE": "4",
        "GATEWAY_MAX_ENQUEUED_BATCHES": "1000",
    }
    images = [("images", (f"{i}.png", small_png(i), "image/png")) for i in range(64)]

    def post(_: int) -> tuple[int | str, float]:
        url = f"{gateway.url}/v1/predict"
        r = requests.post(url, files=images, headers={"Connection": "close"}, timeout=60)
        answer = len(r.json()["predictions"]) if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
        return answer, time.monotonic()

    with running_gateway(env, workers=1, threads=16, log_dir=tmp_path / "log") as gateway:
        with ThreadPoolExecutor(12) as pool:
            answers = [pool.submit(post, i) for i in range(12)]
            # Signal once the worker has accepted all twelve connections: a connection still in the
            # kernel's backlog when the listener closes is refused, which a load balancer retries
            # (and Kubernetes stops sending before SIGTERM); an accepted request must be answered.
            # Counted as the client ends ever seen, not the connections open now: on a busy machine
            # the first answers (and their closes) came before the last connection was accepted, the
            # open count never reached twelve, and the signal came after every answer.
            worker = gateway.workers()[0]
            accepted: set[tuple] = set()
            deadline = time.monotonic() + 20
            while len(accepted) < 12 and time.monotonic() < deadline:
                accepted |= {tuple(c.raddr) for c in worker.net_connections("tcp") if c.raddr}
                time.sleep(0.01)
            sent_signal = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            results = [a.result()[0] for a in answers]
            answered_after_signal = sum(a.result()[1] > sent_signal for a in answers)
        gateway.process.wait(timeout=30)
        stopped_after = time.monotonic() - sent_signal

    assert results == [64] * 12, f"answers after SIGTERM: {results}\n{gateway.log()[-2000:]}"
    assert answered_after_signal > 0  # the signal really came while requests were waiting
    assert gateway.process.returncode == 0
    assert stopped_after < 25  # within gunicorn's graceful timeout, not killed at its end
