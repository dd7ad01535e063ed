"""Model registry: architectures chosen by name, all with the same input/output contract.

`build_model(arch, ...)` returns a keras.Model taking float32 [N, 32, 32, 3] raw RGB 0..255,
normalizing with the training-split mean/std as its first layer, augmenting only in training,
and returning float32 softmax probabilities [N, num_classes]. Every architecture with a
convolution names its last convolutional feature map LAST_CONV_LAYER (for Grad-CAM); `mlp` has
none. Importing this package registers the custom layers, so `keras.saving.load_model` can read
saved models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import keras

from trainer.models import airbench, bn_cnn, mlp, nin, plain_cnn, resnet9
from trainer.models.augment import Cutout, HorizontalFlip, RandomShift
from trainer.models.common import INITS, check_init, stem

LAST_CONV_LAYER = "last_conv"
DEFAULT_ARCH = "bn_cnn"

_Body = Callable[..., keras.KerasTensor]
_Head = Callable[..., keras.KerasTensor]


@dataclasses.dataclass(frozen=True)
class Architecture:
    body: _Body  # (x, *, width, dropout, bn_momentum, init) -> features
    head: _Head  # (features, num_classes, *, bias, init) -> probabilities
    width: int  # default width (channels of the first block; units for mlp)
    init: str = "he_normal"  # default weight initialization, one of common.INITS
    head_bias: bool = True  # default: does the logits Dense layer have a bias
    gradcam: bool = True  # has a LAST_CONV_LAYER (False: no convolution, no Grad-CAM)


REGISTRY: dict[str, Architecture] = {
    "bn_cnn": Architecture(bn_cnn.body, bn_cnn.head, 64),
    # Page's ResNet-9 as trained in PyTorch: default (uniform) init, bias-free head.
    "resnet9": Architecture(resnet9.body, resnet9.head, 64, init="torch", head_bias=False),
    "plain_cnn": Architecture(plain_cnn.body, plain_cnn.head, 32),
    "mlp": Architecture(mlp.body, mlp.head, 512, gradcam=False),
    "nin": Architecture(nin.body, nin.head, 192),
    # airbench94 (Keller Jordan): widths 64/256/256, data-initialized whitening conv, PyTorch's
    # default init (its convs add the identity themselves), bias-free head.
    "airbench": Architecture(airbench.body, airbench.head, 64, init="torch", head_bias=False),
}

# Which config key turns on each built-in layer that XLA cannot compile (for xla_error's advice).
_XLA_BLOCKER_KEYS = {"aug_rotate": "augment.rotation"}

__all__ = [
    "INITS",
    "LAST_CONV_LAYER",
    "REGISTRY",
    "Architecture",
    "Cutout",
    "HorizontalFlip",
    "RandomShift",
    "available_architectures",
    "build_model",
    "gradcam_architectures",
    "xla_blockers",
    "xla_error",
]


def available_architectures() -> list[str]:
    return sorted(REGISTRY)


def gradcam_architectures() -> list[str]:
    """The architectures with a LAST_CONV_LAYER (all but those without convolutions)."""
    return sorted(name for name, a in REGISTRY.items() if a.gradcam)


def build_model(
    arch: str = DEFAULT_ARCH,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    augmentation: Any = None,
    width: int | None = None,
    dropout: float = 0.0,
    bn_momentum: float = 0.9,
    seed: int | None = None,
    init: str | None = None,
    head_bias: bool | None = None,
    whitening_images: Any = None,
) -> keras.Model:
    """Build architecture `arch` (see REGISTRY).

    augmentation: an AugmentConfig, a dict of `augmentation_layers` arguments, or None (no
    augmentation). width: channels of the first block (None = the architecture's default).
    bn_momentum: Keras convention (PyTorch's momentum is 1 minus this). seed: augmentation seed
    (None = drawn from the global seed that keras.utils.set_random_seed fixes).
    init: weight initialization, "he_normal" or "torch" (PyTorch's default, U(+-1/sqrt(fan_in)));
    head_bias: whether the logits layer has a bias. None = the architecture's default for both.
    whitening_images: raw training images [N, 32, 32, 3] (0..255) that set the frozen whitening
    conv of `airbench` (its first 5,000 are used); ignored by architectures without one. None
    leaves that kernel at its random init (fine for tests and for loading saved weights).
    """
    if arch not in REGISTRY:
        choices = ", ".join(available_architectures())
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {choices}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    spec = REGISTRY[arch]
    init = spec.init if init is None else init
    check_init(init)
    head_bias = spec.head_bias if head_bias is None else head_bias
    if dataclasses.is_dataclass(augmentation) and not isinstance(augmentation, type):
        augmentation = dataclasses.asdict(augmentation)
    inputs, x = stem(mean, std, augmentation, seed)
    x = spec.body(x, width=width or spec.width, dropout=dropout, bn_momentum=bn_momentum, init=init)
    outputs = spec.head(x, num_classes, bias=head_bias, init=init)
    model = keras.Model(inputs, outputs, name=arch)
    if whitening_images is not None:
        airbench.initialize_whitening(model, whitening_images, mean, std)
    return model


def xla_blockers(model: keras.Model) -> list[str]:
    """Names of the layers (nested ones included) that XLA cannot compile.

    The same per-layer test Keras applies when a model is compiled with jit_compile=True
    (`keras.src.trainers.trainer.model_supports_jit`: every layer's `supports_jit`); when it fails,
    Keras only warns and trains without XLA. (Keras also refuses XLA on Apple-silicon GPUs and
    under TensorFlow op determinism; those are not layers and are not reported here.)
    """
    return [layer.name for layer in _non_jit_layers(model)]


def xla_error(model: keras.Model) -> str | None:
    """A message naming the layers that block XLA and the fix, or None when the model compiles."""
    found = _non_jit_layers(model)
    if not found:
        return None
    named = []
    for layer in found:
        key = _XLA_BLOCKER_KEYS.get(layer.name)
        named.append(f"{layer.name!r} ({type(layer).__name__})" + (f": set {key}=0" if key else ""))
    return (
        f"train.jit_compile is on but model {model.name!r} has layers XLA cannot compile "
        f"(Keras would silently train without XLA): {'; '.join(named)}. "
        "Remove them, or set train.jit_compile=off."
    )


def _non_jit_layers(model: keras.Model) -> list[keras.layers.Layer]:
    # `_flatten_layers` (the model itself and every nested layer) is Keras-internal, but it is
    # exactly what model_supports_jit walks.
    return [layer for layer in model._flatten_layers() if not getattr(layer, "supports_jit", True)]
