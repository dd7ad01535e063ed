"""Upload bytes -> RGB Pillow image, refusing what should not be decoded.

Two steps, so a request can refuse its images on their declared sizes before any pixel is decoded
(serving/uploads.py sums them against the per-request budget): `open_image` reads the header only,
`decode_opened` decodes; `decode_image` does both for one image.

Status codes (documented in serving/openapi.yaml):
  * 400 `empty_file`: zero bytes;
  * 400 `not_an_image`: Pillow recognises no image format in the bytes;
  * 415 `unsupported_format`: a real image in a format outside SUPPORTED_FORMATS (e.g. PSD, EPS);
  * 413 `image_too_many_pixels`: the header declares more pixels than the limit; refused before
    any pixel is decoded, so a decompression bomb costs nothing;
  * 413 `image_side_too_long`: a side over MAX_SIDE (65535) pixels, which the exported bytes
    signature refuses too;
  * 400 `truncated_image`: the header is fine but the pixel data is cut short or corrupt.

Memory: a decode holds the image as stored (up to 4 bytes a pixel, 2 for 16-bit gray) plus the RGB
result (4 bytes a pixel in Pillow); the conversion to RGB runs in bands of BAND_PIXELS, so the
temporaries of compositing or of scaling 16-bit values down stay a few MiB whatever the image size
(the whole-image conversion in contract/preprocess.py costs up to 24 bytes a pixel for 16-bit).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract.preprocess import decode_reduced, to_rgb, upright
from contract.signatures import MAX_SIDE
from serving.errors import GatewayError

try:  # HEIC/HEIF (iPhone photos): the optional `heic` extra (pyproject.toml) brings pillow-heif.
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_FORMATS: tuple[str, ...] = ("HEIF",)
except ImportError:  # the base install: HEIC is refused with 415 and a message naming the extra
    HEIF_FORMATS = ()

# What Pillow reads of the formats photos and scans come in. Pillow names a phone JPEG that carries a
# second (MPF) image "MPO" and opens its first frame, the photo; animations (GIF, WebP, AVIF) and
# multi-page TIFFs give their first frame too. The exported bytes signature decodes the first four
# only (GRAPH_FORMATS); the gateway decodes the rest itself and sends the backend pixels.
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "MPO", "WEBP", "TIFF", "AVIF", *HEIF_FORMATS)
GRAPH_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
FORMAT_NAMES = "JPEG, PNG, WebP, TIFF, GIF, BMP, AVIF" + (" or HEIC" if HEIF_FORMATS else "")

# ISO-BMFF brands of HEIC files (bytes 8..12, after "ftyp"), to name the missing extra.
HEIC_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis")
BAND_PIXELS = 1 << 20  # pixels converted to RGB at a time (a few MiB of temporaries)


def decode_image(data: bytes, *, filename: str, max_pixels: int) -> Image.Image:
    """Decode one uploaded image to an 8-bit RGB image with EXIF orientation applied."""
    return decode_opened(open_image(data, filename=filename, max_pixels=max_pixels), filename=filename)


def open_image(data: bytes, *, filename: str, max_pixels: int) -> Image.Image:
    """The image's header, read and checked (format, pixel count, sides); no pixel decoded yet."""
    if not data:
        raise GatewayError(
            400, "empty_file", f"{filename!r} is empty (0 bytes); upload the image file itself"
        )
    try:
        # open() reads only the header; pixels are decoded by load() in decode_opened, after the
        # size checks. Pillow's own bomb guard warns (or raises) on huge images; our limit applies.
        # A garbled EXIF block warns here too ("Corrupt EXIF data"): handled, it means orientation 1
        # (contract/preprocess.py upright), so it is no news for the server's stderr.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_many_pixels(filename, None, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        if not HEIF_FORMATS and data[4:8] == b"ftyp" and data[8:12] in HEIC_BRANDS:
            raise GatewayError(
                415,
                "unsupported_format",
                f"{filename!r} is a HEIC image, which this gateway was installed without; convert it to "
                f"{FORMAT_NAMES}, or install the `heic` extra (pip install 'cifar10-service[heic]')",
            ) from None
        raise GatewayError(
            400,
            "not_an_image",
            f"{filename!r} is not an image Pillow can read; upload a {FORMAT_NAMES} file",
        ) from None
    if image.format not in SUPPORTED_FORMATS:
        raise GatewayError(
            415,
            "unsupported_format",
            f"{filename!r} is a {image.format} image; supported formats are {FORMAT_NAMES}: "
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
    return image


def decode_opened(image: Image.Image, *, filename: str) -> Image.Image:
    """An image from `open_image` -> 8-bit RGB, upright by its EXIF orientation (first frame only); a
    large JPEG decoded at a reduced scale (contract/preprocess.py `decode_reduced`)."""
    try:
        decode_reduced(image).load()
        return to_rgb_banded(upright(image))
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise GatewayError(
            400,
            "truncated_image",
            f"{filename!r} could not be decoded completely ({error}); the file looks truncated or corrupt: "
            "upload it again, whole",
        ) from None


def to_rgb_banded(image: Image.Image) -> Image.Image:
    """contract.preprocess.to_rgb, pixel for pixel, converting BAND_PIXELS at a time.

    Every conversion to_rgb makes is per pixel (compositing on white, palette and CMYK lookups), so
    bands give the same pixels; the one global step, the scale of 16/32-bit gray, is taken from the
    whole image's extrema exactly as to_rgb takes it.
    """
    if image.mode == "RGB":
        return image
    width, height = image.size
    rows = max(1, BAND_PIXELS // max(width, 1))
    if height <= rows:
        return to_rgb(image)
    gray = image.mode.startswith("I") or image.mode == "F"
    out = Image.new("L" if gray else "RGB", image.size)
    scale = 257.0 if image.mode.startswith("I;16") or (gray and image.getextrema()[1] > 255) else 1.0
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        if gray:  # to_rgb's formula, on this band's values
            values = np.asarray(band, dtype=np.float64)
            band = Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), mode="L")
        else:
            band = to_rgb(band)
        out.paste(band, (0, top))
    return out.convert("RGB") if gray else out


def _too_many_pixels(filename: str, size: tuple[int, int] | None, max_pixels: int) -> GatewayError:
    declared = f"declares {size[0]}x{size[1]} pixels" if size else "declares too many pixels"
    return GatewayError(
        413,
        "image_too_many_pixels",
        f"{filename!r} {declared}, over the limit of {max_pixels} pixels per image "
        "(GATEWAY_MAX_PIXELS); downscale it before uploading (the model sees 32x32 anyway)",
    )
