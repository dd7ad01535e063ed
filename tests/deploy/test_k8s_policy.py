"""Cluster policy, written as tests over the rendered manifests: what a reviewer (or an admission
controller such as the restricted Pod Security Standard) would otherwise have to check by eye."""

from __future__ import annotations

import re

import pytest

from tests.deploy import manifests

PINNED_TAG = re.compile(r"^[^@\s]+:(?!latest$)[\w][\w.-]*\d[\w.-]*$")  # a tag that holds a version number


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return manifests.render()


@pytest.fixture(scope="module")
def workloads(docs: list[dict]) -> list[dict]:
    found = [d for d in docs if d["kind"] in manifests.WORKLOAD_KINDS]
    assert len(found) >= 3
    return found


def _each_container(workloads: list[dict]):
    for doc in workloads:
        for container in manifests.containers(doc):
            yield f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}", doc, container


def test_images_are_pinned_to_a_version_tag(workloads: list[dict]) -> None:
    for where, _, container in _each_container(workloads):
        image = container["image"]
        assert PINNED_TAG.match(image) or "@sha256:" in image, f"{where}: image {image!r} is not pinned"


def test_pinned_tag_rule_rejects_latest_and_untagged() -> None:
    for bad in ("tensorflow/serving", "tensorflow/serving:latest", "ghcr.io/x/y:stable"):
        assert not PINNED_TAG.match(bad), bad
    assert PINNED_TAG.match("tensorflow/serving:2.21.0")


def test_every_container_has_resources_with_requests_equal_to_limits(workloads: list[dict]) -> None:
    # requests == limits gives the Guaranteed QoS class: never the first evicted, and TensorFlow's
    # thread pools see the CPUs they are sized for.
    for where, _, container in _each_container(workloads):
        resources = container.get("resources", {})
        requests, limits = resources.get("requests"), resources.get("limits")
        assert requests and limits, f"{where}: needs resources.requests and resources.limits"
        assert {"cpu", "memory"} <= set(limits), f"{where}: limits need cpu and memory"
        assert requests == limits, f"{where}: requests {requests} != limits {limits}"


def test_long_running_containers_have_liveness_and_readiness_probes(workloads: list[dict]) -> None:
    for where, doc, container in _each_container(workloads):
        if doc["kind"] == "Deployment":
            assert "livenessProbe" in container, f"{where}: no livenessProbe"
            assert "readinessProbe" in container, f"{where}: no readinessProbe"


def test_pods_run_non_root_with_a_read_only_root_and_no_privileges(workloads: list[dict]) -> None:
    for where, doc, container in _each_container(workloads):
        pod = manifests.pod_spec(doc)
        pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, f"{where}: needs a numeric non-zero runAsUser"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop [ALL]"
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccompProfile RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False, f"{where}: no API token is needed"


