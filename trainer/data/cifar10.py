"""CIFAR-10: find or download the official archive and read its batches.

Sources, in the order `load` looks for them:
  * `data_dir` given: a .tar.gz (binary or python format), a cifar-10-batches-bin or
    cifar-10-batches-py folder, or a folder holding one of those;
  * otherwise the official binary archive, downloaded once into `cache_dir` and verified by
    its published MD5 (see download.py).
The binary format is preferred: it is decoded with numpy and never unpickled. Python batches go
through a restricted unpickler (cifar10_pickle.py).
"""

from __future__ import annotations

import logging
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainer.data import cifar10_binary, cifar10_pickle
from trainer.data.download import fetch
from trainer.data.errors import DataError
from trainer.data.raw import RawSplits

logger = logging.getLogger(__name__)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
BINARY_DIR, PYTHON_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
NUM_TRAIN_BATCHES = 5


def default_cache_dir() -> Path:
    """$CIFAR10_CACHE, else $XDG_CACHE_HOME/cifar10-service, else ~/.cache/cifar10-service."""
    if "CIFAR10_CACHE" in os.environ:
        return Path(os.environ["CIFAR10_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar10-service"


def load(
    *,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    url: str | None = None,
    md5: str | None = None,
) -> RawSplits:
    """Train (50,000) and test (10,000) images of CIFAR-10 from a local copy or the download.

    `url`/`md5`: where to download from and the archive's MD5 (defaults: the official ones);
    a mirror of the official archive needs only `url`.
    """
    if data_dir is not None:
        return _load_local(Path(data_dir))
    archive = fetch(
        url or OFFICIAL_URL, Path(cache_dir or default_cache_dir()) / ARCHIVE_NAME, md5 or OFFICIAL_MD5
    )
    return _load_archive(archive, source=url or OFFICIAL_URL)


def _load_local(path: Path) -> RawSplits:
    if path.is_file():
        return _load_archive(path, source=str(path))
    if not path.is_dir():
        raise DataError(
            f"--data-dir {path} does not exist; pass the CIFAR-10 archive or its extracted folder"
        )
    for folder in (path, path / BINARY_DIR, path / PYTHON_DIR):
        if (folder / "data_batch_1.bin").is_file():
            return _read_batches(_folder_reader(folder), binary=True, source=str(folder))
        if (folder / "data_batch_1").is_file():
            return _read_batches(_folder_reader(folder), binary=False, source=str(folder))
    for name in (ARCHIVE_NAME, "cifar-10-python.tar.gz"):
        if (path / name).is_file():
            return _load_archive(path / name, source=str(path / name))
    raise DataError(
        f"--data-dir {path} holds no CIFAR-10 data: expected {ARCHIVE_NAME} (or cifar-10-python.tar.gz), "
        f"or an extracted {BINARY_DIR}/ or {PYTHON_DIR}/ folder with data_batch_1..5 and test_batch."
    )


def _folder_reader(folder: Path) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise DataError(
                f"{path} is missing; the extracted CIFAR-10 folder is incomplete. Extract it again."
            )
        return path.read_bytes()

    return read


def _load_archive(archive: Path, source: str) -> RawSplits:
    """Read the batches straight from the tar.gz members (nothing is extracted to disk)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            binary = any(name.startswith(BINARY_DIR + "/") for name in members)
            prefix = BINARY_DIR if binary else PYTHON_DIR

            def read(name: str) -> bytes:
                member = members.get(f"{prefix}/{name}")
                if member is None:
                    raise DataError(
                        f"{archive} has no member {prefix}/{name}; it is not the official CIFAR-10 archive. "
                        f"Delete it and re-run to download again."
                    )
                handle = tar.extractfile(member)
                assert handle is not None  # regular files always have a handle
                return handle.read()

            if not binary and not any(name.startswith(PYTHON_DIR + "/") for name in members):
                raise DataError(
                    f"{archive} holds neither {BINARY_DIR}/ nor {PYTHON_DIR}/; it is not a CIFAR-10 archive."
                )
            return _read_batches(read, binary=binary, source=source, where=f"{archive}:{prefix}/")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"{archive} is not a readable .tar.gz ({type(err).__name__}: {err}); it is truncated or "
            f"damaged. Delete {archive} and re-run to download it again."
        ) from None


def _read_batches(read: Callable[[str], bytes], *, binary: bool, source: str, where: str = "") -> RawSplits:
    """Decode the five training batches and the test batch through `read(member_name)`."""
    if not where:
        where = source.rstrip("/") + "/"
    suffix = ".bin" if binary else ""
    if binary:
        class_names = cifar10_binary.decode_meta(read("batches.meta.txt"), where + "batches.meta.txt")
        decode = cifar10_binary.decode_records
    else:
        class_names = cifar10_pickle.decode_meta(read("batches.meta"), where + "batches.meta")
        decode = cifar10_pickle.decode_batch

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        return decode(read(name + suffix), where + name + suffix, len(class_names))

    train = [batch(f"data_batch_{i}") for i in range(1, NUM_TRAIN_BATCHES + 1)]
    x_test, y_test = batch("test_batch")
    logger.info("read CIFAR-10 (%s format) from %s", "binary" if binary else "python", source)
    return RawSplits(
        class_names=class_names,
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        source=source,
        notes={"format": "binary" if binary else "python"},
    )
