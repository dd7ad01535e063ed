"""The KServe variant (deploy/kserve/ = k8s/ + the component k8s/kserve/), checked offline: it renders
with kustomize, every core object passes the strict Kubernetes schema, the InferenceService passes
KServe's own API types (tests/deploy/kserve_schema.py, strict: a misspelt field fails), and it is
wired the way the plain path is: the same claim and directory, the same TF Serving, the gateway
pointed at the predictor's gRPC port, a pinned version so canaryTrafficPercent splits two versions,
a restricted pod and default-deny networking."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from tests.deploy import kserve_schema, manifests

OVERLAY = manifests.ROOT / "deploy" / "kserve"
COMPONENT = manifests.K8S_DIR / "kserve"
# KServe's kserve-tensorflow-serving runtime (config/runtimes in KServe) starts tensorflow_model_server
# with --port=9000 (gRPC) --rest_api_port=8080 --model_base_path=/mnt/models: fixed by the runtime,
# so the manifests can only agree with them.
RUNTIME = "kserve-tensorflow-serving"
RUNTIME_GRPC_PORT = 9000
RUNTIME_REST_PORT = 8080
KSERVE_MOUNT = "/mnt/models"

pytestmark = manifests.needs_kubectl("the KServe variant")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return manifests.render_with_kubectl(OVERLAY)


@pytest.fixture(scope="module")
def plain() -> list[dict]:
    return manifests.render()


@pytest.fixture(scope="module")
def isvc(docs: list[dict]) -> dict:
    return manifests.find(docs, "InferenceService", "cifar10")


def _predictor(isvc: dict) -> dict:
    return isvc["spec"]["predictor"]


def _model(isvc: dict) -> dict:
    return isvc["spec"]["predictor"]["model"]


def _tfserving_config(docs: list[dict], name: str) -> dict:
    return manifests.find(docs, "ConfigMap", name)


def _parse_models_config(text: str):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def _config_map_of(isvc: dict) -> str:
    """The name of the ConfigMap the predictor mounts at /config."""
    volumes = {v["name"]: v for v in _predictor(isvc)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _model(isvc)["volumeMounts"]}
    return volumes[mounts["/config"]]["configMap"]["name"]


def _gateway_env(docs: list[dict]) -> dict[str, str]:
    return manifests.env_of(manifests.container(docs, "gateway", "gateway"))


# --- rendering and schemas -------------------------------------------------------------------------


def test_the_overlay_replaces_tfserving_by_an_inference_service(docs: list[dict]) -> None:
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"):
        assert (kind, "tfserving") not in present, f"{kind}/tfserving is the plain path's: remove it here"
    expected = {
        ("InferenceService", "cifar10"),
        ("Deployment", "gateway"),
        ("CronJob", "cifar10-train"),
        ("PersistentVolumeClaim", "cifar10-models"),
        ("NetworkPolicy", "default-deny"),
        ("NetworkPolicy", "cifar10-predictor"),
    }
    assert expected <= present, sorted(expected - present)
    for doc in docs:
        if doc["kind"] not in manifests.CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == "cifar10", f"{doc['kind']}/{doc['metadata']['name']}"


def test_core_objects_pass_the_strict_kubernetes_schema(docs: list[dict]) -> None:
    problems = []
    for doc in docs:
        if doc["kind"] == "InferenceService":
            continue  # not a Kubernetes type: the next test checks it against KServe's
        try:
            kubernetes_validate.validate(doc, manifests.KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(
                f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
            )
    assert not problems, "\n".join(problems)


def test_inference_service_fields_are_kserve_api_types(isvc: dict) -> None:
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    errors = kserve_schema.errors(isvc)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("where", "change", "expected"),
    [
        (
            "a misspelt KServe field",
            lambda s: s["predictor"].update(canaryTrafficPrecent=10),
            "canaryTrafficPrecent",
        ),
        (
            "storageUri in the wrong case",
            lambda s: s["predictor"]["model"].update(storageURI="pvc://x/y"),
            "storageURI",
        ),
        (
            "a misspelt container field",
            lambda s: s["predictor"]["model"].update(readinesProbe={}),
            "readinesProbe",
        ),
        (
            "a misspelt field in a Kubernetes type",
            lambda s: s["predictor"]["model"]["resources"].update(limts={}),
            "limts",
        ),
        ("a number as text", lambda s: s["predictor"].update(minReplicas="2"), "minReplicas"),
        (
            "a model format name that is not text",
            lambda s: s["predictor"]["model"]["modelFormat"].update(name=7),
            "7",
        ),
        (
            "a field of another component",
            lambda s: s.update(explainer={"art": {"name": "x", "type": "SquareAttack", "typo": 1}}),
            "typo",
        ),
        (
            "a required field left out",
            lambda s: s.update(explainer={"art": {"name": "x"}}),
            "'type' is a required property",
        ),
    ],
)
def test_the_kserve_validator_rejects(isvc: dict, where: str, change, expected: str) -> None:
    # Proof that the validator can fail: each change alone gives exactly one error, naming the field.
    broken = copy.deepcopy(isvc)
    change(broken["spec"])
    errors = kserve_schema.errors(broken)
    assert len(errors) == 1 and expected in errors[0], f"{where}: {errors}"


def test_the_vendored_schema_knows_the_fields_this_deployment_relies_on() -> None:
    schema = json.loads(kserve_schema.SCHEMA_FILE.read_text())
    defs = schema["$defs"]
    assert defs["V1beta1PredictorSpec"]["properties"]["canaryTrafficPercent"] == {"type": "integer"}
    model = defs["V1beta1ModelSpec"]["properties"]
    assert {"modelFormat", "runtime", "protocolVersion", "storageUri", "args", "ports", "image"} <= set(model)
    assert schema["x-kubernetes-schema"] == f"v{manifests.KUBERNETES_VERSION}-local-strict"
    assert (kserve_schema.SCHEMA_FILE.with_suffix(".NOTICE")).is_file(), "the schema's licence notice"


@pytest.mark.skipif(
    not os.environ.get("KSERVE_WHEEL"), reason="set KSERVE_WHEEL to a kserve wheel to rebuild"
)
def test_the_vendored_schema_is_what_the_wheel_gives() -> None:
    rebuilt = kserve_schema.build(Path(os.environ["KSERVE_WHEEL"]))
    assert rebuilt == json.loads(kserve_schema.SCHEMA_FILE.read_text())


# --- canary ----------------------------------------------------------------------------------------


def test_canary_traffic_percent_is_set_in_serverless_mode(isvc: dict) -> None:
    percent = _predictor(isvc).get("canaryTrafficPercent")
    assert isinstance(percent, int) and 0 < percent < 100, (
        f"canaryTrafficPercent {percent!r}: 1..99 for a canary"
    )
    # KServe splits revisions only with Knative (Serverless); in RawDeployment the field does nothing.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"


def test_each_revision_pins_one_version_so_the_split_compares_two(docs: list[dict], isvc: dict) -> None:
    config_map = _config_map_of(isvc)
    # kustomize put the generated (hashed) name in the InferenceService (kustomizeconfig.yaml): a new
    # pin changes the spec, which is what makes KServe start a new revision.
    assert re.fullmatch(r"tfserving-config-[a-z0-9]{10}", config_map), config_map
    data = _tfserving_config(docs, config_map)["data"]
    flags = dict(a.lstrip("-").split("=", 1) for a in _model(isvc)["args"])
    assert flags["model_config_file"] == "/config/models.config"
    for flag, value in flags.items():
        if flag.endswith("_file"):
            assert value.startswith("/config/") and value.removeprefix("/config/") in data, f"--{flag}"
    (entry,) = _parse_models_config(data["models.config"]).model_config_list.config
    assert entry.name == isvc["metadata"]["name"] == _gateway_env(docs)["GATEWAY_MODEL_NAME"]
    assert entry.base_path == KSERVE_MOUNT
    policy = entry.model_version_policy
    assert policy.WhichOneof("policy_choice") == "specific" and len(policy.specific.versions) == 1
    # No model_config_file poll: a revision's version never changes under it.
    assert "model_config_file_poll_wait_seconds" not in flags


def test_the_trainer_keeps_the_pinned_version(docs: list[dict], isvc: dict, tmp_path: Path) -> None:
    from trainer.export import retention

    cron = manifests.find(docs, "CronJob", "cifar10-train")
    env = manifests.env_of(next(manifests.containers(cron)), {})
    volumes = {v["name"]: v for v in manifests.pod_spec(cron)["volumes"]}
    mount = next(m for m in next(manifests.containers(cron))["volumeMounts"] if m["mountPath"] == "/config")
    config_map = volumes[mount["name"]]["configMap"]["name"]
    assert config_map == _config_map_of(isvc), "retention must read the models.config the predictor serves"
    path = tmp_path / "models.config"
    path.write_text(_tfserving_config(docs, config_map)["data"]["models.config"])
    assert env["EXPORT_SERVING_CONFIG"] == "/config/models.config"
    policies = retention.read_serving_config(path, env["MODEL_NAME"])
    (pinned,) = (
        _parse_models_config(path.read_text())
        .model_config_list.config[0]
        .model_version_policy.specific.versions
    )
    published = sorted({pinned, *range(pinned + 1, pinned + 10)}, reverse=True)
    kept = retention.protected_versions(published, int(env["EXPORT_KEEP"]), policies)
    assert pinned in kept and any("pinned" in why for why in kept[pinned]), kept


# --- the same storage and server as the plain path -------------------------------------------------


def test_storage_is_the_claim_and_directory_the_plain_path_serves(plain: list[dict], isvc: dict) -> None:
    tfserving = manifests.find(plain, "Deployment", "tfserving")
    container = next(manifests.containers(tfserving))
    volumes = {v["name"]: v for v in manifests.pod_spec(tfserving)["volumes"]}
    mount = next(m for m in container["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]])
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    config = next(
        d for d in plain if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tfserving-config")
    )
    (entry,) = _parse_models_config(config["data"]["models.config"]).model_config_list.config
    directory = PurePosixPath(entry.base_path).relative_to(mount["mountPath"])
    assert _model(isvc)["storageUri"] == f"pvc://{claim}/{directory}"
    # ... which is where the trainer publishes: MODEL_BASE/MODEL_NAME on the same claim.
    cron = manifests.find(plain, "CronJob", "cifar10-train")
    env = manifests.env_of(next(manifests.containers(cron)), {"JOB_NAME": "j"})
    cron_volumes = {v["name"]: v for v in manifests.pod_spec(cron)["volumes"]}
    cron_mount = next(
        m for m in next(manifests.containers(cron))["volumeMounts"] if m["mountPath"] == env["MODEL_BASE"]
    )
    assert cron_volumes[cron_mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert env["MODEL_NAME"] == str(directory)


def test_the_predictor_is_the_plain_paths_tf_serving(plain: list[dict], isvc: dict) -> None:
    model = _model(isvc)
    assert model["modelFormat"]["name"] == "tensorflow" and model["runtime"] == RUNTIME
    kustomization = yaml.safe_load((manifests.K8S_DIR / "kustomization.yaml").read_text())
    tag = {i["name"]: i["newTag"] for i in kustomization["images"]}["tensorflow/serving"]
    assert model["image"] == f"tensorflow/serving:{tag}", "pin the TF Serving of k8s/kustomization.yaml"
    plain_args = next(manifests.containers(manifests.find(plain, "Deployment", "tfserving")))["args"]
    shared = {
        "enable_batching", "batching_parameters_file", "monitoring_config_file",
        "file_system_poll_wait_seconds", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism",
    }  # fmt: skip
    plain_flags = {k: v for k, v in (a.lstrip("-").split("=", 1) for a in plain_args) if k in shared}
    flags = {k: v for k, v in (a.lstrip("-").split("=", 1) for a in model["args"]) if k in shared}
    assert flags == plain_flags
    assert int(flags["tensorflow_intra_op_parallelism"]) <= int(model["resources"]["limits"]["cpu"])


# --- the gateway talks to the predictor ------------------------------------------------------------


def test_the_gateway_points_at_the_predictors_grpc_port(docs: list[dict], isvc: dict) -> None:
    from serving import config

    env = _gateway_env(docs)
    name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    # KServe >= 0.9 names the predictor's Knative Service <name>-predictor; Knative serves it on port 80
    # of the cluster-local gateway and forwards to the revision's one port, here gRPC.
    assert env["GATEWAY_TFSERVING_ADDRESS"] == f"{name}-predictor.{namespace}.svc.cluster.local:80"
    (port,) = _model(isvc)["ports"]
    assert port == {"name": "h2c", "containerPort": RUNTIME_GRPC_PORT, "protocol": "TCP"}
    assert _model(isvc)["protocolVersion"] == "grpc-v1"
    settings = config.Settings.from_env(env)
    assert (
        settings.backend_kind == "tfserving"
        and settings.tfserving_address == env["GATEWAY_TFSERVING_ADDRESS"]
    )
    assert settings.model_name == name


def test_only_kserve_splits_traffic(docs: list[dict], isvc: dict) -> None:
    # The gateway's own canary reads MODEL_BASE/<name>/labels.json and asks TF Serving for a version
    # label; here each revision loads one version without labels, so the gateway must not see a
    # labels.json: its pod mounts no claim (docs/deploy.md, "One split at a time").
    gateway = manifests.find(docs, "Deployment", "gateway")
    claims = [v for v in manifests.pod_spec(gateway)["volumes"] if "persistentVolumeClaim" in v]
    assert not claims, f"the gateway mounts {claims}: it could read labels.json and split a second time"
    data = _tfserving_config(docs, _config_map_of(isvc))["data"]["models.config"]
    (entry,) = _parse_models_config(data).model_config_list.config
    assert not entry.version_labels, "a revision serves one version: no stable/canary labels to split by"


def test_the_predictor_is_ready_only_with_an_available_version(isvc: dict) -> None:
    from tests.deploy.test_tfserving_probe import ANSWERS, PASSES, _Server

    command = _model(isvc)["readinessProbe"]["exec"]["command"]
    target = f"/dev/tcp/127.0.0.1/{RUNTIME_REST_PORT}"
    assert command[:2] == ["/bin/bash", "-c"] and target in command[2]
    server = _Server()
    try:
        for state, answer in ANSWERS.items():
            server.answer = answer
            script = command[2].replace(target, f"/dev/tcp/127.0.0.1/{server.port}")
            code = subprocess.run(["bash", "-c", script], capture_output=True, timeout=10).returncode
            assert (code == 0) == (state in PASSES), f"exit {code} for {state}"
        assert set(server.paths) == {f"/v1/models/{isvc['metadata']['name']}"}
    finally:
        server.httpd.shutdown()
    assert _model(isvc)["livenessProbe"]["tcpSocket"]["port"] == RUNTIME_GRPC_PORT


# --- a restricted pod, default-deny networking -----------------------------------------------------


def test_the_predictor_runs_restricted_with_guaranteed_resources(isvc: dict) -> None:
    predictor, model = _predictor(isvc), _model(isvc)
    sc = model["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert predictor["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in predictor["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in model["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on a read-only root"
    assert model["resources"]["requests"] == model["resources"]["limits"]
    assert predictor["minReplicas"] >= 2, "no scale to zero, two replicas like k8s/tfserving.yaml"
    notes = predictor["annotations"]
    assert notes["prometheus.io/port"] == str(RUNTIME_REST_PORT) and notes["prometheus.io/path"].startswith(
        "/"
    )


def test_network_paths_go_through_knative_only(docs: list[dict], isvc: dict) -> None:
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies["default-deny"]["policyTypes"]) == {"Ingress", "Egress"}
    (egress,) = policies["gateway"]["egress"]
    assert [p["port"] for p in egress["ports"]] == [8081], "the gateway reaches only Knative's local gateway"
    predictor = policies["cifar10-predictor"]
    assert predictor["podSelector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]
    }
    assert predictor["egress"] == [] and set(predictor["policyTypes"]) == {"Ingress", "Egress"}
    ports_from: dict[int, set[str]] = {}
    for rule in predictor["ingress"]:
        (source,) = rule["from"]
        selector = source["namespaceSelector"]
        names = set(selector.get("matchLabels", {}).values())
        for expression in selector.get("matchExpressions", []):
            names |= set(expression["values"])
        for port in rule["ports"]:
            ports_from.setdefault(port["port"], set()).update(names)
    # Requests reach the queue-proxy (8012) from Knative only; TF Serving's REST port, which would
    # take predictions past the gateway, is open to Prometheus only.
    assert "monitoring" not in ports_from[8012] and ports_from[RUNTIME_REST_PORT] == {"monitoring"}
    assert RUNTIME_GRPC_PORT not in ports_from, (
        "gRPC goes through the queue-proxy, not straight to TF Serving"
    )
