"""serving/tfserving/ is the one source of TensorFlow Serving's config files. compose.yaml bind-mounts
it directly; kustomize may only read files under k8s/, so k8s/tfserving/ holds copies, which must stay
byte-identical (fix a failure with: cp serving/tfserving/* k8s/tfserving/)."""

from __future__ import annotations

import re

from tests.deploy import manifests

SOURCE = manifests.ROOT / "serving" / "tfserving"
COPY = manifests.K8S_DIR / "tfserving"


def _generated_files() -> list[str]:
    import yaml

    kustomization = yaml.safe_load((manifests.K8S_DIR / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "tfserving-config"]
    return generator["files"]


def test_k8s_copies_are_identical_to_serving_tfserving() -> None:
    assert SOURCE.is_dir() and any(SOURCE.iterdir()), f"{SOURCE} (TF Serving's config files) is missing"
    source_names = sorted(p.name for p in SOURCE.iterdir() if p.is_file())
    copy_names = sorted(p.name for p in COPY.iterdir() if p.is_file())
    assert copy_names == source_names, "cp serving/tfserving/* k8s/tfserving/ (and drop removed files)"
    for name in source_names:
        assert (COPY / name).read_bytes() == (SOURCE / name).read_bytes(), (
            f"k8s/tfserving/{name} differs from serving/tfserving/{name}: "
            "cp serving/tfserving/* k8s/tfserving/"
        )
    assert sorted(f.split("/")[-1] for f in _generated_files()) == source_names


def _batching() -> dict[str, int]:
    text = (SOURCE / "batching_parameters.txt").read_text()
    return {k: int(v) for k, v in re.findall(r"^(\w+)\s*\{\s*value:\s*(\d+)\s*\}", text, re.M)}


def test_batching_fits_the_tfserving_pod_and_the_gateway_batch() -> None:
    assert (SOURCE / "batching_parameters.txt").is_file(), f"{SOURCE}/batching_parameters.txt is missing"
    batching = _batching()
    docs = manifests.render()
    tfs = next(manifests.containers(manifests.find(docs, "Deployment", "tfserving")))
    # One batch thread per CPU the pod is given: more only contend, fewer leave cores idle.
    assert batching["num_batch_threads"] == int(tfs["resources"]["limits"]["cpu"])
    # A request larger than max_batch_size is refused by TF Serving, so the gateway's cap must fit.
    gateway = next(manifests.containers(manifests.find(docs, "Deployment", "gateway")))
    assert int(manifests.env_of(gateway)["GATEWAY_MAX_IMAGES"]) <= batching["max_batch_size"]


def test_model_config_serves_the_volume_layout() -> None:
    assert (SOURCE / "models.config").is_file(), f"{SOURCE}/models.config is missing"
    text = (SOURCE / "models.config").read_text()
    assert re.search(r'name:\s*"cifar10"', text)
    base = re.search(r'base_path:\s*"([^"]+)"', text).group(1)
    tfs = next(manifests.containers(manifests.find(manifests.render(), "Deployment", "tfserving")))
    mounts = [m["mountPath"] for m in tfs["volumeMounts"]]
    assert any(base.startswith(m + "/") for m in mounts), f"base_path {base} is on no mounted volume"
    cron = next(manifests.containers(manifests.find(manifests.render(), "CronJob", "cifar10-train")))
    env = manifests.env_of(cron, {"JOB_NAME": "j"})
    published = f"{env['MODEL_BASE']}/{env['MODEL_NAME']}"
    assert base == published, "the trainer must publish where TF Serving reads"
