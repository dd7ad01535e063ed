"""GRPCClient over TLS: trusts a server whose certificate its CA file vouches for, and no other."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.grpc import GRPCClient
from client.results import ClientError
from tests.tfserving_double import TFServingDouble

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with the openssl command."""
    out = tmp_path_factory.mktemp("tls")
    key, cert = out / "key.pem", out / "cert.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ]
            + [
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
    except FileNotFoundError:
        pytest.skip("the openssl command is not installed")
    return key, cert


@pytest.fixture(scope="module")
def tls_double(exported_model, certificate) -> Iterator[TFServingDouble]:
    key, cert = certificate
    with TFServingDouble(
        exported_model.base_path, tls_key_and_cert=(key.read_bytes(), cert.read_bytes())
    ) as double:
        yield double


def test_tls_with_the_right_ca_predicts(tls_double, certificate, exported_model, sample_images):
    with GRPCClient(tls_double.address, exported_model.name, ca_file=certificate[1], timeout=20) as client:
        result = client.predict(sample_images[:2], use_bytes=True)
    assert result.model_version == exported_model.version and len(result.images) == 2


def test_tls_refuses_an_untrusted_or_plaintext_peer(tls_double, exported_model, sample_images):
    # System roots do not vouch for a self-signed certificate: the handshake fails, the call too.
    with GRPCClient(tls_double.address, exported_model.name, tls=True, timeout=5) as client:
        with pytest.raises(ClientError) as info:
            client.model_status()
    assert info.value.code == "unavailable"
    with GRPCClient(tls_double.address, exported_model.name, timeout=5) as plaintext:
        with pytest.raises(ClientError) as info:
            plaintext.model_status()
    assert info.value.code == "unavailable"
