"""LiteRT conversions kept on local disk, so a version is converted once per machine, not once per
worker and again after every worker restart.

Why: converting the default model takes ~2.5 s of CPU and leaves ~75 MiB of the converter's heap in
the worker that ran it (docs/deploy.md, "The embedded model's runtime"); with 2 workers both convert
the same version at start-up, and each restart (a crash, max_requests) converts again.

An entry is named by what its flatbuffer depends on: every file of the version directory (a
republished version with other weights gets another key), the signature's name, the converter
(TensorFlow's version) and CACHE_FORMAT (the conversion's options). It is only ever a shortcut: the
caller checks a cached flatbuffer on the probe images exactly like a fresh one, and one that fails
(a truncated file, a damaged disk) is discarded and converted again.

Workers share entries through an exclusive lock per key (flock): the first converts and writes, the
others wait and read. Entries are written to a temporary name and renamed, so a reader never sees
half a file. The directory must belong to this user and not be writable by others (a flatbuffer
is parsed by native code); otherwise the cache is not used, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; workers may then convert the same version at once
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when convert()'s options change: old entries are then never read
KEEP_ENTRIES = 8  # the most recently used entries kept; a version's is ~4.6 MiB (default model)
SUFFIX = ".tflite"
NOTE_SUFFIX = ".race"  # beside an entry: its runtime race (litert.race), with the CPU it ran on


def default_cache_dir() -> Path:
    """Per user in the temporary directory: /tmp/cifar10-gateway-litert-<uid> on Linux."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"cifar10-gateway-litert-{uid}"


def cache_key(version_dir: Path, signature_name: str) -> str:
    """sha256 over the version directory's files (relative path and bytes), the signature's name,
    TensorFlow's version and CACHE_FORMAT."""
    import tensorflow as tf

    digest = hashlib.sha256(f"format {CACHE_FORMAT}\0tf {tf.__version__}\0{signature_name}\0".encode())
    root = Path(version_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class ConversionCache:
    """Flatbuffers by key in `directory` (created 0700 when missing). `usable` is False, and every
    method a no-op, when the directory cannot be made safe; `problem` then says why."""

    def __init__(self, directory: Path, keep: int = KEEP_ENTRIES) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.problem = _unsafe(self.directory)
        if self.problem:
            log.warning("LiteRT conversions are not cached: %s", self.problem)

    @property
    def usable(self) -> bool:
        return not self.problem

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold `key`'s lock: one worker converts a version while the others wait for its entry.
        The directory is checked again first: a temporary-file cleaner may have removed it since
        (it is then made again), or someone replaced it (then the cache is not used)."""
        problem = _unsafe(self.directory)
        if problem != self.problem:
            self.problem = problem
            if problem:
                log.warning("LiteRT conversions are not cached: %s", problem)
        lock = None
        if self.usable and fcntl is not None:
            try:
                lock = open(self.directory / f"{key}.lock", "a")  # closed below
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            except OSError as error:
                log.warning("no lock for a LiteRT conversion in %s (%s)", self.directory, error)
                if lock is not None:
                    lock.close()
                lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.close()

    def read(self, key: str) -> bytes | None:
        if not self.usable:
            return None
        path = self.directory / f"{key}{SUFFIX}"
        try:
            flatbuffer = path.read_bytes()
            os.utime(path)  # recently used: pruned last
        except OSError:
            return None
        return flatbuffer

    def write(self, key: str, flatbuffer: bytes) -> None:
        """Store an entry (atomically) and prune the least recently used beyond `keep`; a failure
        to write (a full disk) only costs the next worker a conversion."""
        if self._write_atomic(f"{key}{SUFFIX}", flatbuffer):
            self._prune()

    def read_note(self, key: str) -> str | None:
        """The small text kept beside `key`'s entry (write_note), or None."""
        if not self.usable:
            return None
        try:
            return (self.directory / f"{key}{NOTE_SUFFIX}").read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def write_note(self, key: str, text: str) -> None:
        """Keep `text` beside `key`'s entry (atomically; pruned with it)."""
        self._write_atomic(f"{key}{NOTE_SUFFIX}", text.encode())

    def _write_atomic(self, name: str, data: bytes) -> bool:
        """`data` as `name`, through a temporary file and a rename (a reader never sees half of it);
        False, with a warning, when it could not be written."""
        if not self.usable:
            return False
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name[:16]}-", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.directory / name)
        except OSError as error:
            log.warning("could not write %s in %s: %s", name, self.directory, error)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return False
        return True

    def discard(self, key: str) -> None:
        if self.usable:
            with contextlib.suppress(OSError):
                os.unlink(self.directory / f"{key}{SUFFIX}")

    def _prune(self) -> None:
        entries = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                entries.append((path.stat().st_mtime, path))
        for _, path in sorted(entries, reverse=True)[self.keep :]:
            with contextlib.suppress(OSError):
                path.unlink()
            for suffix in (NOTE_SUFFIX, ".lock"):
                with contextlib.suppress(OSError):
                    path.with_suffix(suffix).unlink()


def _unsafe(directory: Path) -> str:
    """"" when `directory` exists (made here, 0700, if missing), is a directory of this user and is
    writable by nobody else; else what is wrong with it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(directory)
    except FileExistsError:  # a file of that name
        return f"{directory} is not a directory"
    except OSError as error:
        return f"{directory} cannot be created ({error.strerror})"
    if not stat.S_ISDIR(info.st_mode):  # also a symbolic link: not followed
        return f"{directory} is not a directory"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{directory} belongs to another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{directory} is writable by other users (chmod 700 it)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable"
    return ""
