"""TensorFlow Serving warmup records: <version>/assets.extra/tf_serving_warmup_requests (WARMUP_PATH).

TF Serving replays these PredictionLog records against a freshly loaded version before it marks the
version AVAILABLE, so the first real request after a rollout does not pay for graph initialization.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from contract.signatures import (
    CHANNELS,
    CLASS_INDEX_KEY,
    EXPLAIN,
    EXPLAIN_BYTES,
    IMAGE_BYTES_KEY,
    IMAGES_KEY,
    INPUT_SIZE,
    SERVING_BYTES,
    SERVING_DEFAULT,
    TOP_CLASS,
    WARMUP_PATH,
)

# Batch sizes to warm: 1 (interactive) and a small batch, so both code paths get initialized.
WARMUP_BATCH_SIZES = (1, 4)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def build_requests(
    model_name: str, seed: int = 0, *, explain: bool = False
) -> list[predict_pb2.PredictRequest]:
    """A few PredictRequests per signature (the explain ones too when `explain`); images are random
    but deterministic."""
    rng = np.random.default_rng(seed)
    requests: list[predict_pb2.PredictRequest] = []

    def add(signature: str, inputs: dict[str, tf.Tensor | np.ndarray | list]) -> None:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
        )
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        requests.append(request)

    for batch in WARMUP_BATCH_SIZES:
        pixels = rng.integers(0, 256, size=(batch, INPUT_SIZE, INPUT_SIZE, CHANNELS)).astype(np.float32)
        # Larger than 32x32 and in two formats, so decode (both branches) and resize are warmed too.
        big = rng.integers(0, 256, size=(batch, 48, 64, 3), dtype=np.uint8)
        encoded = np.array(
            [_encode(img, "JPEG" if i % 2 == 0 else "PNG") for i, img in enumerate(big)], dtype=object
        )
        add(SERVING_DEFAULT, {IMAGES_KEY: pixels})
        add(SERVING_BYTES, {IMAGE_BYTES_KEY: encoded})
        if explain:  # Grad-CAM runs a gradient pass: warm it as well, or the first explanation pays
            top = np.full([batch], TOP_CLASS, np.int32)
            add(EXPLAIN, {IMAGES_KEY: pixels, CLASS_INDEX_KEY: top})
            add(EXPLAIN_BYTES, {IMAGE_BYTES_KEY: encoded, CLASS_INDEX_KEY: top})
    return requests


def write_warmup_file(version_dir: Path, model_name: str, *, explain: bool = False) -> Path:
    """Write the warmup TFRecord at `version_dir`/WARMUP_PATH (folders created if missing); returns its
    path."""
    path = version_dir / WARMUP_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in build_requests(model_name, explain=explain):
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def read_warmup_file(path: Path) -> list[prediction_log_pb2.PredictionLog]:
    """Parse a warmup file back into PredictionLog records (raises on a corrupt record)."""
    records = []
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw.numpy())
        records.append(log)
    return records
