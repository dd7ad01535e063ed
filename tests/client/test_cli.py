"""`python -m client`: tables, JSON, exit codes and one-line failure reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from client.cli import main
from tests.fixtures.gateway import free_port

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def _error_lines(stderr: str) -> list[str]:
    # TensorFlow may log to stderr on import; the CLI's own reason is the line starting "error:".
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_predict_grpc_table_lists_every_image(tfserving_double, sample_images, capsys):
    code = main(["predict", *map(str, sample_images[:3]), "--grpc", tfserving_double.address, "--top-k", "2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"model {tfserving_double.model_name} version {tfserving_double.model_version}"
    rows = out[2:]
    assert [row.split()[0] for row in rows] == [p.name for p in sample_images[:3]]
    assert all(row.count("%") == 2 for row in rows)  # two labels with percentages per image


@pytest.mark.slow
def test_predict_json_is_the_same_through_gateway_and_grpc(
    gateway_server, tfserving_double, sample_images, capsys
):
    images = list(map(str, sample_images[:2]))
    assert main(["predict", *images, "--url", gateway_server, "--json", "--top-k", "1"]) == 0
    via_gateway = json.loads(capsys.readouterr().out)
    assert main(["predict", *images, "--grpc", tfserving_double.address, "--json", "--top-k", "1"]) == 0
    via_grpc = json.loads(capsys.readouterr().out)
    assert via_gateway["model"] == via_grpc["model"]
    for a, b in zip(via_gateway["predictions"], via_grpc["predictions"], strict=True):
        assert a["filename"] == b["filename"] and a["top_k"][0]["label"] == b["top_k"][0]["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


@pytest.mark.slow
def test_status_over_grpc_and_http(tfserving_double, gateway_server, capsys):
    assert main(["status", "--grpc", tfserving_double.address]) == 0
    out = capsys.readouterr().out
    assert f"model {tfserving_double.model_name}: ready" in out
    assert f"{tfserving_double.model_version}" in out and "AVAILABLE" in out
    assert main(["status", "--url", gateway_server, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ready"] is True and status["versions"][0]["state"] == "AVAILABLE"


@pytest.mark.slow
def test_status_of_unknown_model_fails_with_one_line(tfserving_double, capsys):
    assert main(["status", "--grpc", tfserving_double.address, "--model", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "[not_found]" in err[0]


def test_request_id_is_sent_by_both_transports(tfserving_double, gateway_server, tmp_path, capsys):
    """--request-id reaches TF Serving's metadata over gRPC and the gateway's error body over HTTP."""
    broken = tmp_path / "notes.png"
    broken.write_bytes(b"this is not an image")
    assert main(["predict", "--url", gateway_server, "--request-id", "cli-7", str(broken)]) == 1
    assert capsys.readouterr().err.strip().endswith("(request_id cli-7) [not_an_image]")
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(photo)
    assert main(["predict", "--grpc", tfserving_double.address, "--request-id", "cli-8", str(photo)]) == 0
    predicts = [c for c in tfserving_double.server.received if c.method.endswith("/Predict")]
    assert predicts[-1].metadata.get("x-request-id") == "cli-8"


def test_an_invalid_request_id_fails_with_one_line_naming_the_rule(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["predict", str(tmp_path / "a.png"), "--url", url, "--request-id", "no spaces please"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("[bad_request_id]") and "1..64 characters" in err and "\n" not in err


def test_missing_image_file_fails_with_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["predict", str(tmp_path / "missing.png"), "--url", url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {tmp_path / 'missing.png'} does not exist; pass the path of an image file [file_not_found]"
    ]


def test_bytes_without_grpc_is_a_usage_error(capsys):
    assert main(["predict", "x.png", "--bytes"]) == 2
    assert "--bytes needs --grpc" in capsys.readouterr().err


def test_url_and_grpc_together_are_refused():
    with pytest.raises(SystemExit) as info:
        main(["predict", "x.png", "--url", "http://a", "--grpc", "b:1"])
    assert info.value.code == 2


@pytest.mark.slow
def test_module_entry_point_exit_codes(tfserving_double, sample_images):
    unreachable = _run("predict", str(sample_images[0]), "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and unreachable.stdout == ""
    (reason,) = _error_lines(unreachable.stderr)
    assert "could not connect" in reason and "[connection_error]" in reason

    ok = _run("predict", str(sample_images[0]), "--grpc", tfserving_double.address, "--bytes", "--json")
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert body["model"]["name"] == tfserving_double.model_name
    assert body["predictions"][0]["filename"] == sample_images[0].name
