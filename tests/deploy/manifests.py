"""Reading the deployment files the way their tools would: kustomize output, Dockerfile instructions,
the compose file, and the .dockerignore allowlist. Shared by the tests in tests/deploy/."""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "k8s"
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILES = (ROOT / "Dockerfile.train", ROOT / "Dockerfile.serve")
ENTRYPOINT = ROOT / "scripts" / "train-entrypoint.sh"

KUBERNETES_VERSION = "1.33.0"  # the API the manifests are validated against (kubernetes-validate, strict)
# Kinds kustomize leaves without a namespace (the ones this project uses, plus common cluster-wide ones).
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def kubectl() -> str | None:
    """`kubectl` when it is on PATH and has kustomize built in (it has since 1.14)."""
    return shutil.which("kubectl")


def needs_kubectl(variant: str) -> pytest.MarkDecorator:
    """Skip a test module of an overlay `variant` (e.g. "the KServe variant") without kubectl: overlays
    with components are beyond the fallback renderer below."""
    return pytest.mark.skipif(
        kubectl() is None,
        reason=f"kubectl (with built-in kustomize) is not installed: {variant} is a kustomize component, "
        "which the fallback renderer in tests/deploy/manifests.py does not implement",
    )


def render_with_kubectl(directory: Path = K8S_DIR) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_plain(directory: Path = K8S_DIR) -> list[dict]:
    """The subset of kustomize this project uses, for machines without kubectl: `resources` (files),
    `namespace`, `labels` (metadata only), `configMapGenerator` (files; no hash suffix) and `images`."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images"}
    unknown = set(kustomization) - known
    if unknown:
        raise ValueError(f"render_plain does not implement {sorted(unknown)}: render with kubectl kustomize")
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        docs += [d for d in yaml.safe_load_all((directory / resource).read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in generator.get("files", [])}
        meta = {"name": generator["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if kustomization.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = kustomization["namespace"]
        for entry in kustomization.get("labels", []):
            meta.setdefault("labels", {}).update(entry.get("pairs", {}))
        for container in containers(doc):
            for image in kustomization.get("images", []):
                name = container["image"].split(":")[0]
                if name == image["name"] and "newTag" in image:
                    container["image"] = f"{name}:{image['newTag']}"
    return docs


def render() -> list[dict]:
    """The manifests `kubectl apply -k k8s/` would send: kubectl's kustomize when installed, else
    render_plain (test_render_plain_matches_kubectl keeps the two in step where both exist).
    Rendered once per test session; each caller gets its own copy to read or change."""
    return copy.deepcopy(_render_once())


@functools.cache
def _render_once() -> list[dict]:
    return render_with_kubectl() if kubectl() else render_plain()


# Run on demand, each its own kustomization applied after k8s/ (which holds the namespace, the
# default-deny policy and the model claim they rely on); not part of k8s/kustomization.yaml.
ON_DEMAND_DIRS = (K8S_DIR / "training-multinode", K8S_DIR / "training-sweep")


def render_dir(directory: Path) -> list[dict]:
    """Like render(), for another kustomization directory (e.g. one of ON_DEMAND_DIRS)."""
    return render_with_kubectl(directory) if kubectl() else render_plain(directory)


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if doc["kind"] in WORKLOAD_KINDS:
        return doc["spec"]["template"]["spec"]
    return None


def pod_template(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def containers(doc: dict) -> Iterator[dict]:
    spec = pod_spec(doc)
    if spec:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def container(docs: list[dict], workload: str, name: str, kind: str = "Deployment") -> dict:
    """The container or init container `name` of the workload `kind`/`workload`."""
    return next(c for c in containers(find(docs, kind, workload)) if c["name"] == name)


def find(docs: list[dict], kind: str, name: str) -> dict:
    for doc in docs:
        if doc["kind"] == kind and (doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def env_of(container: dict, extra_refs: dict[str, str] | None = None) -> dict[str, str]:
    """A container's environment as the kubelet would set it: `valueFrom.fieldRef` entries come from
    `extra_refs` (keyed by the variable's name) and $(VAR) refers to variables defined before it."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            expand = lambda m: env.get(m.group(1), m.group(0))  # noqa: E731 - $(VAR) of earlier entries
            env[item["name"]] = re.sub(r"\$\((\w+)\)", expand, item["value"])
        elif extra_refs is not None and item["name"] in extra_refs:
            env[item["name"]] = extra_refs[item["name"]]
    return env


# --- Dockerfiles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int  # index of the FROM stage this instruction belongs to
    keyword: str  # upper case: FROM, RUN, COPY, ENV, ...
    args: str  # the rest of the line, continuations joined


def dockerfile_instructions(path: Path) -> list[Instruction]:
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by the Docker parser too
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out, stage = [], -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, args.strip()))
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of the final stage (`ENV A=1 B=2` form), what a container of that image starts with."""
    instructions = dockerfile_instructions(path)
    last = max(i.stage for i in instructions)
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.stage == last and ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"{path.name}: use the ENV KEY=VALUE form, got {ins.args!r}")
                env[key] = value
    return env


def exec_form(ins: Instruction) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD, as a list of arguments."""
    args = ins.args
    if ins.keyword == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4 :].strip()
    value = json.loads(args)
    if not isinstance(value, list):
        raise ValueError(f"{ins.keyword} must use the exec form [...]: {ins.args!r}")
    return value


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    """Sources and destination of a COPY without --from (files taken from the build context)."""
    tokens = [t for t in shlex.split(ins.args) if not t.startswith("--")]
    return tokens[:-1], tokens[-1]


# --- .dockerignore -----------------------------------------------------------------------------


def dockerignore_excludes(rel_path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or one of its parent directories, decides."""
    parts = rel_path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")
        if pat.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def read_dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def compose() -> dict:
    return copy.deepcopy(yaml.safe_load(COMPOSE_FILE.read_text()))
