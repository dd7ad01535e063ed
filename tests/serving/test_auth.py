"""API keys on /v1 (serving/auth.py): hashed at rest, Bearer or X-API-Key, 401 + WWW-Authenticate,
public pages open, per-key metrics, and rotation by a Kubernetes-style symlink swap seen by a real
gunicorn gateway without a restart."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from flask import Flask
from prometheus_client import REGISTRY

from loadtest.gateway_process import PROJECT_ROOT, running_gateway
from serving import auth, metrics
from serving.app import create_app
from serving.config import ConfigError, Settings
from serving.context import BACKEND_KEY
from tests.serving.test_api import png

ALICE, BOB = auth.new_key(), auth.new_key()


def keys_text(**keys: str) -> str:
    return "# name:sha256hex\n\n" + "".join(f"{name}:{auth.hash_key(key)}\n" for name, key in keys.items())


class SecretVolume:
    """A directory laid out as the kubelet writes a Secret volume: `api-keys -> ..data/api-keys`,
    `..data -> ..<timestamp>/`, updated by writing a new timestamped directory and renaming a new
    `..data` symlink over the old one (atomic), then deleting the old directory."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._generation = 0
        self._current = self._write(text)
        (root / "..data").symlink_to(self._current.name)
        (root / "api-keys").symlink_to("..data/api-keys")

    @property
    def path(self) -> Path:
        return self.root / "api-keys"

    def _write(self, text: str) -> Path:
        self._generation += 1
        directory = self.root / f"..2026_12_06_08_00_0{self._generation}.{os.getpid()}"
        directory.mkdir()
        (directory / "api-keys").write_text(text)
        return directory

    def swap(self, text: str) -> None:
        old, new = self._current, self._write(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        os.replace(tmp, self.root / "..data")
        (old / "api-keys").unlink()
        old.rmdir()
        self._current = new


def keyed_app(gateway_app: Flask, keys_file: Path, **settings: object) -> Flask:
    """A gateway with API keys over the session model's backend (no second model load)."""
    base = gateway_app.extensions["gateway.settings"]
    return create_app(
        Settings(model_base_path=base.model_base_path, model_name=base.model_name, poll_interval_s=60,
                 api_keys_file=keys_file, **settings),
        backend=gateway_app.extensions[BACKEND_KEY],
    )


def predict(client, headers: dict[str, str] | None = None):
    return client.post("/v1/predict", data={"images": [(io.BytesIO(png()), "a.png")]}, headers=headers or {})


# --- the keys file and the minting command -------------------------------------------------------------


def test_new_key_command_prints_a_key_and_its_hash_line() -> None:
    out = subprocess.run([sys.executable, "-m", "serving.auth", "new-key", "alice"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    key, line = out.stdout.splitlines()
    assert key.startswith(auth.KEY_PREFIX) and len(key) >= 40  # 32 random bytes, base64
    assert line == f"alice:{hashlib.sha256(key.encode()).hexdigest()}"
    assert auth.parse_keys(line, "f") == {hashlib.sha256(key.encode()).hexdigest(): "alice"}
    assert "only once" in out.stderr


def test_keys_file_lines_are_checked_without_echoing_the_line() -> None:
    text = f"alice:{auth.hash_key(ALICE)}\n{ALICE}\n"  # someone pasted a key instead of its hash
    with pytest.raises(auth.KeyFileError) as error:
        auth.parse_keys(text, "keys.txt")
    assert "keys.txt line 2" in str(error.value) and "new-key" in str(error.value)
    assert ALICE not in str(error.value)
    with pytest.raises(auth.KeyFileError, match="two names"):
        auth.parse_keys(f"a:{auth.hash_key(ALICE)}\nb:{auth.hash_key(ALICE)}\n", "keys.txt")
    # One name may hold several keys: the old and the new key of a client during a rotation.
    both = auth.parse_keys(f"a:{auth.hash_key(ALICE)}\na:{auth.hash_key(BOB).upper()}\n", "keys.txt")
    assert sorted(both.values()) == ["a", "a"]


@pytest.mark.slow
def test_a_missing_or_malformed_keys_file_stops_the_gateway_naming_the_variable(
    gateway_app: Flask, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_API_KEYS_FILE"):
        keyed_app(gateway_app, tmp_path / "absent")
    bad = tmp_path / "bad"
    bad.write_text("alice\n")
    with pytest.raises(ConfigError, match="GATEWAY_API_KEYS_FILE.*line 1"):
        keyed_app(gateway_app, bad)


def test_keys_file_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).api_keys_file is None  # off by default: `make serve` needs no key
    assert Settings.from_env({"GATEWAY_API_KEYS_FILE": "/etc/gw/api-keys"}).api_keys_file == Path(
        "/etc/gw/api-keys"
    )


# --- in process: the rules of a request ----------------------------------------------------------------


@pytest.mark.slow
def test_v1_needs_a_key_with_401_and_www_authenticate(gateway_app: Flask, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(keys_text(alice=ALICE))
    client = keyed_app(gateway_app, keys).test_client()

    missing = predict(client)
    assert missing.status_code == 401
    assert missing.json["error"]["code"] == "missing_api_key"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert client.get("/v1/models").status_code == 401

    wrong = predict(client, {"Authorization": f"Bearer {BOB}"})
    assert wrong.status_code == 401 and wrong.json["error"]["code"] == "invalid_api_key"
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert BOB not in wrong.get_data(as_text=True)
    # Basic credentials are not a key.
    assert predict(client, {"Authorization": f"Basic {ALICE}"}).status_code == 401

    for headers in ({"Authorization": f"Bearer {ALICE}"}, {"authorization": f"bearer {ALICE}"},
                    {"X-API-Key": ALICE}):
        ok = predict(client, headers)
        assert ok.status_code == 200, (headers, ok.json)
        assert len(ok.json["predictions"]) == 1


@pytest.mark.slow
def test_page_probes_and_spec_stay_open(gateway_app: Flask, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(keys_text(alice=ALICE))
    client = keyed_app(gateway_app, keys).test_client()
    for path in ("/", "/static/app.js", "/healthz", "/readyz", "/openapi.yaml", "/v1/openapi.json"):
        assert client.get(path).status_code == 200, path


@pytest.mark.slow
def test_an_empty_keys_file_refuses_every_api_request(gateway_app: Flask, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# all keys revoked\n")
    client = keyed_app(gateway_app, keys).test_client()
    assert predict(client, {"X-API-Key": ALICE}).status_code == 401
    assert client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_requests_are_counted_per_key_name_never_the_key(gateway_app: Flask, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(keys_text(alice=ALICE, bob=BOB))
    client = keyed_app(gateway_app, keys).test_client()

    def count(name: str, status: str) -> float:
        labels = {"key_name": name, "status": status}
        return REGISTRY.get_sample_value("gateway_api_key_requests_total", labels) or 0.0

    def failures(reason: str) -> float:
        return REGISTRY.get_sample_value("gateway_auth_failures_total", {"reason": reason}) or 0.0

    before = count("alice", "200"), count("bob", "200"), failures("invalid")
    predict(client, {"X-API-Key": ALICE})
    predict(client, {"X-API-Key": ALICE})
    predict(client, {"X-API-Key": BOB})
    predict(client, {"X-API-Key": "c10_not-a-key"})
    after = count("alice", "200"), count("bob", "200"), failures("invalid")
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]
    exposition = metrics.render()[0].decode()
    assert 'gateway_api_key_requests_total{key_name="alice",status="200"}' in exposition
    assert ALICE not in exposition and auth.hash_key(ALICE) not in exposition


@pytest.mark.slow
def test_rotation_by_symlink_swap_in_process_and_a_bad_file_keeps_the_old_keys(
    gateway_app: Flask, tmp_path: Path
) -> None:
    volume = SecretVolume(tmp_path / "secret", keys_text(alice=ALICE))
    client = keyed_app(gateway_app, volume.path).test_client()
    assert client.get("/v1/models", headers={"X-API-Key": ALICE}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": BOB}).status_code == 401

    volume.swap(keys_text(bob=BOB))
    assert client.get("/v1/models", headers={"X-API-Key": BOB}).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": ALICE}).status_code == 401

    # A broken update (a pasted key instead of its hash) must not lock every client out.
    volume.swap(f"{BOB}\n")
    assert client.get("/v1/models", headers={"X-API-Key": BOB}).status_code == 200
    # An edit in place (same inode, new mtime and size) is seen too.
    time.sleep(0.01)
    Path(os.path.realpath(volume.path)).write_text(keys_text(alice=ALICE, bob=BOB))
    assert client.get("/v1/models", headers={"X-API-Key": ALICE}).status_code == 200


# --- a real gunicorn gateway: rotation without restart, 401 and 429 over HTTP ---------------------------


@pytest.mark.slow
def test_gunicorn_gateway_rotates_keys_without_restart_and_limits_per_key(
    exported_model, tmp_path: Path
) -> None:
    carol = auth.new_key()
    volume = SecretVolume(tmp_path / "secret", keys_text(alice=ALICE, carol=carol))
    env = {
        "GATEWAY_MODEL_BASE_PATH": str(exported_model.base_path),
        "GATEWAY_MODEL_NAME": exported_model.name,
        "GATEWAY_TFSERVING_ADDRESS": "",
        "GATEWAY_API_KEYS_FILE": str(volume.path),
        "GATEWAY_RATE_LIMIT": "5/minute",
    }
    # One worker: with the default in-memory storage each worker counts on its own (docs/deploy.md).
    with running_gateway(env, workers=1, log_dir=tmp_path / "log") as gateway:
        url = gateway.url
        pid = gateway.workers()[0].pid

        def status(key: str | None, path: str = "/v1/models") -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return requests.get(url + path, headers=headers, timeout=30).status_code

        body = requests.post(url + "/v1/predict", files={"images": ("a.png", png(), "image/png")},
                             headers={"X-API-Key": ALICE}, timeout=60)
        assert body.status_code == 200 and len(body.json()["predictions"]) == 1
        refused = requests.get(url + "/v1/models", timeout=30)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert status(BOB) == 401
        assert status(None, "/healthz") == 200

        volume.swap(keys_text(bob=BOB, carol=carol))
        assert status(BOB) == 200
        assert status(ALICE) == 401
        assert [p.pid for p in gateway.workers()] == [pid], "the worker must not have been restarted"

        # carol: five requests a minute, then 429 with a Retry-After the client can wait for.
        assert [status(carol) for _ in range(5)] == [200] * 5
        limited = requests.get(url + "/v1/models", headers={"X-API-Key": carol}, timeout=30)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert status(BOB) == 200, "another key has its own limit"


@pytest.mark.slow
def test_python_client_and_cli_send_the_key(
    gateway_app: Flask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from client.cli import main as cli
    from client.http import HTTPClient
    from client.results import ClientError
    from tests.fixtures.gateway import serve_in_thread

    keys = tmp_path / "keys"
    keys.write_text(keys_text(alice=ALICE))
    image = tmp_path / "a.png"
    image.write_bytes(png())
    with serve_in_thread(keyed_app(gateway_app, keys)) as url:
        with HTTPClient(url, api_key=ALICE) as client:
            assert len(client.predict([image]).images) == 1
        with HTTPClient(url, retries=0) as client, pytest.raises(ClientError) as error:
            client.predict([image])
        assert error.value.code == "missing_api_key"

        monkeypatch.delenv("CIFAR10_API_KEY", raising=False)
        assert cli(["predict", str(image), "--url", url]) == 1
        assert "[missing_api_key]" in capsys.readouterr().err
        assert cli(["predict", str(image), "--url", url, "--api-key", ALICE]) == 0
        monkeypatch.setenv("CIFAR10_API_KEY", ALICE)
        assert cli(["predict", str(image), "--url", url]) == 0


def test_kubernetes_gateway_reads_keys_from_a_secret_it_can_see_updated(tmp_path: Path) -> None:
    from tests.deploy import manifests

    docs = manifests.render()
    deployment = manifests.find(docs, "Deployment", "gateway")
    container = next(c for c in manifests.containers(deployment) if c["name"] == "gateway")
    env = manifests.env_of(container)
    settings = Settings.from_env(env)  # the manifest's values are valid settings
    assert settings.api_keys_file is not None and settings.rate_limit, "keys and limits are on in k8s"
    keys_path = str(settings.api_keys_file)
    mounts = container["volumeMounts"]
    mount = next(m for m in mounts if keys_path.startswith(m["mountPath"].rstrip("/") + "/"))
    # A subPath mount never sees the kubelet's updates: rotation would need a restart.
    assert "subPath" not in mount and mount.get("readOnly") is True
    volume = next(v for v in manifests.pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
    secret = manifests.find(docs, "Secret", volume["secret"]["secretName"])
    file_name = keys_path[len(mount["mountPath"].rstrip("/")) + 1:]
    text = secret.get("stringData", {})[file_name]
    assert auth.parse_keys(text, "k8s/api-keys-secret.yaml") == {}  # shipped without keys: add yours
    # uid 10001 must be able to read it.
    assert volume["secret"].get("defaultMode", 0o644) & 0o004
