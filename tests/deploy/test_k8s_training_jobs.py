"""Policy of the on-demand training Jobs (k8s/training-multinode/, k8s/training-sweep/), over the
rendered manifests: the worker count agrees with TRAIN_NUM_PROCESSES, the coordinator address reaches
worker 0 through the headless Service, only the chief writes the shared claims, worker-to-worker
traffic is allowed only inside the Job, and the pods are as restricted as the nightly CronJob's."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.deploy import manifests
from tests.deploy import test_k8s_policy as policy  # as a module: its tests are not collected twice
from trainer.cli import build_parser

MULTINODE, SWEEP = manifests.ON_DEMAND_DIRS
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


@pytest.fixture(scope="module")
def main_docs() -> list[dict]:
    return manifests.render()


@pytest.fixture(scope="module")
def multinode() -> list[dict]:
    return manifests.render_dir(MULTINODE)


@pytest.fixture(scope="module")
def sweep_docs() -> list[dict]:
    return manifests.render_dir(SWEEP)


def _job(docs: list[dict]) -> dict:
    (job,) = [d for d in docs if d["kind"] == "Job"]
    return job


def _container(job: dict) -> dict:
    (container,) = manifests.pod_spec(job)["containers"]
    return container


def _pod_labels(job: dict, index: int = 0) -> dict[str, str]:
    """The labels a pod of `job` carries: its template's plus those the Job controller adds."""
    labels = dict(manifests.pod_template(job)["metadata"].get("labels", {}))
    labels[JOB_NAME_LABEL] = job["metadata"]["name"]
    labels["batch.kubernetes.io/job-completion-index"] = str(index)
    return labels


def _env(job: dict, index: int) -> dict[str, str]:
    """The container's environment in pod `index`, the downward-API values filled in as the kubelet does."""
    container = _container(job)
    refs = {}
    for item in container.get("env", []):
        path = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        if path == f"metadata.labels['{JOB_NAME_LABEL}']":
            refs[item["name"]] = job["metadata"]["name"]
        elif path == f"metadata.annotations['{INDEX_ANNOTATION}']":
            refs[item["name"]] = str(index)
    return manifests.env_of(container, refs)


