"""Reading image files for the clients: raw bytes for servers that decode, pixels for those that don't.

The pixel path decodes exactly as the gateway does (serving/images.py): EXIF orientation applied,
any mode turned into 8-bit RGB with transparency composited on white, then the shared resize. Both
import these steps from contract/preprocess.py, which needs only Pillow and NumPy (no Flask).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from client.results import ClientError
from contract.preprocess import decode_to_model_input

ImageInput = str | Path | tuple[str, bytes]  # a file path, or (filename, encoded bytes)


def read_image(image: ImageInput) -> tuple[str, bytes]:
    """(filename, encoded bytes) of a path or of an already-read (filename, bytes) pair."""
    if isinstance(image, tuple):
        return image
    path = Path(image)
    try:
        return path.name, path.read_bytes()
    except FileNotFoundError:
        raise ClientError(
            "file_not_found", f"{path} does not exist; pass the path of an image file"
        ) from None
    except IsADirectoryError:
        raise ClientError("not_a_file", f"{path} is a directory; pass image files, not folders") from None
    except OSError as error:
        raise ClientError("unreadable_file", f"{path} cannot be read: {error.strerror}") from None


def to_pixels(filename: str, data: bytes) -> np.ndarray:
    """Encoded image -> uint8 [32, 32, 3], the pixels the gateway would feed the model."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return decode_to_model_input(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ClientError(
            "not_an_image",
            f"{filename!r} cannot be decoded as an image ({error}); pass a JPEG, PNG, GIF or BMP",
        ) from None
