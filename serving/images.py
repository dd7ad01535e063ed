"""Upload bytes -> RGB Pillow image, refusing what should not be decoded.

Status codes (documented in serving/openapi.yaml):
  * 400 `empty_file`: zero bytes;
  * 400 `not_an_image`: Pillow recognises no image format in the bytes;
  * 415 `unsupported_format`: a real image, but in a format the model contract does not promise
    (the exported `serving_bytes` signature takes JPEG/PNG/GIF/BMP, so the gateway takes the same);
  * 413 `image_too_many_pixels`: the header declares more pixels than the limit; refused before
    any pixel is decoded, so a decompression bomb costs nothing;
  * 413 `image_side_too_long`: a side over MAX_SIDE (65535) pixels, which the exported bytes
    signature refuses too;
  * 400 `truncated_image`: the header is fine but the pixel data is cut short or corrupt.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from contract.preprocess import to_rgb, upright
from contract.signatures import MAX_SIDE
from serving.errors import GatewayError

# The formats the exported bytes signature decodes too (docs/architecture.md).
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")


def decode_image(data: bytes, *, filename: str, max_pixels: int) -> Image.Image:
    """Decode one uploaded image to an 8-bit RGB image with EXIF orientation applied."""
    if not data:
        raise GatewayError(
            400, "empty_file", f"{filename!r} is empty (0 bytes); upload the image file itself"
        )
    try:
        # open() reads only the header; pixels are decoded by load() below, after the size check.
        # Pillow's own bomb guard warns (or raises) on huge images; our limit is the one that applies.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_many_pixels(filename, None, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise GatewayError(
            400,
            "not_an_image",
            f"{filename!r} is not an image Pillow can read; upload a JPEG, PNG, GIF or BMP file",
        ) from None
    if image.format not in SUPPORTED_FORMATS:
        raise GatewayError(
            415,
            "unsupported_format",
            f"{filename!r} is a {image.format} image; supported formats are {', '.join(SUPPORTED_FORMATS)}: "
            "convert it to one of them",
        )
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(filename, (width, height), max_pixels)
    if max(width, height) > MAX_SIDE:
        raise GatewayError(
            413,
            "image_side_too_long",
            f"{filename!r} declares {width}x{height} pixels, a side over the limit of {MAX_SIDE}; "
            "crop or downscale it before uploading (the model sees 32x32 anyway)",
        )
    try:
        image.load()  # first frame only for animations
        image = upright(image)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise GatewayError(
            400,
            "truncated_image",
            f"{filename!r} could not be decoded completely ({error}); the file looks truncated or corrupt: "
            "upload it again, whole",
        ) from None


def _too_many_pixels(filename: str, size: tuple[int, int] | None, max_pixels: int) -> GatewayError:
    declared = f"declares {size[0]}x{size[1]} pixels" if size else "declares too many pixels"
    return GatewayError(
        413,
        "image_too_many_pixels",
        f"{filename!r} {declared}, over the limit of {max_pixels} pixels per image; "
        "downscale it before uploading (the model sees 32x32 anyway)",
    )