def _claim_mounts(job: dict, *, writable: bool | None = None) -> dict[str, str]:
    """mountPath -> claim name, for the container's mounts of persistent volume claims (only the
    writable or only the read-only ones when `writable` says so)."""
    volumes = {v["name"]: v for v in manifests.pod_spec(job)["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
        for m in _container(job)["volumeMounts"]
        if "persistentVolumeClaim" in volumes[m["name"]]
        and (writable is None or writable != bool(m.get("readOnly")))
    }


def _relative(path: str, mounts: dict[str, str]) -> tuple[str, str]:
    """(claim, path inside the claim) of `path`, which must lie on one of `mounts`."""
    mount = next((m for m in mounts if _on(path, m)), None)
    assert mount is not None, f"{path} is on none of {sorted(mounts)}"
    return mounts[mount], str(PurePosixPath(path).relative_to(mount))


def _on(path: str, mount: str) -> bool:
    return PurePosixPath(path).is_relative_to(mount)


# --- the multi-node Job ----------------------------------------------------------------------------


def test_worker_count_is_one_number(multinode: list[dict]) -> None:
    job = _job(multinode)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed", "pod i needs its index and a stable hostname <job>-<i>"
    processes = int(_env(job, 0)["TRAIN_NUM_PROCESSES"])
    assert processes >= 2
    assert spec["completions"] == spec["parallelism"] == processes, (
        "every worker must run at once and the trainer must wait for exactly that many: "
        f"completions {spec['completions']}, parallelism {spec['parallelism']}, "
        f"TRAIN_NUM_PROCESSES {processes}"
    )


def test_index_comes_from_the_downward_api(multinode: list[dict], sweep_docs: list[dict]) -> None:
    for job in (_job(multinode), _job(sweep_docs)):
        refs = {
            item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"]
            for item in _container(job)["env"]
            if "valueFrom" in item
        }
        assert refs["JOB_COMPLETION_INDEX"] == f"metadata.annotations['{INDEX_ANNOTATION}']"
        assert _env(job, 3)["JOB_COMPLETION_INDEX"] == "3"


def test_coordinator_address_reaches_worker_0_through_the_headless_service(multinode: list[dict]) -> None:
    job = _job(multinode)
    pod = manifests.pod_spec(job)
    service = manifests.find(multinode, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None", "pod DNS records come from a headless Service"
    assert service["spec"]["selector"].items() <= _pod_labels(job).items(), "the Service selects no worker"
    host, _, port = _env(job, 1)["TRAIN_COORDINATOR"].rpartition(":")
    # Pod i of an Indexed Job has the hostname <job>-<i>; with the subdomain it is <job>-<i>.<service>.
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    ports = {p["name"]: p["containerPort"] for p in _container(job)["ports"]}
    assert int(port) == ports["coordinator"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == int(port) and service_port["targetPort"] == "coordinator"
    assert service["spec"].get("publishNotReadyAddresses") is True


def test_the_trainer_reads_each_pod_as_its_process_of_one_cluster(
    multinode: list[dict], sweep_docs: list[dict]
) -> None:
    from trainer import distribute

    job = _job(multinode)
    service = manifests.pod_spec(job)["subdomain"]
    netpol = manifests.find(multinode, "NetworkPolicy", job["metadata"]["name"])["spec"]
    open_ports = [(p["port"], p.get("endPort", p["port"])) for r in netpol["ingress"] for p in r["ports"]]
    count = job["spec"]["completions"]
    for index in range(count):
        cluster = distribute.cluster_from_env(_env(job, index))
        assert (cluster.process_id, cluster.num_processes) == (index, count)
        assert cluster.is_chief == (index == 0)
        # Every process dials the coordinator: pod 0's DNS name through the headless Service, on a
        # port the NetworkPolicy opens between the workers.
        assert cluster.coordinator is not None
        host, port = cluster.coordinator.rsplit(":", 1)
        assert host == f"{job['metadata']['name']}-0.{service}"
        assert any(lo <= int(port) <= hi for lo, hi in open_ports), cluster.coordinator
    # The sweep's pods are independent runs: its JOB_COMPLETION_INDEX is not a process id.
    assert distribute.cluster_from_env(_env(_job(sweep_docs), 3)).num_processes == 1


def test_a_lost_worker_fails_the_gang(multinode: list[dict]) -> None:
    spec = _job(multinode)["spec"]
    # A replacement pod could not rejoin collectives the others are blocked in: fail, do not retry one.
    assert spec["backoffLimit"] == 0
    assert not [r for r in spec.get("podFailurePolicy", {}).get("rules", []) if r["action"] != "FailJob"]
    assert manifests.pod_spec(_job(multinode))["restartPolicy"] == "Never"
    # The chief's success (trained, evaluated, published) ends the Job.
    assert spec["successPolicy"]["rules"] == [{"succeededIndexes": "0"}]


RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
"""


def _run_pod_command(job: dict, index: int, tmp_path: Path) -> list[tuple[list[str], dict[str, str]]]:
    """Run the container's command as pod `index` would, with the image's entrypoint replaced by the
    repository's scripts/train-entrypoint.sh and the trainer by a recorder of its arguments and
    environment: what each worker is told to run and where, without training."""
    recorder = tmp_path / f"trainer-{index}"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(recorder.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / f"calls-{index}.jsonl"
    command = list(_container(job)["command"])
    script = command[-1].replace("/usr/local/bin/train-entrypoint.sh", shlex.quote(str(manifests.ENTRYPOINT)))
    env = {"PATH": os.environ["PATH"], **_env(job, index), "PYTHON": str(recorder), "RECORD": str(record)}
    out = subprocess.run([*command[:-1], script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert all(c["argv"][:2] == ["-m", "trainer"] for c in calls), calls
    return [(c["argv"][2:], c["env"]) for c in calls]


def _flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_only_the_chief_writes_the_shared_claims(multinode: list[dict], tmp_path: Path) -> None:
    job = _job(multinode)
    writable, read_only = _claim_mounts(job, writable=True), _claim_mounts(job, writable=False)
    assert set(writable.values()) == {"cifar10-runs-multinode", "cifar10-models"}

    chief = _run_pod_command(job, 0, tmp_path)
    assert [argv[0] for argv, _ in chief] == ["train", "evaluate", "export"], chief
    (train, chief_env), _, (export, _) = chief
    chief_run = _relative(_flag(train, "--run-dir"), writable)
    assert chief_run[0] == "cifar10-runs-multinode"
    assert _relative(_flag(export, "--model-base"), writable)[0] == "cifar10-models"

    for index in sorted({1, int(chief_env["TRAIN_NUM_PROCESSES"]) - 1}):
        worker = _run_pod_command(job, index, tmp_path)
        assert [argv[0] for argv, _ in worker] == ["train"], f"worker {index} must only train: {worker}"
        ((worker_train, worker_env),) = worker
        run_dir = _flag(worker_train, "--run-dir")
        # The chief's run directory (a worker resumes from the chief's checkpoint), read-only.
        assert not any(_on(run_dir, m) for m in writable), f"worker {index} may write {run_dir}"
        assert _relative(run_dir, read_only) == chief_run, f"worker {index} reads another run: {run_dir}"
        # The same training as the chief's, only the run directory differs.
        assert worker_train[: worker_train.index("--run-dir")] == train[: train.index("--run-dir")]
        assert worker_train[worker_train.index("--run-dir") + 2 :] == train[train.index("--run-dir") + 2 :]
        assert build_parser().parse_args(worker_train).command == "train"
        # Nothing the trainer sees on a worker names a writable claim's path (RUN_DIR, MODEL_BASE...).
        on_claims = [k for k, v in worker_env.items() if any(_on(p, m) for p in v.split() for m in writable)]
        assert not on_claims, f"worker {index}: {on_claims}"
        assert worker_env["RUN_DIR"] == run_dir


def test_claims_shared_across_nodes_are_read_write_many(
    main_docs: list[dict], multinode: list[dict], sweep_docs: list[dict]
) -> None:
    # Pods of one Job land on different nodes and all mount the same claims (one pod template).
    claims = {d["metadata"]["name"]: d for d in main_docs + multinode + sweep_docs
              if d["kind"] == "PersistentVolumeClaim"}  # fmt: skip
    for job in (_job(multinode), _job(sweep_docs)):
        for path, name in _claim_mounts(job).items():
            assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"], f"{path}: {name}"


# --- the network ------------------------------------------------------------------------------


def _all_pods(main_docs: list[dict], multinode: list[dict], sweep_docs: list[dict]) -> dict[str, dict]:
    pods = {}
    for doc in main_docs + multinode + sweep_docs:
        if doc["kind"] in manifests.WORKLOAD_KINDS:
            template = manifests.pod_template(doc)
            labels = dict(template["metadata"].get("labels", {}))
            if doc["kind"] == "Job":
                labels = _pod_labels(doc)
            pods[f"{doc['kind']}/{doc['metadata']['name']}"] = labels
    return pods


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is understood here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_worker_traffic_is_allowed_only_inside_the_job(
    main_docs: list[dict], multinode: list[dict], sweep_docs: list[dict]
) -> None:
    job = _job(multinode)
    netpol = manifests.find(multinode, "NetworkPolicy", job["metadata"]["name"])["spec"]
    pods = _all_pods(main_docs, multinode, sweep_docs)
    selected = [name for name, labels in pods.items() if _selects(netpol["podSelector"], labels)]
    assert selected == [f"Job/{job['metadata']['name']}"], f"must select the Job's pods only: {selected}"
    assert set(netpol["policyTypes"]) == {"Ingress", "Egress"}

    coordinator_port = int(_env(job, 1)["TRAIN_COORDINATOR"].rpartition(":")[2])
    container_ports = {p["containerPort"] for p in _container(job)["ports"]}
    for direction, peer_key in (("ingress", "from"), ("egress", "to")):
        peer_rules = [r for r in netpol[direction] if peer_key in r]
        for rule in peer_rules:
            for peer in rule[peer_key]:
                # A pod selector alone means "pods of this namespace"; nothing from other namespaces
                # or address blocks, and it must pick exactly this Job's pods.
                assert set(peer) == {"podSelector"}, f"{direction}: {peer}"
                matches = [n for n, labels in pods.items() if _selects(peer["podSelector"], labels)]
                assert matches == [f"Job/{job['metadata']['name']}"], f"{direction} peers: {matches}"
            ports = {p["port"] for p in rule["ports"]}
            assert coordinator_port in ports, f"{direction}: coordinator port {coordinator_port} closed"
            assert container_ports <= ports
        assert peer_rules, f"no {direction} rule between the workers"
    # Every ingress rule names its peers: nothing outside the Job may connect.
    assert all("from" in r for r in netpol["ingress"])
    # Peer-less egress is HTTPS only (the CIFAR-10 download).
    open_egress = [p for r in netpol["egress"] if "to" not in r for p in r["ports"]]
    assert open_egress == [{"protocol": "TCP", "port": 443}]
    # ... on top of the namespace's default-deny, which stays.
    deny = manifests.find(main_docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}


def test_sweep_pods_accept_no_connections(main_docs, multinode, sweep_docs) -> None:
    job = _job(sweep_docs)
    netpol = manifests.find(sweep_docs, "NetworkPolicy", job["metadata"]["name"])["spec"]
    pods = _all_pods(main_docs, multinode, sweep_docs)
    selected = [n for n, labels in pods.items() if _selects(netpol["podSelector"], labels)]
    assert selected == ["Job/cifar10-train-sweep"]
    assert "Ingress" in netpol["policyTypes"] and netpol["ingress"] == []
    assert [p for r in netpol["egress"] for p in r["ports"]] == [{"protocol": "TCP", "port": 443}]


# --- the sweep Job ----------------------------------------------------------------------------


def test_sweep_has_one_index_per_value_and_each_pod_trains_its_own(sweep_docs: list[dict]) -> None:
    job = _job(sweep_docs)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    values = _env(job, 0)["SWEEP_VALUES"].split(",")
    assert spec["completions"] == len(values), "one index per value: completions must count SWEEP_VALUES"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1, "independent runs: a failed index retries on its own"
    claims = _claim_mounts(job)
    run_dirs = set()
    for index in range(len(values)):
        env = _env(job, index)
        # Kubernetes expands $(VAR) in args from the container's environment.
        expand = lambda m, env=env: env[m.group(1)]  # noqa: E731
        argv = [re.sub(r"\$\((\w+)\)", expand, a) for a in _container(job)["args"]]
        assert _container(job)["command"] == ["python3", "-m", "trainer", "sweep"]
        args = build_parser().parse_args(["sweep", *argv])
        assert args.index == index and args.values == env["SWEEP_VALUES"]
        assert any(_on(str(args.run_dir), m) for m in claims), "the runs and the summary land on the claim"
        run_dirs.add(str(args.run_dir))
        assert (manifests.ROOT / args.config).is_file(), f"{args.config} is not in the image"
    assert len(run_dirs) == 1, "all indexes share one sweep directory, where the summary merges them"


def test_sweep_values_are_the_ones_the_config_accepts(sweep_docs: list[dict]) -> None:
    from trainer import config as config_mod

    env = _env(_job(sweep_docs), 0)
    base = config_mod.load(manifests.ROOT / env["TRAIN_CONFIG"])
    for value in env["SWEEP_VALUES"].split(","):
        config_mod.apply_overrides(base, [f"{env['SWEEP_PARAM']}={value}"])  # raises on a bad key or value


# --- the same restrictions as the rest of the stack ---------------------------------------------


def test_pods_are_restricted_like_the_nightly_cronjob(
    main_docs: list[dict], multinode: list[dict], sweep_docs: list[dict]
) -> None:
    workloads = [_job(multinode), _job(sweep_docs)]
    policy.test_images_are_pinned_to_a_version_tag(workloads)
    policy.test_every_container_has_resources_with_requests_equal_to_limits(workloads)
    policy.test_pods_run_non_root_with_a_read_only_root_and_no_privileges(workloads)
    policy.test_read_only_roots_get_a_writable_tmp(workloads)
    everything = main_docs + multinode + sweep_docs
    policy.test_every_mount_names_a_volume_and_every_claim_exists(everything, workloads)
    policy.test_every_image_is_set_in_one_place_and_tagged_with_the_release(workloads)
    cron = manifests.find(main_docs, "CronJob", "cifar10-train")
    cron_pod, cron_container = manifests.pod_spec(cron), _container(cron)
    for job in workloads:
        pod, name = manifests.pod_spec(job), job["metadata"]["name"]
        assert pod["securityContext"] == cron_pod["securityContext"], name
        assert _container(job)["securityContext"] == cron_container["securityContext"], name
        assert pod["nodeSelector"] == cron_pod["nodeSelector"], name
        assert pod["tolerations"] == cron_pod["tolerations"], name


def test_every_pod_asks_for_whole_gpus(multinode: list[dict], sweep_docs: list[dict]) -> None:
    for job in (_job(multinode), _job(sweep_docs)):
        resources = _container(job)["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert gpus is not None and int(gpus) >= 1, f"{job['metadata']['name']}: no GPU limit"
        assert resources["requests"]["nvidia.com/gpu"] == gpus


def test_on_demand_kustomizations_pin_the_image_as_the_main_one(main_docs: list[dict]) -> None:
    main = yaml.safe_load((manifests.K8S_DIR / "kustomization.yaml").read_text())
    pinned = {i["name"]: i["newTag"] for i in main["images"]}
    for directory in manifests.ON_DEMAND_DIRS:
        own = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for image in own["images"]:
            assert pinned[image["name"]] == image["newTag"], f"{directory.name}: {image}"
        # Run on demand: `kubectl apply -k k8s/` must not start them.
        assert directory.name not in " ".join(main["resources"])
    assert not [d for d in main_docs if d["kind"] == "Job"]


def test_the_multinode_job_trains_under_jax_the_only_backend_that_takes_several_processes(
    multinode: list[dict],
) -> None:
    """trainer/distribute.py refuses several processes under TensorFlow (Keras' fit fails under
    MultiWorkerMirroredStrategy): the pods must run JAX, from the image variant that has it."""
    env = _env(_job(multinode), 0)
    assert env["KERAS_BACKEND"] == "jax"
    assert int(env["TRAIN_NUM_PROCESSES"]) > 1
    assert _container(_job(multinode))["image"].startswith("ghcr.io/example/cifar10-trainer-jax:")
    assert "jax-cuda" in (manifests.ROOT / "pyproject.toml").read_text()
    assert "TRAIN_EXTRAS" in (manifests.ROOT / "Dockerfile.train").read_text()
