"""GRPCClient and the CLI over TLS: trust a server whose certificate the CA file vouches for, and no
other; present a client certificate to a server that requires one (mutual TLS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from client.cli import main
from client.grpc import GRPCClient
from client.results import ClientError
from tests.fixtures.tls import PKI, make_pki
from tests.tfserving_double import TFServingDouble

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_double(exported_model, pki: PKI) -> Iterator[TFServingDouble]:
    with TFServingDouble(exported_model.base_path, tls_key_and_cert=pki.server_key_and_cert()) as double:
        yield double


@pytest.fixture(scope="module")
def mtls_double(exported_model, pki: PKI) -> Iterator[TFServingDouble]:
    with TFServingDouble(
        exported_model.base_path,
        tls_key_and_cert=pki.server_key_and_cert(),
        tls_client_ca=pki.ca.read_bytes(),
    ) as double:
        yield double


def test_tls_with_the_right_ca_predicts(tls_double, pki, exported_model, sample_images):
    with GRPCClient(tls_double.address, exported_model.name, ca_file=pki.ca, timeout=20) as client:
        result = client.predict(sample_images[:2], use_bytes=True)
    assert result.model_version == exported_model.version and len(result.images) == 2


def test_tls_refuses_an_untrusted_or_plaintext_peer(tls_double, exported_model, sample_images):
    # System roots do not vouch for the test CA: the handshake fails, the call too.
    with GRPCClient(tls_double.address, exported_model.name, tls=True, timeout=5) as client:
        with pytest.raises(ClientError) as info:
            client.model_status()
    assert info.value.code == "unavailable" and "TLS handshake failed" in info.value.message
    with GRPCClient(tls_double.address, exported_model.name, timeout=5) as plaintext:
        with pytest.raises(ClientError) as info:
            plaintext.model_status()
    assert info.value.code == "unavailable"
    assert "--tls or --ca-file" in info.value.message  # says what to change, not only that it failed


def test_mutual_tls_needs_the_client_certificate(mtls_double, pki, exported_model, sample_images):
    with GRPCClient(
        mtls_double.address,
        exported_model.name,
        ca_file=pki.ca,
        cert_file=pki.client_cert,
        key_file=pki.client_key,
        timeout=20,
    ) as client:
        assert client.predict(sample_images[:1]).model_version == exported_model.version
    with GRPCClient(mtls_double.address, exported_model.name, ca_file=pki.ca, timeout=5) as client:
        with pytest.raises(ClientError) as info:
            client.model_status()
    assert info.value.code == "unavailable" and "--cert-file" in info.value.message


def test_cli_mutual_tls_flags(mtls_double, pki, exported_model, capsys):
    tls = ["--ca-file", str(pki.ca), "--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key)]
    assert main(["status", "--grpc", mtls_double.address, "--model", exported_model.name, *tls]) == 0
    assert f"{exported_model.version}" in capsys.readouterr().out
    code = main(["status", "--grpc", mtls_double.address, "--model", exported_model.name, "--cert-file",
                 str(pki.client_cert), "--ca-file", str(pki.ca)])  # fmt: skip
    assert code == 1
    assert "both a client certificate and its private key" in capsys.readouterr().err
