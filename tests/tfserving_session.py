"""Load a SavedModel the way TensorFlow Serving does and run signatures by their SignatureDef names.

TF Serving does not call tf.saved_model.load; it runs the C++ SavedModel loader for a tag set into a
graph Session and then feeds/fetches the tensor names recorded in each SignatureDef. The tf.compat.v1
loader below is the Python face of that same loader, so a model that works here works in TF Serving.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf


class SignatureError(ValueError):
    """A request that does not fit the model's signatures (unknown name, missing or extra inputs)."""


class TFServingSession:
    """One loaded model version. `run` is safe to call from many threads at once (tf Session.run is
    thread-safe); loading and closing are serialized by a lock."""

    def __init__(self, path: str | Path, tags: tuple[str, ...] = ("serve",)) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph)
        with self._lock, self._graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self._session, list(tags), str(self.path))
        self.signature_defs = dict(meta_graph.signature_def)

    @classmethod
    def load(cls, path: str | Path, tags: tuple[str, ...] = ("serve",)) -> TFServingSession:
        return cls(path, tags)

    def input_keys(self, signature_name: str) -> list[str]:
        return sorted(self._signature(signature_name).inputs)

    def output_keys(self, signature_name: str) -> list[str]:
        return sorted(self._signature(signature_name).outputs)

    def _signature(self, signature_name: str):  # -> meta_graph_pb2.SignatureDef
        if signature_name not in self.signature_defs:
            raise SignatureError(
                f"signature {signature_name!r} not found in {self.path}; "
                f"available: {sorted(self.signature_defs)}"
            )
        return self.signature_defs[signature_name]

    def run(
        self,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        output_keys: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Feed `inputs` by SignatureDef input key, fetch outputs (all, or `output_keys`) by key."""
        signature = self._signature(signature_name)
        missing = set(signature.inputs) - set(inputs)
        extra = set(inputs) - set(signature.inputs)
        if missing or extra:
            raise SignatureError(
                f"signature {signature_name!r} takes inputs {sorted(signature.inputs)}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        keys = sorted(signature.outputs) if output_keys is None else list(output_keys)
        unknown = set(keys) - set(signature.outputs)
        if unknown:
            raise SignatureError(f"signature {signature_name!r} has no outputs {sorted(unknown)}")
        feed = {signature.inputs[k].name: np.asarray(v) for k, v in inputs.items()}
        fetches = [signature.outputs[k].name for k in keys]
        values = self._session.run(fetches, feed_dict=feed)
        return dict(zip(keys, values, strict=True))

    def close(self) -> None:
        with self._lock:
            self._session.close()

    def __enter__(self) -> TFServingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
