"""The nginx in front of the gateway (deploy/nginx/nginx.conf) is wired the same way in both stacks:
the real nginx accepts the file, kustomize's copy is identical, its limits match the gateway's, the
public port goes to nginx and the probes and Prometheus to the gateway's admin port. (What nginx does
with slow clients is drilled in tests/drills/test_slow_clients.py.)"""

from __future__ import annotations

import json
import re
import socket
from urllib.parse import urlparse

import pytest

from loadtest.gateway_process import free_port
from serving.config import Settings
from tests.deploy import manifests
from tests.fixtures.nginx import NGINX_CONF, local_config, nginx_test, running_nginx

K8S_COPY = manifests.K8S_DIR / "nginx" / "nginx.conf"
COMMAND = ["nginx", "-p", "/tmp/", "-c", "/etc/nginx/gateway/nginx.conf", "-e", "stderr"]


def _directive(name: str) -> str:
    found = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), re.M)
    assert len(found) == 1, f"{NGINX_CONF}: expected one `{name}` directive, found {found}"
    return found[0].strip()


def _size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60}[unit]


def _upstream_port() -> int:
    found = re.findall(r"server gateway:(\d+);", NGINX_CONF.read_text())
    assert len(found) == 1, f"{NGINX_CONF}: expected one `server gateway:PORT;` upstream"
    return int(found[0])


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return manifests.render()


def _gateway_pod(docs: list[dict]) -> tuple[dict, dict, dict]:
    deployment = manifests.find(docs, "Deployment", "gateway")
    containers = {c["name"]: c for c in manifests.containers(deployment)}
    return deployment, containers["gateway"], containers["nginx"]


def test_k8s_copy_is_identical_and_generated_into_a_configmap(docs: list[dict]) -> None:
    assert K8S_COPY.read_bytes() == NGINX_CONF.read_bytes(), "cp deploy/nginx/nginx.conf k8s/nginx/"
    (configmap,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("nginx-config")
    ]
    assert configmap["data"]["nginx.conf"] == NGINX_CONF.read_text()


def test_real_nginx_accepts_the_shipped_config() -> None:
    result = nginx_test(local_config(8080, 8000))
    assert result.returncode == 0, result.stderr


def test_real_nginx_rejects_a_broken_config() -> None:
    # Guard against a check that passes everything.
    result = nginx_test(local_config(8080, 8000).replace("client_body_timeout 10s;", "client_body_timeout;"))
    assert result.returncode != 0


def _exchange(url: str, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers, body) of nginx's answer to raw `request` bytes."""
    target = urlparse(url)
    with socket.create_connection((target.hostname, target.port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while data := sock.recv(65536):  # nginx closes after these refusals
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


LONG = b"x" * 9000  # over large_client_header_buffers' 8k


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /v1/models?q=" + LONG + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "request_line_too_long"),
        (b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Big: " + LONG + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /v1/models HTTP/1.1\r\nHost: t\r\nBroken header line\r\n\r\n", 400, "bad_request"),
        (b"\x16\x03\x01 not http\r\n\r\n", 400, "bad_request"),  # a TLS hello on the plain port
    ],
    ids=["request-line-over-8k", "header-over-8k", "malformed-header", "not-http"],
)
def test_requests_nginx_cannot_take_get_the_gateway_error_format(
    request_bytes: bytes, status: int, code: str
) -> None:
    """nginx answers these itself (no gateway behind it is needed): in the API's JSON error shape
    with a request id, as the gateway's worker does when they reach gunicorn directly."""
    with running_nginx(free_port()) as url:
        status_line, headers, body = _exchange(url, request_bytes)
    assert status_line.split()[1] == str(status), (status_line, body[:200])
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    assert re.fullmatch(r"[0-9a-f]{32}", error["request_id"])
    assert headers["x-request-id"] == error["request_id"]


