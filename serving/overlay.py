"""Grad-CAM heatmap drawn over the image the model saw, as a PNG for people to look at.

Pillow and numpy only (no matplotlib in the request path): the 32x32 model input and its 32x32
heatmap are upsampled bilinearly to VIEW_SIZE, the heat is coloured with a jet-like colormap, and
blended in proportion to the heat, so cold regions show the plain image and hot ones the colour.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

VIEW_SIZE = 128  # pixels; 4x the model input, big enough to see which part of the shape lights up
MAX_ALPHA = 0.6  # colour weight at heat 1: the image stays visible under the hottest spot

# Jet-like anchors (heat -> RGB): blue, cyan, green, yellow, red. Familiar and readable on photos.
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 200, 255], [40, 220, 40], [255, 220, 0], [220, 0, 0]], dtype=np.float64)


def colormap(heat: np.ndarray) -> np.ndarray:
    """Heat in 0..1 (any shape) -> float RGB 0..255 with a trailing axis of 3."""
    heat = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(heat, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)


def _upsample(array: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a float [H, W] array through Pillow's 32-bit float mode."""
    return np.asarray(
        Image.fromarray(array.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    )


def overlay(image: np.ndarray, heatmap: np.ndarray, size: int = VIEW_SIZE) -> np.ndarray:
    """uint8 RGB [H, W, 3] image and float [h, w] heatmap (0..1) -> uint8 RGB [size, size, 3]."""
    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3 or heatmap.ndim != 2:
        raise ValueError(
            f"need an RGB image [H, W, 3] and a heatmap [h, w], got {image.shape} and {heatmap.shape}"
        )
    base = np.asarray(
        Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float64
    )
    heat = np.clip(_upsample(heatmap, size), 0.0, 1.0).astype(np.float64)
    alpha = (MAX_ALPHA * heat)[..., None]
    blended = base * (1.0 - alpha) + colormap(heat) * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, size: int = VIEW_SIZE) -> bytes:
    """The overlay encoded as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heatmap, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png_base64(image: np.ndarray, heatmap: np.ndarray, size: int = VIEW_SIZE) -> str:
    """The overlay PNG as base64 text, ready for JSON or a `data:image/png;base64,` URL."""
    return base64.b64encode(overlay_png(image, heatmap, size)).decode("ascii")
