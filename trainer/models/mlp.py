"""The seed tutorials' multilayer perceptron: flattened pixels, two hidden Dense layers, softmax.

flatten -> dense(w) relu -> dropout -> dense(w) relu -> dropout -> softmax, w=512 as the Keras
CIFAR-10 MLP tutorials, behind the shared normalize/augment stem. A baseline only (~50-55% on
CIFAR-10). It has no convolution, hence no LAST_CONV_LAYER: Grad-CAM is not available for it.
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.models.common import dense, softmax_head


def body(
    x: keras.KerasTensor, *, width: int, dropout: float, bn_momentum: float, init: str
) -> keras.KerasTensor:
    del bn_momentum  # no batch norm
    x = layers.Flatten(name="flatten")(x)
    x = dense(x, width, init=init, activation="relu", name="fc1")
    x = layers.Dropout(dropout, name="fc1_dropout")(x)
    x = dense(x, width, init=init, activation="relu", name="fc2")
    return layers.Dropout(dropout, name="fc2_dropout")(x)


def head(x: keras.KerasTensor, num_classes: int, *, bias: bool, init: str) -> keras.KerasTensor:
    return softmax_head(x, num_classes, bias=bias, init=init)
