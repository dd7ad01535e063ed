"""Model versions change under the embedded gateway while traffic flows.

* a new version is published (trainer.export.publish, the product's own path): no request fails,
  and answers switch to the new version within a few poll intervals;
* a half-written or corrupt version directory appears above the served one: it is never served,
  the gateway keeps answering with the good version, and a good version published after it is
  still picked up (the poller survived the broken one).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from contract.versions import version_directories
from loadtest.gateway_process import wait_until
from tests.drills.conftest import POLL_INTERVAL_S, EmbeddedDrillGateway
from tests.drills.traffic import Traffic

pytestmark = [pytest.mark.drill, pytest.mark.slow]

# Loading a SavedModel takes a second or more on a busy 2-core machine, on top of the poll interval.
SWITCH_TIMEOUT_S = 60.0


def served_version(url: str) -> int | None:
    r = requests.get(f"{url}/v1/models", timeout=10)
    return r.json()["version"] if r.status_code == 200 else None


def highest_version(model_dir: Path) -> int:
    return version_directories(model_dir)[0]


def publish_next(drill: EmbeddedDrillGateway) -> int:
    from trainer.export.publish import publish

    return int(publish(drill.run_dir, drill.model_dir.parent, drill.model_dir.name).name)


def all_serving(traffic: Traffic, version: int, window_s: float = 2.0, minimum: int = 20) -> bool:
    """True when at least `minimum` answers of the last `window_s` seconds all came from `version`.

    Each worker swaps on its own poll; the traffic uses a fresh connection per request, so a window
    of answers spans both workers, not just the one a kept-alive connection sticks to.
    """
    recent = traffic.since(time.monotonic() - window_s)
    return len(recent) >= minimum and all(a.status == 200 and a.version == version for a in recent)


def test_new_version_published_during_load_switches_without_failures(
    embedded_gateway: EmbeddedDrillGateway,
) -> None:
    url = embedded_gateway.url
    old = served_version(url)
    with Traffic(url, threads=3, fresh=True) as traffic:
        traffic.wait_for(20)
        new = publish_next(embedded_gateway)
        published_at = time.monotonic()
        assert new > old
        wait_until(lambda: all_serving(traffic, new), SWITCH_TIMEOUT_S, f"all answers from version {new}")
        switched_at = time.monotonic()
        after = traffic.wait_for(20, since=switched_at)
    answers = traffic.snapshot()
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the rollout: {failed[:3]}"
    versions_after = {a.version for a in after}
    assert versions_after == {new}, f"answers after the switch came from versions {versions_after}"
    assert {a.version for a in answers if a.done < published_at} == {old}
    print(f"rollout: {len(answers)} requests, switched in {switched_at - published_at:.1f} s, none failed")


def _copy_version(model_dir: Path, source: int, target: int) -> Path:
    # Deliberately not atomic: this is what a hand copy or a killed rsync leaves behind.
    path = model_dir / str(target)
    shutil.copytree(model_dir / str(source), path)
    return path


def test_corrupt_version_directories_are_never_served(embedded_gateway: EmbeddedDrillGateway) -> None:
    url, model_dir = embedded_gateway.url, embedded_gateway.model_dir
    good = served_version(url)
    assert good == highest_version(model_dir)

    truncated = _copy_version(model_dir, good, good + 1)
    graph = truncated / "saved_model.pb"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])  # a half-written graph
    no_variables = _copy_version(model_dir, good, good + 2)
    shutil.rmtree(no_variables / "variables")  # the graph landed, its weights did not
    (model_dir / str(good + 3)).mkdir()  # an empty directory: a copy that has only just started

    with Traffic(url, threads=3, fresh=True) as traffic:
        # Several poll intervals, long enough for each worker to try (and fail) loading each of them.
        time.sleep(max(20 * POLL_INTERVAL_S, 6.0))
        broken_window = traffic.snapshot()
        fixed = publish_next(embedded_gateway)
        wait_until(lambda: all_serving(traffic, fixed), SWITCH_TIMEOUT_S, f"all answers from version {fixed}")
    assert len(broken_window) >= 20
    wrong = [a for a in broken_window if a.status != 200 or a.version != good]
    assert not wrong, f"with broken versions present, answers not from good version {good}: {wrong[:3]}"
    assert fixed > good + 3, f"publish reused version {fixed}: it must number past every directory on disk"
    failed = [a for a in traffic.snapshot() if a.status != 200]
    assert not failed, f"requests failed while broken versions were present: {failed[:3]}"
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
