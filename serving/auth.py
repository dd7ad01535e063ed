"""Optional API keys for the gateway's /v1 API, hashed at rest and rotated without a restart.

Off unless GATEWAY_API_KEYS_FILE is set (`make serve` on 127.0.0.1 needs no key). When it is set,
every /v1 request except the spec (/v1/openapi.json) must carry a key, as
`Authorization: Bearer KEY` or `X-API-Key: KEY`; a missing or unknown key gets 401 with
`WWW-Authenticate: Bearer`. The page (/, /static), /openapi.yaml and the probes stay open.

The keys file holds one key per line as `NAME:SHA256HEX` (the hex SHA-256 of the key's UTF-8 bytes);
blank lines and lines starting with `#` are ignored. NAME (letters, digits, `.`, `_`, `-`, at most
64) labels the key in logs and metrics; several lines may share a name (old and new key of a client
during a rotation). `python -m serving.auth new-key NAME` mints a key and prints its line.

Why SHA-256 and not bcrypt or argon2: those are slow on purpose, to protect low-entropy passwords
from guessing. Keys minted here are 32 random bytes (256 bits), which no guessing can reach, so a
fast hash loses nothing, and it must be fast: it runs on every request (bcrypt would add about 100 ms
of CPU to each). A leaked keys file therefore gives away no usable key; it is still kept in a
Secret, because it names the clients.

Rotation: the file is stat()ed on each request (microseconds) and re-read when its inode, mtime or
size changes. Kubernetes updates a mounted Secret by swapping a `..data` symlink to a new directory
atomically, so the path then resolves to a new inode; an edit in place changes the mtime. A reload
that finds a malformed file keeps the keys it had (and logs why): a typo must not lock every client
out. A file with no keys is valid and refuses every /v1 request (revoking all keys).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from flask import Flask, Response, g, request

from serving import metrics, ratelimit
from serving.config import ConfigError, Settings
from serving.errors import GatewayError

log = logging.getLogger(__name__)

EXTENSION_KEY = "gateway.api_keys"
KEY_PREFIX = "c10_"  # makes a leaked key easy to recognise (secret scanners, logs)
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
# The machine-readable spec documents the key itself, so a client can read it without one.
PUBLIC_API_PATHS = frozenset({"/v1/openapi.json"})
REALM = "cifar10-gateway"


class KeyFileError(ValueError):
    """The keys file is malformed; the message names the file, the line and the fix."""


def hash_key(key: str) -> str:
    """The hex SHA-256 of `key`, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: the prefix and 32 random bytes, URL-safe base64 (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_keys(text: str, source: str) -> dict[str, str]:
    """{sha256 hex: name} from the keys file's text; KeyFileError names the first bad line."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, digest = (part.strip() for part in line.partition(":"))
        digest = digest.lower()
        if not NAME_PATTERN.fullmatch(name) or not HASH_PATTERN.fullmatch(digest):
            # The line is not echoed: someone may have pasted a key instead of its hash.
            raise KeyFileError(
                f"{source} line {number} is not `NAME:SHA256HEX` (NAME of letters, digits, '.', '_', '-'; "
                "64 hex digits after the colon); make the line with `python -m serving.auth new-key NAME`"
            )
        if digest in keys and keys[digest] != name:
            raise KeyFileError(f"{source} line {number}: the same key hash is listed under two names")
        keys[digest] = name
    return keys


class KeyStore:
    """The keys of one file, re-read when the file changes (checked on each lookup)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, ...] | None = None
        self._keys: dict[str, str] = {}
        try:
            self._load()
        except (OSError, KeyFileError, UnicodeDecodeError) as error:
            raise ConfigError(f"GATEWAY_API_KEYS_FILE={str(path)!r} cannot be used: {error}") from None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._keys.values())

    def _stat_signature(self, st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> None:
        # fstat the file that is read, so the signature and the keys always belong together even
        # when the file is swapped between the two calls.
        with self.path.open("rb") as f:
            signature = self._stat_signature(os.fstat(f.fileno()))
            text = f.read().decode("utf-8")
        keys = parse_keys(text, str(self.path))
        self._keys, self._signature = keys, signature
        if not keys:
            log.warning(
                "GATEWAY_API_KEYS_FILE %s holds no keys: every /v1 request is refused with 401; add a line "
                "made by `python -m serving.auth new-key NAME`",
                self.path,
            )
        else:
            log.info("API keys loaded from %s: %d keys, names %s", self.path, len(keys), sorted(self.names))

    def refresh(self) -> None:
        """Re-read the file when it changed since the last read; keep the old keys if it is bad."""
        try:
            signature = self._stat_signature(os.stat(self.path))  # follows the Secret's symlinks
        except OSError as error:
            # Mid-swap or unmounted: keep serving with the keys we have; the next request retries.
            log.warning("API keys file %s cannot be read (%s); keeping the %d keys loaded before",
                        self.path, error, len(self._keys))
            return
        if signature == self._signature:
            return
        with self._lock:
            if signature == self._signature:  # another thread reloaded it meanwhile
                return
            try:
                self._load()
            except (OSError, KeyFileError, UnicodeDecodeError) as error:
                # Remember the bad version so it is not re-parsed on every request; a fix changes it.
                self._signature = signature
                metrics.API_KEY_RELOADS.labels(result="error").inc()
                log.error("API keys file %s was not reloaded, keeping the %d keys loaded before: %s",
                          self.path, len(self._keys), error)
                return
            metrics.API_KEY_RELOADS.labels(result="ok").inc()

    def name_for(self, key: str) -> str | None:
        """The name of `key`, or None when it is not (or no longer) listed."""
        self.refresh()
        return self._keys.get(hash_key(key))


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key the request carries: `Authorization: Bearer KEY`, else `X-API-Key: KEY`."""
    authorization = headers.get("Authorization", "")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = headers.get("X-API-Key", "").strip()
    return key or None


def is_api_path(path: str) -> bool:
    """Paths that need a key (when keys are on) and count against the rate limits."""
    return path.startswith("/v1/") and path not in PUBLIC_API_PATHS


def install(app: Flask, settings: Settings) -> None:
    """API keys (GATEWAY_API_KEYS_FILE), then rate limits (GATEWAY_RATE_LIMIT), on `app`.

    Three request steps, in this order: identify the key (no refusal yet), apply the rate limit
    keyed on that identity (the key's name, else the client address, so floods of bad keys are
    limited too), then refuse a missing or unknown key with 401.
    """
    store = KeyStore(settings.api_keys_file) if settings.api_keys_file else None
    app.extensions[EXTENSION_KEY] = store

    @app.before_request
    def _identify() -> None:
        g.api_key_name = None
        g.auth_failure = None
        if store is None or not is_api_path(request.path):
            return
        key = presented_key(request.headers)
        if key is None:
            g.auth_failure = "missing"
            return
        g.api_key_name = store.name_for(key)
        if g.api_key_name is None:
            g.auth_failure = "invalid"

    ratelimit.install(app, settings, applies=lambda: is_api_path(request.path))

    @app.before_request
    def _enforce() -> None:
        failure = g.get("auth_failure")
        if failure is None:
            return
        metrics.AUTH_FAILURES.labels(reason=failure).inc()
        if failure == "missing":
            raise GatewayError(
                401,
                "missing_api_key",
                "this API needs a key: send it as `Authorization: Bearer KEY` or `X-API-Key: KEY` "
                "(the gateway's operator issues keys)",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        raise GatewayError(
            401,
            "invalid_api_key",
            "the API key is not valid (mistyped, revoked or for another gateway); "
            "check the key you send or ask the gateway's operator for a new one",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
        )

    @app.after_request
    def _count(response: Response) -> Response:
        name = g.get("api_key_name")
        if name is not None:
            metrics.API_KEY_REQUESTS.labels(key_name=name, status=str(response.status_code)).inc()
        return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.auth", description="Mint API keys for the gateway's keys file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser(
        "new-key", help="print a new key (line 1) and its keys-file line NAME:SHA256HEX (line 2)"
    )
    mint.add_argument("name", help="the client's name in logs and metrics (letters, digits, . _ -)")
    hash_cmd = commands.add_parser("hash", help="print the keys-file line of a key read from stdin")
    hash_cmd.add_argument("name")
    args = parser.parse_args(argv)
    if not NAME_PATTERN.fullmatch(args.name):
        parser.error(f"NAME {args.name!r} must be 1 to 64 letters, digits, '.', '_' or '-'")
    if args.command == "new-key":
        key = new_key()
        print("Give line 1 to the client (it is shown only once); add line 2 to GATEWAY_API_KEYS_FILE.",
              file=sys.stderr)
        print(key)
    else:
        key = sys.stdin.readline().strip()
        if not key:
            parser.error("no key on stdin")
    print(f"{args.name}:{hash_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
