"""Every command and flag the deployment files hand to the trainer and the gateway is accepted by the
real argument parsers and configuration code: a renamed flag or env var breaks this test, not a
nightly job on the cluster.

Trainer: scripts/train-entrypoint.sh is run for real with each environment the deployments give it
(Dockerfile.train ENV, compose.yaml, the k8s CronJob); a stand-in `python` records the argv the
script builds, and trainer.cli.build_parser() parses each one. Gateway: each environment
(Dockerfile.serve ENV, compose.yaml, the k8s Deployment) must use only variables that serving/config.py
or serving/gunicorn.conf.py read, and Settings.from_env must accept it; the image's gunicorn command
line goes through gunicorn's own parser.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import runpy
import subprocess
from pathlib import Path

import pytest

from tests.deploy import manifests

ROOT = manifests.ROOT

RECORDER = """#!/usr/bin/env bash
# Stand-in for python: append this call's argv as one JSON line, exit with FAKE_EXIT_<subcommand>.
printf '%s\\n' "$@" \\
  | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().splitlines()))' >> "$RECORD"
code_var="FAKE_EXIT_$3"
exit "${!code_var:-0}"
"""


def _trainer_cli():
    return importlib.import_module("trainer.cli")


def _serving_config():
    return importlib.import_module("serving.config")


# --- environments the deployment files give each program ---------------------------------------


def trainer_environments() -> dict[str, dict[str, str]]:
    image = manifests.dockerfile_env(ROOT / "Dockerfile.train")
    compose_env = {k: str(v) for k, v in manifests.compose()["services"]["trainer"]["environment"].items()}
    cron = manifests.find(manifests.render(), "CronJob", "cifar10-train")
    k8s_env = manifests.env_of(next(manifests.containers(cron)), {"JOB_NAME": "cifar10-train-29412345"})
    # The multi-node Job's chief (index 0) runs the entrypoint too (tests/deploy/test_k8s_training_jobs.py
    # checks that only the chief does, and that the other workers' training step matches its own).
    multinode_docs = manifests.render_dir(manifests.ON_DEMAND_DIRS[0])
    multinode = manifests.find(multinode_docs, "Job", "cifar10-train-multinode")
    chief_env = manifests.env_of(next(manifests.containers(multinode)),
                                 {"JOB_NAME": "cifar10-train-multinode", "JOB_COMPLETION_INDEX": "0"})
    return {
        "Dockerfile.train": image,
        "compose.yaml trainer": {**image, **compose_env},
        "k8s CronJob": {**image, **k8s_env},
        "k8s multi-node chief": {**image, **chief_env},
    }


def gateway_environments() -> dict[str, dict[str, str]]:
    image = manifests.dockerfile_env(ROOT / "Dockerfile.serve")
    compose_env = {k: str(v) for k, v in manifests.compose()["services"]["gateway"]["environment"].items()}
    deployment = manifests.find(manifests.render(), "Deployment", "gateway")
    k8s_env = manifests.env_of(next(manifests.containers(deployment)))
    return {
        "Dockerfile.serve": image,
        "compose.yaml gateway": {**image, **compose_env},
        "k8s gateway Deployment": {**image, **k8s_env},
    }


def run_entrypoint(env: dict[str, str], tmp_path: Path, **exits: int) -> tuple[int, list[list[str]], str]:
    """Run the entrypoint with `python` replaced by the recorder; returns exit code, calls, stderr."""
    fake = tmp_path / "fake-python"
    fake.write_text(RECORDER)
    fake.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    record.unlink(missing_ok=True)
    full_env = {
        "PATH": os.environ["PATH"], **env, "PYTHON": str(fake), "RECORD": str(record),
        **{f"FAKE_EXIT_{k}": str(v) for k, v in exits.items()},
    }  # fmt: skip
    command = ["bash", str(manifests.ENTRYPOINT)]
    proc = subprocess.run(command, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return proc.returncode, calls, proc.stderr


# --- trainer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", sorted(trainer_environments()))
def test_entrypoint_commands_parse_with_the_trainer_cli(where: str, tmp_path: Path) -> None:
    cli = _trainer_cli()
    env = trainer_environments()[where]
    code, calls, err = run_entrypoint(env, tmp_path)
    assert code == 0, err
    assert [c[:3] for c in calls] == [["-m", "trainer", s] for s in ("train", "evaluate", "export")]
    parser = cli.build_parser()
    train, evaluate, export = (parser.parse_args(c[2:]) for c in calls)

    assert train.resume is True, "the image must resume from checkpoints on the volume"
    assert str(train.run_dir) == str(evaluate.run_dir) == str(export.run_dir) == env["RUN_DIR"]
    assert train.dataset == env["TRAIN_DATASET"]
    assert str(export.model_base) == env["MODEL_BASE"] and export.model_name == env["MODEL_NAME"]
    if "EXPORT_MIN_ACCURACY" in env:
        assert export.min_accuracy == float(env["EXPORT_MIN_ACCURACY"])
    if "EXPORT_KEEP" in env:
        assert export.keep == int(env["EXPORT_KEEP"])

    # The profile and every --set override must also resolve to a valid config (unknown keys fail).
    config_file = ROOT / env["TRAIN_CONFIG"]
    assert config_file.is_file(), f"the deployment names {env['TRAIN_CONFIG']}, which does not exist"
    cwd = Path.cwd()
    os.chdir(ROOT)  # the image runs from the project root, where configs/ lives
    try:
        config = cli.resolve_config(train)
    finally:
        os.chdir(cwd)
    assert config.data.dataset == env["TRAIN_DATASET"]


def test_entrypoint_refuses_to_run_without_a_run_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in trainer_environments()["k8s CronJob"].items() if k != "RUN_DIR"}
    code, calls, err = run_entrypoint(env, tmp_path)
    assert code != 0 and calls == []
    assert "RUN_DIR" in err


def test_entrypoint_stops_at_the_first_failing_step(tmp_path: Path) -> None:
    env = trainer_environments()["k8s CronJob"]
    code, calls, _ = run_entrypoint(env, tmp_path, train=1)
    assert code == 1 and [c[2] for c in calls] == ["train"], "a failed training must never be exported"


def test_entrypoint_passes_on_the_quality_gate_exit_code(tmp_path: Path) -> None:
    export_cli = importlib.import_module("trainer.export.cli")
    env = trainer_environments()["k8s CronJob"]
    code, calls, _ = run_entrypoint(env, tmp_path, export=export_cli.EXIT_REJECTED)
    # The CronJob's podFailurePolicy keys on this code to fail the Job without retries.
    assert code == export_cli.EXIT_REJECTED and len(calls) == 3


def test_entrypoint_splits_train_set_into_separate_overrides(tmp_path: Path) -> None:
    cli = _trainer_cli()
    env = {**trainer_environments()["Dockerfile.train"], "TRAIN_SET": "optim.lr=0.05  train.seed=3",
           "TRAIN_EPOCHS": "2", "TRAIN_DATA_DIR": "/data/cifar"}  # fmt: skip
    _, calls, _ = run_entrypoint(env, tmp_path)
    train = cli.build_parser().parse_args(calls[0][2:])
    assert train.overrides == ["optim.lr=0.05", "train.seed=3"]
    assert train.epochs == 2 and train.data_dir == "/data/cifar"


# --- gateway -------------------------------------------------------------------------------------


def _known_gateway_variables() -> set[str]:
    names: set[str] = set()
    for source in ("serving/config.py", "serving/gunicorn.conf.py"):
        path = ROOT / source
        if path.is_file():
            names |= set(re.findall(r"GATEWAY_[A-Z0-9_]+", path.read_text()))
    return names


@pytest.mark.parametrize("where", sorted(gateway_environments()))
def test_gateway_environment_is_understood_by_serving_config(where: str) -> None:
    config = _serving_config()
    env = gateway_environments()[where]
    unknown = {k for k in env if k.startswith("GATEWAY_")} - _known_gateway_variables()
    assert not unknown, f"{where} sets {sorted(unknown)}: not read by serving/config.py or gunicorn.conf.py"
    settings = config.Settings.from_env(env)
    assert settings.model_name == env["GATEWAY_MODEL_NAME"]
    if env.get("GATEWAY_TFSERVING_ADDRESS"):
        assert settings.tfserving_address == env["GATEWAY_TFSERVING_ADDRESS"]
        assert settings.backend_kind == "tfserving"
    if "GATEWAY_MAX_IMAGES" in env:
        assert settings.max_images == int(env["GATEWAY_MAX_IMAGES"])


@pytest.mark.parametrize("where", sorted(gateway_environments()))
def test_gunicorn_config_binds_where_probes_and_services_look(where: str, monkeypatch) -> None:
    conf = ROOT / "serving" / "gunicorn.conf.py"
    assert conf.is_file(), "the deployment runs gunicorn -c serving/gunicorn.conf.py, which does not exist"
    env = gateway_environments()[where]
    for key in list(os.environ):
        if key.startswith("GATEWAY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = runpy.run_path(str(conf))
    assert settings["bind"] == env["GATEWAY_BIND"]
    port = int(settings["bind"].rsplit(":", 1)[1])
    # The API port is the one nginx's upstream names (deploy/nginx/nginx.conf, `server gateway:PORT;`).
    upstream = re.search(r"server gateway:(\d+);", (ROOT / "deploy" / "nginx" / "nginx.conf").read_text())
    assert upstream and int(upstream.group(1)) == port, f"nginx's upstream is not the gateway's port {port}"
    # Probes, the image's HEALTHCHECK and Prometheus come from outside the container: admin port on all.
    admin = env["GATEWAY_ADMIN_BIND"]
    assert admin.startswith("0.0.0.0:"), "in a container the admin port must listen on all addresses"
    if where.startswith("k8s"):
        # nginx is a sidecar: the API listens on the pod's loopback, where nothing else reaches it.
        assert settings["bind"].startswith("127.0.0.1:"), "only the nginx sidecar may reach the API"
        container = next(manifests.containers(manifests.find(manifests.render(), "Deployment", "gateway")))
        assert [p["containerPort"] for p in container["ports"]] == [int(admin.rsplit(":", 1)[1])]
    else:
        # nginx is a container of its own: the API listens on all addresses (compose does not publish it).
        assert settings["bind"].startswith("0.0.0.0:"), "nginx in another container must reach the API"


def test_gateway_image_command_parses_with_gunicorn() -> None:
    from gunicorn.config import Config

    instructions = manifests.dockerfile_instructions(ROOT / "Dockerfile.serve")
    (cmd,) = [i for i in instructions if i.keyword == "CMD"]
    argv = manifests.exec_form(cmd)
    assert argv[0] == "gunicorn"
    parsed = Config().parser().parse_args(argv[1:])
    # The -c file is the project's serving/gunicorn.conf.py, copied into the image.
    local = [i for i in instructions if i.keyword == "COPY" and "--from" not in i.args]
    copies = [manifests.copy_sources(i) for i in local]
    assert (["serving/gunicorn.conf.py"], parsed.config) in copies
    (app_spec,) = parsed.args
    module_name, _, factory = app_spec.partition(":")
    assert factory.endswith("()"), "the app is built by the factory in each worker"
    # Read, not imported: importing the app here would fix prometheus' multiprocess mode and load
    # TensorFlow inside this test process, side effects that belong to the gateway's own tests.
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin is not None, f"the deployment serves {module_name}: missing"
    tree = ast.parse(Path(spec.origin).read_text())
    factories = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert factory[:-2] in factories, f"{module_name} defines no top-level {factory[:-2]}()"


def test_deployments_run_the_image_commands_checked_here() -> None:
    """compose and k8s start the images' own ENTRYPOINT/CMD (parsed above); an override added there
    would bypass these checks, so it must come with its own parser test."""
    services = manifests.compose()["services"]
    for name in ("gateway", "trainer"):
        assert not {"command", "entrypoint"} & set(services[name]), f"compose.yaml {name} overrides its image"
    docs = manifests.render()
    for kind, name in (("Deployment", "gateway"), ("CronJob", "cifar10-train")):
        for container in manifests.containers(manifests.find(docs, kind, name)):
            if container["name"] == "nginx":
                continue  # the proxy sidecar: its command is checked by tests/deploy/test_nginx.py
            assert not {"command", "args"} & set(container), f"{kind}/{name} overrides its image's command"
