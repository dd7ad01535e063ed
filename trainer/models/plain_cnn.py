"""The seeds' plain CNN baseline (the classic Keras CIFAR-10 example), without batch norm.

conv(w)-conv(w)-pool-dropout, conv(2w)-conv(2w)-pool-dropout, flatten, dense(16w)-dropout,
softmax. With w=32 this is the 32/32/64/64/512 network the seeds trained.
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.models.common import conv, dense, softmax_head


def body(
    x: keras.KerasTensor, *, width: int, dropout: float, bn_momentum: float, init: str
) -> keras.KerasTensor:
    del bn_momentum  # no batch norm in the baseline
    x = conv(x, width, init=init, activation="relu", name="c1a")
    x = conv(x, width, init=init, activation="relu", name="c1b")
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Dropout(dropout, name="dropout1")(x)
    x = conv(x, 2 * width, init=init, activation="relu", name="c2a")
    # The last conv is named "last_conv": Grad-CAM reads it.
    x = conv(x, 2 * width, init=init, activation="relu", name="last_conv")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Dropout(dropout, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = dense(x, 16 * width, init=init, activation="relu", name="fc")
    return layers.Dropout(dropout, name="fc_dropout")(x)


def head(x: keras.KerasTensor, num_classes: int, *, bias: bool, init: str) -> keras.KerasTensor:
    return softmax_head(x, num_classes, bias=bias, init=init)
