"""The contract between training and serving: what the exported SavedModel looks like from outside.

A leaf package: it imports nothing from `trainer`, `serving` or `client`; all three import it.

* `signatures`: signature names, tensor keys, input size, limits, file names inside a version.
* `versions`: the one listing of published versions under a model base.
* `preprocess`: upload pixels -> the model's 32x32 RGB input (Pillow), shared by gateway, client, trainer.
* `tensors`: NumPy <-> TensorProto, for every gRPC caller of TensorFlow Serving.
* `channel`: gRPC channel options for TensorFlow Serving.
"""
