"""The same SavedModel served by LitServe (Lightning AI's inference server) with its dynamic batching:
the off-the-shelf alternative the gateway's embedded backend is measured against in
benchmarks/serving_latency.py.

Kept as LitServe's documentation writes a batched API, and given the same work as the gateway:
decode the uploaded image with Pillow, convert to RGB, resize to 32x32 (bilinear), run the exported
`serving_default` signature on the batch, answer the class probabilities as JSON. `--runtime litert`
(the default, as the gateway's) runs the signature's LiteRT conversion, made and checked the way the
gateway makes it (serving/backends/litert.py), so the two servers are compared on the same runtime.
Batching is LitServe's own (`max_batch_size`, `batch_timeout` on the LitAPI); the defaults below are
the best of the settings tried on this 2-core machine with TensorFlow (docs/benchmarks.md says which).

  python -m benchmarks.litserve_app --model models/cifar10/1 --port 8001 [--workers 1]
      [--max-batch-size 64] [--batch-timeout-s 0.005] [--runtime litert|tensorflow]
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from PIL import Image

from contract.signatures import IMAGES_KEY, INPUT_SIZE, PROBABILITIES_KEY, SERVING_DEFAULT

UPLOAD_FIELD = "images"  # the gateway's field name, so one request body serves both


class SavedModelAPI(ls.LitAPI):
    """LitServe's batched API over the SavedModel's `serving_default` (module level: LitServe pickles
    it into its inference worker processes)."""

    def __init__(self, model_dir: Path, runtime: str = "litert", **batching: Any) -> None:
        super().__init__(**batching)
        self.model_dir = model_dir
        self.runtime = runtime
        self.lite: Any = None

    def setup(self, device: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        saved_model = tf.saved_model.load(str(self.model_dir))
        self.signature = saved_model.signatures[SERVING_DEFAULT]
        if self.runtime == "litert":
            from serving.backends.litert import load_lite

            conversion = load_lite(saved_model, self.signature)
            if conversion.lite is None:
                raise RuntimeError(conversion.reason)
            self.lite = conversion.lite
        card = json.loads((self.model_dir / "assets.extra" / "model_card.json").read_text())
        self.class_names = card["class_names"]

    # `request` unannotated: LitServe reads the annotation to choose what it passes, and with none it
    # passes the form of a multipart request (Starlette FormData).
    def decode_request(self, request) -> np.ndarray:  # noqa: ANN001
        upload = request[UPLOAD_FIELD]
        image = Image.open(io.BytesIO(upload.file.read())).convert("RGB")
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.lite is not None:
            return self.lite(x)[PROBABILITIES_KEY]
        return self.signature(**{IMAGES_KEY: x})[PROBABILITIES_KEY].numpy()

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"probabilities": {n: float(p) for n, p in zip(self.class_names, output, strict=True)}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a SavedModel version directory")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="LitServe inference worker processes")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout-s", type=float, default=0.005)
    parser.add_argument("--runtime", choices=["litert", "tensorflow"], default="litert")
    args = parser.parse_args(argv)
    api = SavedModelAPI(
        args.model, args.runtime, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_s
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
