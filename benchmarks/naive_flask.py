"""The approach the gateway replaces, as the tutorials write it: one Flask route that opens the
upload, resizes it and calls Keras `model.predict` on it, per request.

Kept deliberately naive (that is the point of the comparison in benchmarks/serving_latency.py):
  NAIVE_RUN_DIR=runs/quick gunicorn -c serving/gunicorn.conf.py 'benchmarks.naive_flask:create_app()'
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

from contract.signatures import INPUT_SIZE


def create_app() -> Flask:
    import keras

    import trainer.models  # noqa: F401 - registers the project's custom layers for loading

    run_dir = Path(os.environ["NAIVE_RUN_DIR"])
    model = keras.saving.load_model(run_dir / "model.keras")
    class_names = json.loads((run_dir / "dataset.json").read_text())["class_names"]
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        file = request.files["file"]
        image = Image.open(file.stream).convert("RGB").resize((INPUT_SIZE, INPUT_SIZE))
        batch = np.expand_dims(np.asarray(image, dtype="float32"), 0)
        probabilities = model.predict(batch, verbose=0)[0]
        return jsonify({name: float(p) for name, p in zip(class_names, probabilities, strict=True)})

    return app
