"""A strict stand-in for TensorFlow Serving's gRPC API, for tests only (the product never ships it).

Run in-process with `TFServingDouble(model_base).start()`, or as a process with
`python -m tests.tfserving_double --model-base DIR --port N`.
"""

from tests.tfserving_double.servable import ServingError
from tests.tfserving_double.server import TFServingDouble

__all__ = ["ServingError", "TFServingDouble"]
