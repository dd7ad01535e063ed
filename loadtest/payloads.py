"""The request mix the load test sends: built once at start-up, so load generation costs no encoding.

Good requests carry real CIFAR-10 photos (upscaled, because users upload camera-sized images, not
32x32 thumbnails) as JPEG and PNG, alone and in batches; without the shared photos, generated images
stand in. Bad requests (not an image, an empty file, too many images) must get their 4xx: a 5xx or a
200 for them is a defect just like a failed good request.
"""

from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from urllib3 import encode_multipart_formdata

PHOTO_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-sample"
FIELD = "images"  # the multipart field of POST /v1/predict (docs/architecture.md, serving/openapi.yaml)
# Gateways built from this repo refuse more images than this unless configured otherwise; run.py
# passes the value it started the gateway with through this variable.
MAX_IMAGES_ENV = "LOAD_MAX_IMAGES"
DEFAULT_MAX_IMAGES = 64


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str
    images: int  # how many predictions a 200 must hold


@dataclass(frozen=True)
class RequestKind:
    """One line of the mix: a Locust stats name, its share, the statuses that count as success."""

    name: str  # "good ..." or "bad ...": the load gates treat the two groups apart
    weight: int
    expected: frozenset[int]
    bodies: tuple[Body, ...]

    @property
    def good(self) -> bool:
        return self.name.startswith("good")


def source_images(count: int = 24, photo_dir: Path = PHOTO_DIR, seed: int = 0) -> list[Image.Image]:
    """`count` RGB 32x32 images: real photos when the shared sample is there, else generated ones."""
    labels = photo_dir / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as f:
            names = [row[0] for row in csv.reader(f) if len(row) == 2]
        return [Image.open(photo_dir / name).convert("RGB") for name in names[:count]]
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        # Smooth colour gradients plus noise: compresses like a photo, unlike pure noise.
        base = rng.integers(0, 256, size=(2, 2, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(base).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy))
    return images


def encode(image: Image.Image, size: int, fmt: str) -> bytes:
    """`image` upscaled to size x size and encoded as JPEG or PNG."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def multipart(files: list[tuple[str, bytes, str]], top_k: int | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with each file under the `images` field (and top_k when given)."""
    fields: list[tuple[str, object]] = [(FIELD, (name, data, mime)) for name, data, mime in files]
    if top_k is not None:
        fields.append(("top_k", str(top_k)))
    return encode_multipart_formdata(fields)


def max_images() -> int:
    return int(os.environ.get(MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES))


def build_mix(seed: int = 0, photo_dir: Path = PHOTO_DIR, limit: int | None = None) -> list[RequestKind]:
    """The weighted request mix. `limit`: the gateway's images-per-request limit (default from env)."""
    rng = random.Random(seed)
    photos = source_images(photo_dir=photo_dir, seed=seed)
    limit = max_images() if limit is None else limit
    mime = {"JPEG": "image/jpeg", "PNG": "image/png"}
    ext = {"JPEG": "jpg", "PNG": "png"}

    def single(size: int, fmt: str) -> tuple[Body, ...]:
        bodies = []
        for i, photo in enumerate(photos[:8]):
            data, ctype = multipart([(f"photo{i}.{ext[fmt]}", encode(photo, size, fmt), mime[fmt])],
                                    top_k=rng.choice([None, 1, 3]))
            bodies.append(Body(data, ctype, 1))
        return tuple(bodies)

    def batch(n: int, sizes: tuple[int, ...]) -> tuple[Body, ...]:
        bodies = []
        for _ in range(4):
            files = []
            for i in range(n):
                fmt = rng.choice(["JPEG", "PNG"])
                data = encode(rng.choice(photos), rng.choice(sizes), fmt)
                files.append((f"b{i}.{ext[fmt]}", data, mime[fmt]))
            data, ctype = multipart(files)
            bodies.append(Body(data, ctype, n))
        return tuple(bodies)

    tiny_png = encode(photos[0], 32, "PNG")
    not_image = multipart([("notes.txt", b"this is not an image, just some text\n" * 20, "text/plain")])
    empty = multipart([("empty.jpg", b"", "image/jpeg")])
    too_many = multipart([(f"t{i}.png", tiny_png, "image/png") for i in range(limit + 1)])
    ok = frozenset({200})
    return [
        RequestKind("good 1 jpeg 32px", 15, ok, single(32, "JPEG")),
        RequestKind("good 1 png 32px", 15, ok, single(32, "PNG")),
        RequestKind("good 1 jpeg 640px", 15, ok, single(640, "JPEG")),
        RequestKind("good 1 png 256px", 10, ok, single(256, "PNG")),
        RequestKind("good 4 mixed 32-256px", 10, ok, batch(4, (32, 128, 256))),
        RequestKind("good 16 mixed 32-64px", 5, ok, batch(16, (32, 64))),
        # Statuses the gateway documents (serving/images.py, serving/api.py): not_an_image, empty_file
        # and too_many_images are all 400s.
        RequestKind("bad not an image", 2, frozenset({400}), (Body(*not_image, 0),)),
        RequestKind("bad empty file", 2, frozenset({400}), (Body(*empty, 0),)),
        RequestKind("bad too many images", 1, frozenset({400}), (Body(*too_many, 0),)),
    ]
