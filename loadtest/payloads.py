"""The request mix the load test sends: built once at start-up, so load generation costs no encoding.

Good requests carry real CIFAR-10 photos (upscaled, because users upload camera-sized images, not
32x32 thumbnails) as JPEG and PNG, alone and in batches; without the shared photos, generated images
stand in. Bad requests (not an image, an empty file, too many images) must get their 4xx: a 5xx or a
200 for them is a defect just like a failed good request.

Explanations (POST /v1/explain: a backward pass and an overlay PNG per image) come from their own mix,
sent by one Locust user (locustfile.Explainer), the way the page's "why?" button adds them.
When the gateway wants API keys, the run's key (LOAD_API_KEY) goes with every good request, by
`Authorization: Bearer` or `X-API-Key` in turn, and two bad kinds send none or a wrong one (401).
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
API_KEY_ENV = "LOAD_API_KEY"  # the key to send; empty: the gateway under test wants none
PREDICT_PATH = "/v1/predict"
EXPLAIN_PATH = "/v1/explain"
WRONG_KEY = "c10_this-key-was-never-issued-by-the-load-test-000000"


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
    path: str = PREDICT_PATH
    auth: str = "valid"  # "valid": the run's key (if any); "missing": no key; "wrong": WRONG_KEY

    @property
    def good(self) -> bool:
        return self.name.startswith("good")

    @property
    def result_field(self) -> str:
        """The list a 200 answer holds, one entry per image."""
        return "explanations" if self.path == EXPLAIN_PATH else "predictions"

    def headers(self, body: Body, api_key: str | None, turn: int) -> dict[str, str]:
        """The request's headers: its content type and, by `auth`, the key in one of the two schemes."""
        headers = {"Content-Type": body.content_type}
        key = {"valid": api_key, "wrong": WRONG_KEY, "missing": None}[self.auth]
        if key:
            if turn % 2:
                headers["X-API-Key"] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
        return headers


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


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV, "").strip() or None


def build_mix(
    seed: int = 0, photo_dir: Path = PHOTO_DIR, limit: int | None = None, keyed: bool | None = None
) -> list[RequestKind]:
    """The weighted request mix. `limit`: the gateway's images-per-request limit (default from env);
    `keyed`: the gateway wants API keys, so add the 401 kinds (default: a key is in the env)."""
    rng = random.Random(seed)
    photos = source_images(photo_dir=photo_dir, seed=seed)
    limit = max_images() if limit is None else limit
    keyed = api_key() is not None if keyed is None else keyed
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
    keyless = [
        # Without a key, or with one never issued, the gateway must answer 401 (serving/auth.py).
        RequestKind("bad missing api key", 1, frozenset({401}), single(32, "PNG")[:2], auth="missing"),
        RequestKind("bad wrong api key", 1, frozenset({401}), single(32, "JPEG")[:2], auth="wrong"),
    ] if keyed else []
    return keyless + [
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


def build_explain_mix(seed: int = 1, photo_dir: Path = PHOTO_DIR) -> list[RequestKind]:
    """What the explaining user sends to /v1/explain: one photo (the page's button) or a few, within
    the gateway's explain cap (GATEWAY_MAX_EXPLAIN_IMAGES, 8 by default)."""
    rng = random.Random(seed)
    photos = source_images(photo_dir=photo_dir, seed=seed)
    ok = frozenset({200})

    def bodies(n: int, size: int) -> tuple[Body, ...]:
        out = []
        for _ in range(4):
            files = [(f"e{i}.jpg", encode(rng.choice(photos), size, "JPEG"), "image/jpeg") for i in range(n)]
            out.append(Body(*multipart(files, top_k=rng.choice([None, 1, 3])), n))
        return tuple(out)

    return [
        RequestKind("good explain 1 jpeg 256px", 3, ok, bodies(1, 256), path=EXPLAIN_PATH),
        RequestKind("good explain 4 jpeg 64px", 1, ok, bodies(4, 64), path=EXPLAIN_PATH),
    ]
