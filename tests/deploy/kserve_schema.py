"""KServe's InferenceService API types as a JSON schema, to check k8s/kserve/ offline and strictly.

No package that installs here ships KServe's CRD schema, and the `kserve` SDK itself pulls in a model
server's worth of dependencies (FastAPI, pandas, grpcio-tools, a protobuf pin TensorFlow disagrees
with). Its wheel does carry the API types, though: `kserve/models/v1beta1_*.py` are generated from
KServe's Go types, and each class lists its fields (`attribute_map`: Python name -> JSON name), their
types (`openapi_types`) and which must be set. `build` reads those from the wheel without importing
it (ast only) and writes tests/deploy/kserve-v1beta1.schema.json (vendored, see its .NOTICE):

    pip download kserve==0.21.0 --no-deps -d /tmp/kserve
    python -m tests.deploy.kserve_schema /tmp/kserve/kserve-0.21.0-py3-none-any.whl \
        > tests/deploy/kserve-v1beta1.schema.json

Every KServe object is closed (`additionalProperties: false`): an unknown or misspelt field is an
error, as `kubectl apply`'s strict server-side field validation would make it. Kubernetes types
inside (Container, Volume, ObjectMeta, ...) are references into kubernetes-validate's strict schema
of the same Kubernetes version as tests/deploy/test_k8s_schema.py. A few types that only the status
uses, or that belong to other projects (Knative's URL and conditions, KEDA's triggers), are left
open (`{}`) and listed under `x-unchecked`.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import sys
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).parent / "kserve-v1beta1.schema.json"
KUBERNETES_SCHEMA_DIR = "v1.33.0-local-strict"  # manifests.KUBERNETES_VERSION (test_kserve checks they agree)
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"  # the $id of kubernetes-validate's file
ROOT_TYPE = "V1beta1InferenceService"

_PRIMITIVES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": {"type": "string"},
    "object": {},
}
# openapi-generator's names for Kubernetes types that do not follow V1<Kind> -> io.k8s.api.core.v1.<Kind>.
_K8S_ALIASES = {
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1ListMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta",
    "V1Time": "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
}
_REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


@functools.cache
def kubernetes_definitions() -> dict[str, Any]:
    """kubernetes-validate's strict definitions (all Kubernetes API types) for KUBERNETES_SCHEMA_DIR."""
    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / KUBERNETES_SCHEMA_DIR
    return json.loads((path / "_definitions.json").read_text())


def _kubernetes_name(type_name: str) -> str | None:
    """The definition name in kubernetes-validate's schema for an openapi-generator type name."""
    defs = kubernetes_definitions()["$defs"]
    if type_name in _K8S_ALIASES:
        return _K8S_ALIASES[type_name]
    # K8sIoApiAppsV1DeploymentStrategy -> io.k8s.api.apps.v1.DeploymentStrategy
    m = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", type_name)
    if m:
        name = f"io.k8s.api.{m[1].lower()}.{m[2].lower()}.{m[3]}"
        return name if name in defs else None
    m = re.fullmatch(r"(V\d+)([A-Z]\w*)", type_name)
    if m:
        for group in ("io.k8s.api.core", "io.k8s.apimachinery.pkg.apis.meta"):
            name = f"{group}.{m[1].lower()}.{m[2]}"
            if name in defs:
                return name
    return None


def _read_models(wheel: Path) -> dict[str, dict[str, Any]]:
    """{class name: {"types": openapi_types, "json": attribute_map, "required": [python names]}}."""
    models: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not re.fullmatch(r"kserve/models/v1(alpha|beta)\d+_\w+\.py", name):
                continue
            source = zf.read(name).decode()
            for node in ast.parse(source).body:
                if not isinstance(node, ast.ClassDef):
                    continue
                found: dict[str, dict[str, str]] = {}
                for item in node.body:
                    if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                        if item.targets[0].id in ("openapi_types", "attribute_map"):
                            found[item.targets[0].id] = ast.literal_eval(item.value)
                if "openapi_types" in found:
                    models[node.name] = {
                        "types": found["openapi_types"],
                        "json": found["attribute_map"],
                        "required": sorted(set(_REQUIRED.findall(source))),
                    }
    if ROOT_TYPE not in models:
        raise ValueError(f"{wheel} has no kserve/models class {ROOT_TYPE}: is it the kserve wheel?")
    return models


def build(wheel: Path) -> dict[str, Any]:
    """The JSON schema of an InferenceService, from the kserve wheel's generated model classes."""
    models = _read_models(wheel)
    defs: dict[str, Any] = {}
    unchecked: set[str] = set()
    pending = [ROOT_TYPE]

    def schema_of(type_name: str) -> dict[str, Any]:
        type_name = type_name.strip()
        if type_name in _PRIMITIVES:
            return dict(_PRIMITIVES[type_name])
        m = re.fullmatch(r"list\[(.+)\]", type_name)
        if m:
            return {"type": "array", "items": schema_of(m[1])}
        m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
        if m:
            return {"type": "object", "additionalProperties": schema_of(m[1])}
        if type_name in models:
            if type_name not in defs and type_name not in pending:
                pending.append(type_name)
            return {"$ref": f"#/$defs/{type_name}"}
        kubernetes = _kubernetes_name(type_name)
        if kubernetes:
            return {"$ref": f"{K8S_DEFS_ID}#/$defs/{kubernetes}"}
        unchecked.add(type_name)
        return {}

    while pending:
        name = pending.pop(0)
        model = models[name]
        properties = {model["json"][attr]: schema_of(t) for attr, t in sorted(model["types"].items())}
        definition: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        required = [model["json"][attr] for attr in model["required"] if attr in model["json"]]
        if required:
            definition["required"] = required
        defs[name] = definition
    version = re.search(r"kserve-([\w.]+?)-py", wheel.name)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kserve.github.io/schemas/v1beta1/InferenceService.json",
        "description": f"KServe InferenceService (serving.kserve.io/v1beta1) API types, generated by "
        f"tests/deploy/kserve_schema.py from the kserve {version[1] if version else '?'} wheel",
        "x-kubernetes-schema": KUBERNETES_SCHEMA_DIR,
        "x-unchecked": sorted(unchecked),
        "$ref": f"#/$defs/{ROOT_TYPE}",
        "$defs": dict(sorted(defs.items())),
    }


def validator(schema: dict[str, Any] | None = None):  # -> jsonschema.Draft202012Validator
    """A strict validator for InferenceService documents: the vendored schema (or `schema`) with
    kubernetes-validate's definitions registered for the Kubernetes types it references."""
    import jsonschema
    from referencing import Registry, Resource

    schema = schema if schema is not None else json.loads(SCHEMA_FILE.read_text())
    registry = Registry().with_resource(K8S_DEFS_ID, Resource.from_contents(kubernetes_definitions()))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def errors(document: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Every way `document` departs from KServe's InferenceService types, as `path: message` lines."""
    found = validator(schema).iter_errors(document)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m tests.deploy.kserve_schema KSERVE_WHEEL > {SCHEMA_FILE.name}")
    json.dump(build(Path(sys.argv[1])), sys.stdout, indent=1)
    sys.stdout.write("\n")