def test_proxy_buffers_whole_requests_with_timeouts_on_every_phase() -> None:
    assert _directive("proxy_request_buffering") == "on"
    assert _directive("proxy_buffering") == "on"
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout"):
        assert 0 < _seconds(_directive(name)) <= 30, name
    assert _directive("limit_conn_status") == "429"
    assert re.fullmatch(r"per_address \d+", _directive("limit_conn"))
    # Connections to gunicorn are reused, and dropped before gunicorn's own keep-alive (2 s) drops them.
    from gunicorn.config import Config

    upstream_idle = re.search(r"upstream gateway \{[^}]*keepalive_timeout (\w+);", NGINX_CONF.read_text())
    assert upstream_idle and _seconds(upstream_idle.group(1)) < Config().keepalive


@pytest.mark.parametrize("where", ["compose.yaml", "k8s"])
def test_body_limit_matches_the_gateway_and_its_deadline_comes_first(where: str, docs: list[dict]) -> None:
    image = manifests.dockerfile_env(manifests.ROOT / "Dockerfile.serve")
    if where == "k8s":
        env = {**image, **manifests.env_of(_gateway_pod(docs)[1])}
    else:
        compose_env = manifests.compose()["services"]["gateway"]["environment"]
        env = {**image, **{k: str(v) for k, v in compose_env.items()}}
    settings = Settings.from_env(env)
    assert _size(_directive("client_max_body_size")) == settings.max_upload_bytes
    assert f"limit of {settings.max_upload_bytes} bytes" in NGINX_CONF.read_text()  # nginx's own 413 body
    # The gateway answers 504 itself before nginx gives up on it.
    assert _seconds(_directive("proxy_read_timeout")) > settings.request_deadline_s


def test_k8s_public_port_goes_to_nginx_and_probes_to_the_admin_port(docs: list[dict]) -> None:
    deployment, gateway, nginx = _gateway_pod(docs)
    env = manifests.env_of(gateway)
    admin_port = int(env["GATEWAY_ADMIN_BIND"].rsplit(":", 1)[1])
    nginx_ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    gateway_ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert _directive("listen") == f"{nginx_ports['http']}"
    service = manifests.find(docs, "Service", "gateway")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert "http" not in gateway_ports and gateway_ports["admin"] == admin_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["port"] == "admin", probe
    notes = manifests.pod_template(deployment)["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(admin_port)
    # nginx's upstream host name `gateway` is this pod's loopback, where the API listens.
    assert {"ip": "127.0.0.1", "hostnames": ["gateway"]} in manifests.pod_spec(deployment)["hostAliases"]
    assert env["GATEWAY_BIND"] == f"127.0.0.1:{_upstream_port()}"


def test_k8s_nginx_runs_the_mounted_config_unprivileged(docs: list[dict]) -> None:
    deployment, _, nginx = _gateway_pod(docs)
    assert nginx["image"].split(":")[0] == "nginxinc/nginx-unprivileged"
    assert nginx["command"] == COMMAND
    volumes = {v["name"]: v for v in manifests.pod_spec(deployment)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in nginx["volumeMounts"]}
    assert mounts["/etc/nginx/gateway"]["configMap"]["name"].startswith("nginx-config")
    assert "emptyDir" in mounts["/tmp"]  # -p /tmp/: pid file and request bodies
    assert nginx["securityContext"]["runAsUser"] > 0


def test_network_policy_opens_the_admin_port_to_prometheus_only(docs: list[dict]) -> None:
    policy = manifests.find(docs, "NetworkPolicy", "gateway")["spec"]
    rules = {p["port"]: r.get("from") for r in policy["ingress"] for p in r["ports"]}
    assert rules[8080] is None  # the public entry point: from anywhere
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert rules[9090] == [monitoring]
    assert set(rules) == {8080, 9090}


def test_compose_puts_nginx_in_front_with_the_same_command_and_config() -> None:
    services = manifests.compose()["services"]
    nginx, gateway = services["nginx"], services["gateway"]
    assert nginx["entrypoint"] == COMMAND
    assert "./deploy/nginx:/etc/nginx/gateway:ro" in nginx["volumes"]
    assert nginx["read_only"] is True and any(t.startswith("/tmp") for t in nginx["tmpfs"])
    assert nginx["ports"] == [f"{_directive('listen')}:{_directive('listen')}"]
    assert nginx["image"] == _gateway_pod(manifests.render())[2]["image"]
    assert gateway["environment"]["GATEWAY_BIND"] == f"0.0.0.0:{_upstream_port()}"
    assert "gateway" in nginx["depends_on"]
