"""The leanest Flask app on the gateway's runtime: the least work per upload of a Flask-under-gunicorn
design on this machine, measured beside the gateway in benchmarks/serving_latency.py. Not a strict
bound: it calls the model once per image, so the gateway's batches can match or beat it (1.05x-1.11x
its req/s at 16 clients in the last runs, 0.96x in an earlier one: docs/benchmarks.md).

One route that decodes the upload (Pillow, RGB, bilinear resize to 32x32, as the gateway and LitServe
do) and runs the published version's LiteRT conversion (made and checked as the gateway makes it,
serving/backends/litert.py) on that one image, single-threaded: with 2 workers on 2 cores every
core already runs a call. Nothing else: no batching, request limits, deadlines, metrics, auth,
request ids, hot reload, or trust fields. Whatever the gateway does on top of this costs CPU per
request; this app says how much is left to save, and whether a target is within reach of any app
built this way.

With model=False the same route answers uniform probabilities without calling any model: the CPU
that HTTP, gunicorn, Flask, the multipart parse, the decode, the resize and the JSON answer cost on
their own, the share of a request that no Flask app serving this upload avoids.

  LEAN_MODEL_DIR=models/cifar10/1 gunicorn -c serving/gunicorn.conf.py 'benchmarks.lean_flask:create_app()'
  ... 'benchmarks.lean_flask:create_app(model=False)'
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

from contract.signatures import INPUT_SIZE, PROBABILITIES_KEY, SERVING_DEFAULT


def create_app(model: bool = True) -> Flask:
    model_dir = Path(os.environ["LEAN_MODEL_DIR"])
    class_names = json.loads((model_dir / "assets.extra" / "model_card.json").read_text())["class_names"]
    run = _lite_model(model_dir) if model else _no_model(len(class_names))
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        upload = next(iter(request.files.values()))
        image = Image.open(io.BytesIO(upload.read())).convert("RGB")
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
        batch = np.asarray(image, dtype=np.float32)[np.newaxis]
        probabilities = run(batch)
        return jsonify({name: float(p) for name, p in zip(class_names, probabilities, strict=True)})

    return app


def _lite_model(model_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The version's LiteRT conversion, one image per call, single-threaded."""
    import tensorflow as tf

    from serving.backends.litert import load_lite

    saved_model = tf.saved_model.load(str(model_dir))
    conversion = load_lite(saved_model, saved_model.signatures[SERVING_DEFAULT])
    if conversion.lite is None:
        raise RuntimeError(f"no LiteRT conversion of {model_dir}: {conversion.reason}")
    lite = conversion.lite
    return lambda batch: lite(batch, parallel=False)[PROBABILITIES_KEY][0]


def _no_model(classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Uniform probabilities, whatever the pixels: no model call at all."""
    uniform = np.full(classes, 1.0 / classes, dtype=np.float32)
    return lambda batch: uniform
