"""The admin port's settings and the gateway's split of routes between the ports (serving/admin.py).
Under real gunicorn and nginx the split is drilled in tests/drills/test_slow_clients.py."""

from __future__ import annotations

import pytest

from serving.config import ConfigError, Settings


def test_admin_bind_and_client_timeouts_are_read_from_the_environment() -> None:
    settings = Settings.from_env({
        "GATEWAY_ADMIN_BIND": "0.0.0.0:9090",
        "GATEWAY_CLIENT_HEADER_TIMEOUT_S": "4",
        "GATEWAY_CLIENT_BODY_TIMEOUT_S": "2.5",
        "GATEWAY_CLIENT_SEND_TIMEOUT_S": "7",
    })  # fmt: skip
    assert settings.admin_bind == "0.0.0.0:9090" and settings.admin_port == 9090
    assert (settings.client_header_timeout_s, settings.client_body_timeout_s) == (4.0, 2.5)
    assert settings.client_send_timeout_s == 7.0
    default = Settings.from_env({})
    assert default.admin_bind is None and default.admin_port is None
    assert default.client_header_timeout_s == 10.0


@pytest.mark.parametrize("value", ["9090", ":9090", "localhost:http", "127.0.0.1:0", "127.0.0.1:70000"])
def test_a_bad_admin_bind_names_the_variable_and_the_form(value: str) -> None:
    with pytest.raises(ConfigError, match=r"GATEWAY_ADMIN_BIND=.*host:port.*127\.0\.0\.1:9090"):
        Settings.from_env({"GATEWAY_ADMIN_BIND": value})


@pytest.mark.parametrize("name", ["GATEWAY_CLIENT_HEADER_TIMEOUT_S", "GATEWAY_CLIENT_BODY_TIMEOUT_S"])
@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_client_timeout_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.slow
def test_admin_routes_answer_on_the_admin_port_only(exported_model) -> None:
    from serving.app import create_app

    settings = Settings(
        model_base_path=exported_model.base_path,
        model_name=exported_model.name,
        poll_interval_s=60,
        admin_bind="127.0.0.1:9090",
    )
    app = create_app(settings)
    try:
        client = app.test_client()

        def public(path: str):  # the test client's SERVER_PORT comes from base_url
            return client.get(path, base_url="http://localhost:8080")

        def admin(path: str):
            return client.get(path, base_url="http://localhost:9090")

        for path in ("/metrics", "/readyz"):
            answer = public(path)
            assert answer.status_code == 404 and answer.json["error"]["code"] == "not_found", path
            assert admin(path).status_code == 200, path
        assert public("/healthz").status_code == 200 and admin("/healthz").status_code == 200
        # The API and the page are not on the admin port.
        assert admin("/v1/models").status_code == 404 and admin("/").status_code == 404
        assert public("/v1/models").status_code == 200
    finally:
        app.extensions["gateway.backend"].close()
