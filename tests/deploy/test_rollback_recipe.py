"""The rollback recipe in docs/deploy.md ("Pin a version") works as written: its sed turns the
project's models.config into a valid TensorFlow Serving config serving only the pinned version, and
its overlay renders with kustomize, replacing only that file and rolling the TF Serving pods."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import manifests

# Copied verbatim from docs/deploy.md; the first test fails if the document drifts from these.
SED = (
    "sed 's/latest {/specific {/; s/num_versions: 1/versions: 6/' "
    "../../k8s/tfserving/models.config > models.config"
)
OVERLAY = """\
resources: [../../k8s]
configMapGenerator:
  - name: tfserving-config
    behavior: merge
    files: [models.config]
"""


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rollback")
    shutil.copytree(manifests.K8S_DIR, root / "k8s")
    pin = root / "overlays" / "pin"
    pin.mkdir(parents=True)
    subprocess.run(["bash", "-c", SED], cwd=pin, check=True, timeout=10)
    (pin / "kustomization.yaml").write_text(OVERLAY)
    return pin


def test_the_document_shows_this_recipe() -> None:
    text = (manifests.ROOT / "docs" / "deploy.md").read_text()
    assert SED in text and OVERLAY in text


def test_pinned_config_is_a_valid_tfserving_config_for_version_6(overlay: Path) -> None:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = (overlay / "models.config").read_text()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == "cifar10"
    assert list(model.model_version_policy.specific.versions) == [6]
    assert not model.model_version_policy.HasField("latest")


@pytest.mark.skipif(manifests.kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")
def test_overlay_replaces_only_models_config_and_rolls_tfserving(overlay: Path) -> None:
    docs = manifests.render_with_kubectl(overlay)
    base = manifests.render()

    def tfserving_config(d: dict) -> bool:  # the other ConfigMap is nginx's, which the overlay leaves alone
        return d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tfserving-config")

    (cm,) = [d for d in docs if tfserving_config(d)]
    (base_cm,) = [d for d in base if tfserving_config(d)]
    assert cm["data"]["models.config"] == (overlay / "models.config").read_text()
    assert {k: v for k, v in cm["data"].items() if k != "models.config"} == {
        k: v for k, v in base_cm["data"].items() if k != "models.config"
    }
    # A new name (hash suffix) is what makes the Deployment roll and load the pinned config.
    assert cm["metadata"]["name"] != base_cm["metadata"]["name"]
    volumes = manifests.pod_spec(manifests.find(docs, "Deployment", "tfserving"))["volumes"]
    assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in volumes
    assert yaml.safe_dump(manifests.find(docs, "Deployment", "gateway")) == yaml.safe_dump(
        manifests.find(base, "Deployment", "gateway")
    )
