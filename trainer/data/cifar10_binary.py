"""The CIFAR-10 binary format: fixed 3073-byte records, decoded with numpy, nothing unpickled.

Each record is 1 label byte followed by 3072 pixel bytes: the 1024 red values of the 32x32 image
row by row, then the 1024 green, then the 1024 blue (channel-major). Class names are the
non-empty lines of batches.meta.txt.
"""

from __future__ import annotations

import numpy as np

from trainer.data.errors import DataError

IMAGE_SIZE = 32
PIXEL_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE
RECORD_BYTES = 1 + PIXEL_BYTES


def decode_records(data: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of a binary batch -> (uint8 [N,32,32,3] RGB, int32 [N] labels).

    `where` names the file for error messages (e.g. "archive.tar.gz:cifar-10-batches-bin/x.bin").
    """
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise DataError(
            f"{where}: expected {RECORD_BYTES}-byte records, but the file size {len(data)} is not a "
            f"positive multiple of {RECORD_BYTES}; the file is truncated or not a CIFAR-10 binary "
            f"batch. Delete it and re-run to download again."
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(
            f"{where}: record {int(bad[0])} has label {int(labels[bad[0]])}, but there are only "
            f"{num_classes} classes; the file is damaged. Delete it and re-run to download again."
        )
    # [N, C, H, W] channel-major -> [N, H, W, C]; the copy makes it contiguous and independent
    # of the (read-only) input buffer.
    pixels = records[:, 1:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1).copy()
    return pixels, labels


def encode_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The inverse of `decode_records`: uint8 [N,32,32,3] RGB and labels -> binary batch bytes."""
    images = np.asarray(images, dtype=np.uint8)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or len(images) != len(labels):
        raise ValueError(f"expected images [N,32,32,3] and N labels, got {images.shape} and {len(labels)}")
    records = np.empty((len(images), RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = np.asarray(labels, dtype=np.uint8)
    records[:, 1:] = images.transpose(0, 3, 1, 2).reshape(len(images), PIXEL_BYTES)
    return records.tobytes()


def decode_meta(data: bytes, where: str) -> tuple[str, ...]:
    """Class names from batches.meta.txt (one per line, blank lines ignored)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"{where}: class-name file is not text; the archive is damaged. Delete it and re-run."
        ) from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names or len(set(names)) != len(names) or len(names) > 256:
        raise DataError(f"{where}: expected distinct class names, one per line; found {list(names)[:12]}")
    return names
