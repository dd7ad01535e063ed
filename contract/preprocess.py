"""Upload pixels -> the model's input: the resize contract between Pillow and the exported graph.

The gateway (serving/images.py), the clients' pixel path (client/images.py) and the trainer's image
folders (trainer/data/imagefolder.py) all turn pixels into model input here, so training, serving
and clients see the same pixels; the exported bytes signature (TensorFlow) reproduces it in-graph.

Both turn a decoded RGB image of any size into the same uint8 pixels [32, 32, 3], bit for bit:
  * here: Pillow `Image.resize((32, 32), Image.BILINEAR)`. On downscaling Pillow widens the
    triangle filter by the scale factor (antialiasing); it resizes in two separable passes with
    integer (fixed-point, 22-bit) filter coefficients, rounding to uint8 after each pass, and
    Pillow 13 runs the vertical pass first for images whose height shrinks much more than their width;
  * in the graph (trainer/export/graph_image/pillow_resize.py `resize_like_pillow`): the same
    coefficients, computed the way Pillow computes them, the same integer sums and rounding, and
    the same pass order.
The pixels are identical for every image size; the parity tests (tests/trainer/test_export_parity.py)
compare them value for value. Changing the filter here breaks that, and so does a Pillow whose
resize arithmetic or pass order differs: releases before 13 order the passes differently for tall
images.

Before the resize, a large JPEG is decoded small: libjpeg scales its DCT by 1/2, 1/4 or 1/8 while
decoding (Pillow's `draft`, TensorFlow's `decode_jpeg(ratio=)`: the same libjpeg arithmetic, the same
pixels), taking the largest factor that leaves both sides at least DECODE_MIN_SIDE; `jpeg_decode_scale`
states the rule for both. A 12 Mpx phone photo then decodes several times faster in a fraction of the
memory, and its 32x32 pixels move by a level or two from a full decode's (`make bench-decode`).
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from contract.signatures import INPUT_SIZE

RESAMPLE = Image.Resampling.BILINEAR
# A JPEG decodes at 1/8, 1/4 or 1/2 of its size when both sides stay at least this many pixels: 4x
# the model's side leaves the antialiasing resize far more detail than survives at 32x32 (DCT scaling
# is itself a good low-pass: at 1/8 each pixel is its 8x8 block's mean).
DECODE_MIN_SIDE = 4 * INPUT_SIZE  # px
JPEG_SCALES = (8, 4, 2, 1)  # what libjpeg's DCT scaling offers (1/N), largest first, as Pillow tries them


def upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF Orientation; as decoded when the EXIF block cannot be parsed.

    Metadata must not cost a photo whose pixels decode: Pillow raises anything from ValueError to
    struct.error on a garbled EXIF block (e.g. next to a JFIF density header), and the exported
    bytes signature reads such a block as orientation 1 (trainer/export/graph_image/exif.py), so the
    gateway, the clients' pixel path and the graph stay in agreement.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": handled right here
            return ImageOps.exif_transpose(image) or image
    except Exception:  # any parse failure means "no usable orientation"
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white (what a viewer shows)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grayscale: a plain convert() clips everything above 255 to white, so scale the
        # range down instead (16-bit PNGs keep their full 0..65535 range here).
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if mode.startswith("I;16") or pixels.max(initial=0) > 255 else 1.0
        gray = np.clip(np.rint(pixels / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def jpeg_decode_scale(width: int, height: int) -> int:
    """N of the 1/N scale a width x height JPEG decodes at: the largest of JPEG_SCALES with both sides
    still >= DECODE_MIN_SIDE (1 for smaller images). Pillow's `draft` picks it this way; the exported
    graph (trainer/export/graph_image/decode.py) computes the same from the JPEG's header."""
    fit = min(width, height) // DECODE_MIN_SIDE
    return next((scale for scale in JPEG_SCALES if fit >= scale), 1)


def decode_reduced(image: Image.Image) -> Image.Image:
    """`image` (opened, not yet loaded), set to decode a JPEG at `jpeg_decode_scale`: its size becomes
    the reduced one (each side rounded up). Other formats are returned as they are."""
    if isinstance(image, JpegImagePlugin.JpegImageFile):  # MPO, phones' multi-picture JPEG, included
        image.draft(None, (DECODE_MIN_SIDE, DECODE_MIN_SIDE))
    return image


def decode_to_model_input(image: Image.Image) -> np.ndarray:
    """An opened image file -> the model's uint8 [32, 32, 3]: decoded (its first frame; a JPEG reduced
    by `decode_reduced`), turned upright by its EXIF orientation, made RGB and resized. The trainer's
    image folders and the clients' pixel path call this; the gateway runs the same steps with its
    limits and error codes (serving/images.py)."""
    decode_reduced(image).load()
    return to_model_input(upright(image))


def to_model_input(image: Image.Image) -> np.ndarray:
    """An RGB PIL image of any size -> uint8 array [32, 32, 3], the model's input pixels."""
    image = to_rgb(image)
    if image.size != (INPUT_SIZE, INPUT_SIZE):
        image = image.resize((INPUT_SIZE, INPUT_SIZE), RESAMPLE)
    return np.asarray(image, dtype=np.uint8)
