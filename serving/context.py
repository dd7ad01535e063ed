"""The gateway's settings and model backend, for the request being handled.

create_app() installs them once per process on the Flask app; views and the request steps read
them through here rather than by their extension keys.
"""

from __future__ import annotations

from flask import Flask, current_app

from serving.backends.base import Backend
from serving.config import Settings

SETTINGS_KEY = "gateway.settings"
BACKEND_KEY = "gateway.backend"  # tests reach the backend through app.extensions[BACKEND_KEY] too


def install(app: Flask, settings: Settings, backend: Backend) -> None:
    app.extensions[SETTINGS_KEY] = settings
    app.extensions[BACKEND_KEY] = backend


def settings() -> Settings:
    return current_app.extensions[SETTINGS_KEY]


def backend() -> Backend:
    return current_app.extensions[BACKEND_KEY]
