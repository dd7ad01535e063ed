"""The seeds' plain CNN baseline (the classic Keras CIFAR-10 example), without batch norm.

conv(w)-conv(w)-pool-dropout, conv(2w)-conv(2w)-pool-dropout, flatten, dense(16w)-dropout,
softmax. With w=32 this is the 32/32/64/64/512 network the seeds trained.
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.models.common import softmax_head


def _conv(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    return layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer="he_normal",
                         name=name)(x)


def body(x: keras.KerasTensor, *, width: int, dropout: float, bn_momentum: float) -> keras.KerasTensor:
    del bn_momentum  # no batch norm in the baseline
    x = _conv(x, width, "c1a")
    x = _conv(x, width, "c1b")
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Dropout(dropout, name="dropout1")(x)
    x = _conv(x, 2 * width, "c2a")
    # The last conv is named "last_conv": Grad-CAM reads it.
    x = _conv(x, 2 * width, "last_conv")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Dropout(dropout, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(16 * width, activation="relu", kernel_initializer="he_normal", name="fc")(x)
    return layers.Dropout(dropout, name="fc_dropout")(x)


def head(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    return softmax_head(x, num_classes)
