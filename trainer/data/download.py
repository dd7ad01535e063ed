"""Fetch a file once into a cache directory, verified by MD5, never half-written under its name.

The bytes stream into `<name>.part` beside the destination; only a complete file whose MD5
matches is renamed (atomically, `os.replace`) to `<name>`. So a killed download leaves at most a
`.part` file, which never counts as valid: the next attempt resumes it with an HTTP Range
request (or starts over when the server ignores ranges). A file lock keeps two processes that
share a cache from writing the same `.part` at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.data.errors import DataError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per read while streaming and hashing
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def md5_of(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Return `dest`, downloading it from `url` first unless a copy with this `md5` is there.

    Raises DataError (naming the file or URL and what to do) when the server fails, the
    transfer stops early or the bytes do not hash to `md5`.
    """
    md5 = md5.lower()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if dest.exists():
            actual = md5_of(dest)
            if actual != md5:
                raise DataError(
                    f"cached file {dest} has MD5 {actual}, expected {md5}: it was changed or damaged "
                    f"after download. Delete {dest} and re-run to download it again."
                )
            logger.info("using cached %s (MD5 verified)", dest)
            return dest
        part = dest.with_name(dest.name + ".part")
        _download(url, part, timeout)
        actual = md5_of(part)
        if actual != md5:
            part.unlink()  # a wrong file must not be resumed from or mistaken for progress
            raise DataError(
                f"download from {url} has MD5 {actual}, expected {md5}: the transfer was corrupted "
                f"or the URL serves a different file. Nothing was kept; re-run to download again, or "
                f"download the archive yourself and pass its folder with --data-dir."
            )
        os.replace(part, dest)
        logger.info("downloaded %s (MD5 verified)", dest)
        return dest


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    lock_path = dest.with_name(dest.name + ".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(url: str, part: Path, timeout: float) -> None:
    """Stream `url` into `part`, resuming from its current size when the server allows."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cifar10-service-trainer"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # an http(s) URL by design
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # The partial file is not a prefix the server can continue: start over.
            part.unlink()
            return _download(url, part, timeout)
        raise DataError(
            f"downloading {url} failed: the server answered HTTP {err.code} {err.reason}. "
            f"Try again later, or download the archive yourself and pass it with --data-dir."
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"cannot reach {url}: {reason}. Check the network or proxy settings, or download the "
            f"archive yourself and pass it with --data-dir."
        ) from None

    with response:
        mode, start = "wb", 0
        if offset and response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                mode, start = "ab", offset
        if offset and mode == "wb":
            logger.info("server did not resume %s; downloading it from the start", url)
        elif offset:
            logger.info("resuming %s from byte %d", url, offset)
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = _stream(response, part, mode, start, expected, url)
    if expected is not None and received < expected:
        raise DataError(
            f"download of {url} stopped after {start + received} of {start + expected} bytes. "
            f"The partial file {part} is kept and is not used; re-run to resume the download."
        )


def _stream(
    response: http.client.HTTPResponse, part: Path, mode: str, start: int, expected: int | None, url: str
) -> int:
    """Copy the body into `part`, logging progress; returns the number of bytes received."""
    received, last_log = 0, time.monotonic()
    with part.open(mode) as out:
        while True:
            try:
                # read1: whatever has arrived (up to a chunk), so a slow link still makes progress on
                # disk that a later attempt can resume from.
                block = response.read1(_CHUNK)
            except (http.client.IncompleteRead, OSError) as err:
                logger.warning("connection to %s broke: %s", url, err)
                break
            if not block:
                break
            out.write(block)
            received += len(block)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                total = f" of {start + expected}" if expected is not None else ""
                logger.info("downloaded %d%s bytes of %s", start + received, total, url)
        out.flush()
        os.fsync(out.fileno())  # the bytes are on disk before anything renames the file
    return received