def test_read_only_roots_get_a_writable_tmp(workloads: list[dict]) -> None:
    for where, doc, container in _each_container(workloads):
        volumes = {v["name"]: v for v in manifests.pod_spec(doc).get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{where}: emptyDir on /tmp"


def test_every_mount_names_a_volume_and_every_claim_exists(docs: list[dict], workloads: list[dict]) -> None:
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for where, doc, container in _each_container(workloads):
        volumes = {v["name"]: v for v in manifests.pod_spec(doc).get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: mount {mount['name']} has no volume"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{where}: {volume}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{where}: {volume}"


def test_gateway_prometheus_multiproc_dir_is_a_writable_volume(docs: list[dict]) -> None:
    container = next(manifests.containers(manifests.find(docs, "Deployment", "gateway")))
    directory = manifests.env_of(container)["PROMETHEUS_MULTIPROC_DIR"]
    mounts = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert any(directory == p or directory.startswith(p.rstrip("/") + "/") for p in mounts), directory


def test_training_cronjob_is_safe_to_run_nightly_on_a_gpu(docs: list[dict]) -> None:
    cron = manifests.find(docs, "CronJob", "cifar10-train")
    spec, job = cron["spec"], cron["spec"]["jobTemplate"]["spec"]
    assert spec["schedule"].count(" ") == 4
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    pod = manifests.pod_spec(cron)
    (container,) = pod["containers"]
    assert container["resources"]["limits"].get("nvidia.com/gpu") in ("1", 1)
    assert pod["nodeSelector"], "GPU jobs must be pinned to GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    env = manifests.env_of(container, {"JOB_NAME": "cifar10-train-29412345"})
    assert env["MODEL_BASE"] in mounts, "exports must land on the shared model claim"
    assert any(env["RUN_DIR"].startswith(m + "/") for m in mounts), "checkpoints must live on a claim"
    # Retries of one Job resume the same run directory; the next night's Job starts a new one.
    assert env["RUN_DIR"] == "/runs/cifar10-train-29412345"


def test_quality_gate_rejection_fails_the_job_without_retrying(docs: list[dict]) -> None:
    from trainer.export import cli as export_cli
    cron = manifests.find(docs, "CronJob", "cifar10-train")
    rules = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    fail_job = [r for r in rules if r["action"] == "FailJob" and "onExitCodes" in r]
    assert fail_job and fail_job[0]["onExitCodes"]["values"] == [export_cli.EXIT_REJECTED]
    env = manifests.env_of(next(manifests.containers(cron)), {})
    assert float(env["EXPORT_MIN_ACCURACY"]) > 0.5, "the nightly publish must go through an accuracy floor"


def test_tfserving_threads_fit_its_cpu_limit(docs: list[dict]) -> None:
    container = next(manifests.containers(manifests.find(docs, "Deployment", "tfserving")))
    flags = dict(a.lstrip("-").split("=", 1) for a in container["args"])
    cpus = int(container["resources"]["limits"]["cpu"])
    assert int(flags["tensorflow_intra_op_parallelism"]) <= cpus
    assert int(flags["tensorflow_inter_op_parallelism"]) <= cpus
    required = ("enable_batching", "batching_parameters_file", "monitoring_config_file", "model_config_file")
    for flag in required:
        assert flag in flags, f"tfserving needs --{flag}"
    assert flags["port"] == "8500" and flags["rest_api_port"] == "8501"


def test_tfserving_config_flags_point_at_files_of_the_mounted_configmap(docs: list[dict]) -> None:
    deployment = manifests.find(docs, "Deployment", "tfserving")
    container = next(manifests.containers(deployment))
    volumes = {v["name"]: v for v in manifests.pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        if flag.endswith("_file"):
            directory, _, key = value.rpartition("/")
            assert "configMap" in mounts.get(directory, {}), f"{flag}: {directory} is not a ConfigMap mount"
            data = configmaps[mounts[directory]["configMap"]["name"]]["data"]
            assert key in data and data[key].strip(), f"{flag}: the ConfigMap has no {key}"


def test_services_and_budgets_select_real_pods_and_ports(docs: list[dict]) -> None:
    pods = [
        (manifests.pod_template(d)["metadata"]["labels"], manifests.pod_spec(d))
        for d in docs
        if d["kind"] == "Deployment"
    ]
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        else:
            continue
        matches = [spec for labels, spec in pods if selector.items() <= labels.items()]
        assert matches, f"{doc['kind']}/{doc['metadata']['name']} selects no Deployment's pods"
        if doc["kind"] == "Service":
            names = {p.get("name") for c in matches[0]["containers"] for p in c.get("ports", [])}
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in names, f"Service {doc['metadata']['name']}: {port['targetPort']}"


def test_gateway_autoscales_and_owns_no_fixed_replica_count(docs: list[dict]) -> None:
    hpa = manifests.find(docs, "HorizontalPodAutoscaler", "gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert manifests.find(docs, target["kind"], target["name"])
    assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in manifests.find(docs, "Deployment", "gateway")["spec"]


def test_prometheus_scrape_annotations_name_a_container_port(docs: list[dict]) -> None:
    scraped = 0
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        notes = manifests.pod_template(doc)["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", doc["metadata"]["name"]
        ports = {str(p["containerPort"]) for c in manifests.containers(doc) for p in c.get("ports", [])}
        assert notes["prometheus.io/port"] in ports and notes["prometheus.io/path"].startswith("/")
        scraped += 1
    assert scraped == 2


def test_network_is_default_deny_with_explicit_paths(docs: list[dict]) -> None:
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    tfs = policies["tfserving"]["ingress"]
    grpc_from = [r["from"] for r in tfs if {"protocol": "TCP", "port": 8500} in r["ports"]]
    assert grpc_from == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]]
    gw_egress = policies["gateway"]["egress"]
    assert [p["port"] for r in gw_egress for p in r["ports"]] == [8500]


def test_every_image_is_set_in_one_place_and_tagged_with_the_release(workloads: list[dict]) -> None:
    import tomllib

    import yaml

    kustomization = yaml.safe_load((manifests.K8S_DIR / "kustomization.yaml").read_text())
    pinned = {i["name"]: i["newTag"] for i in kustomization["images"]}
    version = tomllib.loads((manifests.ROOT / "pyproject.toml").read_text())["project"]["version"]
    compose_images = [s["image"] for s in manifests.compose()["services"].values()]
    for where, _, container in _each_container(workloads):
        name, _, tag = container["image"].partition(":")
        # `kustomize edit set image` on release rewrites only what kustomization.yaml lists.
        assert pinned.get(name) == tag, f"{where}: {name} is not pinned under images: in kustomization.yaml"
        if name.endswith(("/cifar10-trainer", "/cifar10-gateway")):
            assert tag == version, f"{where}: our images carry the project version {version}, not {tag}"
            assert f"{name.rsplit('/', 1)[1]}:{version}" in compose_images, f"compose.yaml: {name}:{version}"


def test_gateway_reads_the_model_claim_read_only_for_its_labels(docs: list[dict]) -> None:
    # labels.json (stable/canary) lives in the model base; without it the gateway could not tell TF
    # Serving which version_label a request goes to, and the newest loaded version would answer all.
    spec = manifests.pod_spec(manifests.find(docs, "Deployment", "gateway"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    gateway = next(c for c in spec["containers"] if c["name"] == "gateway")
    mount = next(m for m in gateway["volumeMounts"] if m["mountPath"] == "/models")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert mount.get("readOnly") is True and claim["claimName"] == "cifar10-models"
    assert claim.get("readOnly") is True
