"""The Kubernetes manifests render and every document passes the API schema of a pinned Kubernetes
version (kubernetes-validate's bundled schemas, strict: unknown fields are errors, as a typo in a
probe or security context would otherwise be silently dropped by the API server)."""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError

from tests.deploy import manifests

# The oldest Kubernetes the manifests promise to work on: CronJob timeZone, podFailurePolicy,
# the batch.kubernetes.io/job-name label and autoscaling/v2 are all GA by 1.33.

EXPECTED = {
    ("Namespace", "cifar10"),
    ("PersistentVolumeClaim", "cifar10-models"),
    ("PersistentVolumeClaim", "cifar10-runs"),
    ("CronJob", "cifar10-train"),
    ("Deployment", "tfserving"),
    ("Service", "tfserving"),
    ("Deployment", "gateway"),
    ("Service", "gateway"),
    ("HorizontalPodAutoscaler", "gateway"),
    ("PodDisruptionBudget", "gateway"),
    ("NetworkPolicy", "default-deny"),
}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return manifests.render()


def _id(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def test_renders_every_part_of_the_stack(docs: list[dict]) -> None:
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert EXPECTED <= present, f"missing from the kustomization: {sorted(EXPECTED - present)}"
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
    assert any(n.startswith("tfserving-config") for n in names), names


def _schema_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, manifests.KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{_id(doc)}: {'.'.join(map(str, e.path))}: {e.message}")
        except SchemaNotFoundError as e:
            # A kind with no bundled schema (a CRD, a typo'd apiVersion) would go unchecked: refuse it.
            problems.append(f"{_id(doc)}: {e.message}")
    return problems


def test_every_document_passes_the_strict_schema(docs: list[dict]) -> None:
    problems = _schema_problems(docs)
    assert not problems, "\n".join(problems)


ON_DEMAND_EXPECTED = {
    "training-multinode": {
        ("Job", "cifar10-train-multinode"),
        ("Service", "cifar10-train-multinode"),
        ("NetworkPolicy", "cifar10-train-multinode"),
        ("PersistentVolumeClaim", "cifar10-runs-multinode"),
    },
    "training-sweep": {
        ("Job", "cifar10-train-sweep"),
        ("NetworkPolicy", "cifar10-train-sweep"),
        ("PersistentVolumeClaim", "cifar10-runs-sweep"),
    },
}


@pytest.mark.parametrize("directory", manifests.ON_DEMAND_DIRS, ids=lambda d: d.name)
def test_on_demand_training_jobs_render_and_pass_the_strict_schema(directory) -> None:
    docs = manifests.render_dir(directory)
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert present == ON_DEMAND_EXPECTED[directory.name]
    assert all(d["metadata"].get("namespace") == "cifar10" for d in docs)
    problems = _schema_problems(docs)
    assert not problems, "\n".join(problems)
    if manifests.kubectl() is not None:  # the fallback renderer agrees with kustomize here too
        def canonical(docs: list[dict]) -> list[str]:
            return sorted(json.dumps(d, sort_keys=True) for d in docs)

        plain, kustomized = manifests.render_plain(directory), manifests.render_with_kubectl(directory)
        assert canonical(plain) == canonical(kustomized)


def test_the_validator_rejects_a_misspelt_field(docs: list[dict]) -> None:
    # Guard against a validator that passes everything (wrong version dir, strict mode ignored).
    deployment = manifests.find(docs, "Deployment", "gateway")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, manifests.KUBERNETES_VERSION, strict=True)


def test_namespaced_documents_land_in_the_namespace(docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] not in manifests.CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == "cifar10", _id(doc)


@pytest.mark.skipif(manifests.kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")
def test_render_plain_matches_kubectl() -> None:
    """The fallback renderer produces what kustomize does, up to the ConfigMap's hash suffix."""

    def normalize(docs: list[dict]) -> list[str]:
        text = (json.dumps(d, sort_keys=True) for d in docs)
        return sorted(re.sub(r"(tfserving-config|nginx-config)-[a-z0-9]{10}", r"\1", t) for t in text)

    assert normalize(manifests.render_plain()) == normalize(manifests.render_with_kubectl())
