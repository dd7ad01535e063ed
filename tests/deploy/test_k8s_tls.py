"""The mutual-TLS variant (deploy/tls/ = k8s/ + the component k8s/tls/), checked offline: it renders
with kustomize, its core objects pass the strict Kubernetes schema, cert-manager's objects chain to the
stack's CA and issue the Secrets the pods mount, and the init container's script, run here with
/bin/sh on real certificates laid out as cert-manager writes them, produces an SSLConfig that a TLS
gRPC server reads as TF Serving does (the test double) and that the gateway, configured from the
rendered environment, completes mutual TLS with.

Not checked here: cert-manager's own schema for Issuer and Certificate (no offline copy of its CRDs),
and the real TF Serving binary reading the file (no container engine; ssl_config.proto's fields and
server.cc's use of them are mirrored in tests/tfserving_double/ssl_config.py)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
from PIL import Image

from tests.deploy import manifests

OVERLAY = manifests.ROOT / "deploy" / "tls"
CERT_MANAGER = "cert-manager.io/v1"
SECRET_KEYS = ("tls.key", "tls.crt", "ca.crt")  # what cert-manager writes in a Certificate's Secret
TLS_VARIABLES = ("GATEWAY_TFSERVING_TLS_CA", "GATEWAY_TFSERVING_TLS_CERT", "GATEWAY_TFSERVING_TLS_KEY")

pytestmark = manifests.needs_kubectl("the TLS variant")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return manifests.render_with_kubectl(OVERLAY)


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind and d["apiVersion"] == CERT_MANAGER}


def _spec(docs: list[dict], name: str) -> dict:
    return manifests.pod_spec(manifests.find(docs, "Deployment", name))


def _mount_of(container: dict, volume: str) -> PurePosixPath:
    return PurePosixPath(next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume))


def _volume_of_secret(spec: dict, secret: str) -> str:
    """The name of the pod's volume that mounts the Secret `secret`."""
    return next(v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == secret)


def test_it_is_the_plain_stack_plus_the_certificates(docs: list[dict]) -> None:
    ids = lambda ds: {(d["kind"], d["metadata"]["name"]) for d in ds}  # noqa: E731
    plain = ids(manifests.render())
    assert plain <= ids(docs), f"the TLS variant lost {sorted(plain - ids(docs))}"
    added = ids(docs) - plain
    assert added == {
        ("Issuer", "cifar10-selfsigned"), ("Issuer", "cifar10-internal-ca"),
        ("Certificate", "cifar10-internal-ca"), ("Certificate", "tfserving-tls"),
        ("Certificate", "gateway-tfserving-client"),
    }  # fmt: skip
    assert all(d["metadata"].get("namespace") == "cifar10" for d in docs if d["apiVersion"] == CERT_MANAGER)


