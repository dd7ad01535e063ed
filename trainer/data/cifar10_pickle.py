"""The CIFAR-10 python format, read without trusting the pickle.

The python batches are pickled dicts: b"data" a uint8 numpy array [N, 3072] (channel-major like
the binary format), b"labels" a list of ints; batches.meta holds b"label_names". Unpickling
can run arbitrary code, so `RestrictedUnpickler` resolves only the numpy globals that an array
needs and refuses every other global (os.system, builtins.eval, ...). Dicts, lists, bytes and
ints need no globals at all.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from trainer.data.errors import DataError

try:  # numpy >= 2 moved the implementation; pickles written by numpy 1 still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

PIXEL_BYTES = 3072

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list (it would run other code)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that can rebuild plain numpy arrays and nothing that calls other code."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"global {module}.{name} is not allowed") from None


def restricted_loads(data: bytes, where: str) -> object:
    """Unpickle `data` with `RestrictedUnpickler`; any failure is a DataError naming `where`."""
    try:
        # encoding="bytes": the official batches were written by Python 2, whose str keys come
        # back as bytes (b"data", b"labels") and whose array buffers stay raw bytes.
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ForbiddenGlobal as err:
        raise DataError(
            f"{where}: refused to unpickle ({err}); a CIFAR-10 python batch holds only a dict of "
            f"numpy arrays, lists and bytes. The file is not a genuine CIFAR-10 batch: delete it and "
            f"use the official archive."
        ) from None
    except Exception as err:  # truncated or garbage pickles raise many types (EOFError, ValueError...)
        raise DataError(
            f"{where}: cannot read the python batch ({type(err).__name__}: {err}); the file is "
            f"truncated or damaged. Delete it and re-run to download again."
        ) from None


def _field(batch: dict, key: bytes, where: str) -> object:
    if key in batch:
        return batch[key]
    text_key = key.decode()
    if text_key in batch:  # batches re-pickled by Python 3 have str keys
        return batch[text_key]
    raise DataError(f"{where}: the batch has no {key!r} entry (keys: {sorted(map(repr, batch))[:8]})")


def decode_batch(data: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of a python batch -> (uint8 [N,32,32,3] RGB, int32 [N] labels)."""
    batch = restricted_loads(data, where)
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a dict batch, found {type(batch).__name__}")
    pixels = _field(batch, b"data", where)
    labels = _field(batch, b"labels", where)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise DataError(
            f"{where}: b'data' must be a uint8 array [N, {PIXEL_BYTES}], found {_describe(pixels)}"
        )
    if pixels.shape[1] != PIXEL_BYTES:
        raise DataError(f"{where}: b'data' rows must hold {PIXEL_BYTES} bytes, found shape {pixels.shape}")
    if not isinstance(labels, list | np.ndarray) or not all(isinstance(v, int | np.integer) for v in labels):
        raise DataError(f"{where}: b'labels' must be a list of class indices, found {_describe(labels)}")
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(pixels):
        raise DataError(f"{where}: {len(pixels)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{where}: labels must be in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}"
        )
    x = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return x, y.astype(np.int32)


def decode_meta(data: bytes, where: str) -> tuple[str, ...]:
    """Class names from the python batches.meta pickle (b"label_names")."""
    meta = restricted_loads(data, where)
    if not isinstance(meta, dict):
        raise DataError(f"{where}: expected a dict, found {type(meta).__name__}")
    names = _field(meta, b"label_names", where)
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(
            f"{where}: b'label_names' must be a non-empty list of names, found {_describe(names)}"
        )
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array {value.dtype} {value.shape}"
    return type(value).__name__
