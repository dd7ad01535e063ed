"""Signature names, tensor keys and sizes of the exported SavedModel.

Trainer export writes these; TensorFlow Serving, the gateway and the clients read them. Change one and
every published model stops matching: bump the contract in docs/architecture.md too.
"""

from __future__ import annotations

from pathlib import PurePosixPath

INPUT_SIZE = 32  # pixels, height = width, of the model's input
CHANNELS = 3  # RGB
MAX_SIDE = 65535  # pixels per image side (JPEG's own limit); both the graph and the gateway refuse longer
# Pixels per image (width x height as the header declares them, checked before decoding): the exported
# bytes signatures refuse more; the gateway's default GATEWAY_MAX_PIXELS. 25 Mpx takes the default
# output of today's phones (12-24 Mpx) and bounds one decode (docs/deploy.md, "Memory").
MAX_PIXELS = 25_000_000

# Signatures
SERVING_DEFAULT = "serving_default"  # float32 pixels [N, 32, 32, 3], 0..255
SERVING_BYTES = "serving_bytes"  # encoded images [N], any size
EXPLAIN = "explain"  # pixels + class_index -> Grad-CAM heatmap
EXPLAIN_BYTES = "explain_bytes"  # encoded images + class_index -> Grad-CAM heatmap

# Inputs
IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
CLASS_INDEX_KEY = "class_index"
TOP_CLASS = -1  # class_index value meaning "explain the predicted class"

# Outputs
PROBABILITIES_KEY = "probabilities"
CLASSES_KEY = "classes"
HEATMAP_KEY = "heatmap"
EXPLAINED_CLASS_KEY = "explained_class"
EXPLAIN_OUTPUT_KEYS = (PROBABILITIES_KEY, CLASSES_KEY, HEATMAP_KEY, EXPLAINED_CLASS_KEY)
# Out-of-distribution outputs of every signature (trainer/export/ood.py): `ood_score` float32 [N], higher =
# less like the training data; `abstain` bool [N] = ood_score > a threshold fixed in the graph at export.
# Versions exported before them lack both: readers must treat them as optional.
OOD_SCORE_KEY = "ood_score"
ABSTAIN_KEY = "abstain"

DEFAULT_TOP_K = 5  # classes returned per image when the caller does not say

# Files inside a published version directory (paths relative to MODEL_BASE/<name>/<version>/)
SAVED_MODEL_FILE = "saved_model.pb"
ASSETS_EXTRA = PurePosixPath("assets.extra")
MODEL_CARD_PATH = ASSETS_EXTRA / "model_card.json"
WARMUP_PATH = ASSETS_EXTRA / "tf_serving_warmup_requests"  # the name TF Serving looks for
# Statistics of the export's held-out data (class share, confidence and ood_score histograms, abstain
# rate, pixel mean/std) that drift checks compare served traffic with (trainer/export/trust.py).
REFERENCE_STATS_PATH = ASSETS_EXTRA / "reference_stats.json"