def test_core_objects_pass_the_strict_schema(docs: list[dict]) -> None:
    problems = []
    for doc in docs:
        if doc["apiVersion"] == CERT_MANAGER:
            continue  # a CRD: no bundled schema (module docstring)
        try:
            kubernetes_validate.validate(doc, manifests.KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
    assert not problems, "\n".join(problems)


def test_certificates_chain_to_the_stacks_ca(docs: list[dict]) -> None:
    issuers, certificates = _by_kind(docs, "Issuer"), _by_kind(docs, "Certificate")
    for name, certificate in certificates.items():
        ref = certificate["spec"]["issuerRef"]
        assert ref["kind"] == "Issuer" and ref["name"] in issuers, f"{name} names no Issuer of this stack"
    ca = certificates["cifar10-internal-ca"]["spec"]
    assert ca["isCA"] is True and "selfSigned" in issuers[ca["issuerRef"]["name"]]["spec"]
    ca_issuer = issuers["cifar10-internal-ca"]["spec"]["ca"]
    assert ca_issuer["secretName"] == ca["secretName"]  # the CA Issuer signs with that CA's key
    for leaf in ("tfserving-tls", "gateway-tfserving-client"):
        assert certificates[leaf]["spec"]["issuerRef"]["name"] == "cifar10-internal-ca"


def test_tfserving_mounts_its_server_certificate_and_serves_the_config_the_init_container_writes(
    docs: list[dict],
) -> None:
    certificates, spec = _by_kind(docs, "Certificate"), _spec(docs, "tfserving")
    server = next(c for c in certificates.values() if "server auth" in c["spec"].get("usages", []))
    init = manifests.container(docs, "tfserving", "ssl-config")
    main = manifests.container(docs, "tfserving", "tfserving")
    tls_volume = _volume_of_secret(spec, server["spec"]["secretName"])
    env = manifests.env_of(init)
    assert PurePosixPath(env["CERT_DIR"]) == _mount_of(init, tls_volume)
    # The file the init container writes is the one the server is told to read, on a volume both mount.
    config = PurePosixPath(env["SSL_CONFIG"])
    assert f"--ssl_config_file={config}" in main["args"]
    mount = next(m for m in main["volumeMounts"] if PurePosixPath(m["mountPath"]) == config.parent)
    assert mount.get("readOnly") is True
    assert config.parent == _mount_of(init, mount["name"])
    ssl_volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert ssl_volume["emptyDir"]["medium"] == "Memory", "the private key must not land on the node's disk"
    # The gateway dials the address its certificate names; probes stay on the plaintext REST port.
    gateway_env = manifests.env_of(manifests.container(docs, "gateway", "gateway"))
    host = gateway_env["GATEWAY_TFSERVING_ADDRESS"].rsplit(":", 1)[0]
    assert host in server["spec"]["dnsNames"]
    assert main["livenessProbe"]["tcpSocket"] == {"port": "grpc"}  # a TCP connect: no TLS handshake
    assert "8501" in " ".join(main["readinessProbe"]["exec"]["command"])


def test_the_gateway_presents_its_client_certificate(docs: list[dict]) -> None:
    certificates, spec = _by_kind(docs, "Certificate"), _spec(docs, "gateway")
    client = next(c for c in certificates.values() if "client auth" in c["spec"].get("usages", []))
    gateway = manifests.container(docs, "gateway", "gateway")
    volume = _volume_of_secret(spec, client["spec"]["secretName"])
    env = manifests.env_of(gateway)
    paths = [PurePosixPath(env[name]) for name in TLS_VARIABLES]
    assert [p.parent for p in paths] == [_mount_of(gateway, volume)] * 3
    assert [p.name for p in paths] == ["ca.crt", "tls.crt", "tls.key"]


def test_the_init_container_is_locked_down_like_every_other(docs: list[dict]) -> None:
    init = manifests.container(docs, "tfserving", "ssl-config")
    assert init["resources"]["requests"] == init["resources"]["limits"]
    security = init["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert init["image"] == manifests.container(docs, "tfserving", "tfserving")["image"]  # one pinned tag


def _secret_dir(directory: Path, key: Path, cert: Path, ca: Path) -> Path:
    """A Secret volume as cert-manager fills it: tls.key, tls.crt, ca.crt."""
    directory.mkdir()
    for name, source in zip(SECRET_KEYS, (key, cert, ca), strict=True):
        (directory / name).write_bytes(source.read_bytes())
    return directory


@pytest.mark.slow  # a TF Serving double with a SavedModel and a gateway over mutual TLS
def test_the_init_script_writes_a_config_on_which_tf_serving_and_the_gateway_complete_mutual_tls(
    docs: list[dict], tmp_path: Path
) -> None:
    from serving.app import create_app
    from serving.config import Settings
    from tests.fixtures.tls import make_pki
    from tests.tfserving_double import TFServingDouble
    from tests.tfserving_double.ssl_config import read_ssl_config, tls_options
    from tests.tfserving_double.tiny_model import write_tiny_model

    pki = make_pki(tmp_path)
    server_secret = _secret_dir(tmp_path / "tfserving-tls", pki.server_key, pki.server_cert, pki.ca)
    client_secret = _secret_dir(tmp_path / "client-tls", pki.client_key, pki.client_cert, pki.ca)
    (tmp_path / "ssl").mkdir()
    config_path = tmp_path / "ssl" / "ssl.pbtxt"

    # The init container's own command, with its two paths moved here.
    init = manifests.container(docs, "tfserving", "ssl-config")
    env = {**os.environ, "CERT_DIR": str(server_secret), "SSL_CONFIG": str(config_path)}
    assert set(manifests.env_of(init)) == {"CERT_DIR", "SSL_CONFIG"}
    done = subprocess.run(init["command"], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600  # the key inside is readable by its owner only
    assert not (tmp_path / "ssl" / "ssl.pbtxt.tmp").exists()

    config = read_ssl_config(config_path)  # refuses what TF Serving's text-format parser refuses
    assert config.server_key == pki.server_key.read_text()
    assert config.server_cert == pki.server_cert.read_text()
    assert config.custom_ca == pki.ca.read_text()
    assert config.client_verify is True

    model_base = tmp_path / "models"
    write_tiny_model(model_base, "cifar10", 1)
    gateway_env = manifests.env_of(manifests.container(docs, "gateway", "gateway"))
    mount = PurePosixPath(gateway_env["GATEWAY_TFSERVING_TLS_CA"]).parent

    def gateway(address: str, *variables: str):
        # The rendered TLS paths, moved from the Secret's mount to the folder standing in for it.
        tls = {v: str(client_secret / PurePosixPath(gateway_env[v]).relative_to(mount)) for v in variables}
        tls["GATEWAY_MODEL_NAME"] = gateway_env["GATEWAY_MODEL_NAME"]
        return create_app(Settings.from_env({"GATEWAY_TFSERVING_ADDRESS": address, **tls}))

    png = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 90)).save(png, "PNG")
    with TFServingDouble(model_base, **tls_options(config_path)) as double:
        app = gateway(double.address, *TLS_VARIABLES)
        try:
            client = app.test_client()
            assert client.get("/readyz").status_code == 200
            answer = client.post("/v1/predict", data=png.getvalue(), content_type="image/png")
            assert answer.status_code == 200, answer.get_data(as_text=True)
        finally:
            app.extensions["gateway.backend"].close()
        # client_verify is on: the same gateway without its client certificate is refused.
        app = gateway(double.address, "GATEWAY_TFSERVING_TLS_CA")
        try:
            assert app.test_client().get("/readyz").status_code == 503
        finally:
            app.extensions["gateway.backend"].close()
