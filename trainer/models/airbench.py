"""airbench94 (Keller Jordan, KellerJordan/cifar10-airbench, airbench94.py) in Keras 3 terms.

whiten: 2x2 conv, 24 filters (the 12 eigenvectors of the training images' 2x2-patch covariance,
each scaled by 1/sqrt(eigenvalue + 5e-4), and their negatives), no padding (32x32 -> 31x31),
kernel frozen, bias trained (for the first `optim.whiten_bias_epochs` epochs) -> GELU ->
3 blocks [conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU] of widths w, 4w, 4w (airbench:
64/256/256) -> maxpool 3 (3x3 -> 1x1) -> linear without bias -> x 1/9 -> softmax.

Every 3x3 conv starts as identity on its first `in_channels` filters (PyTorch's `dirac_`, an
implicit residual), the other filters at PyTorch's default init; batch norm has its scale frozen at
1 (`scale=False`), epsilon 1e-12, and the momentum the config gives (airbench: 0.6 in Keras'
convention, see configs/airbench94.yaml). The rest of the recipe lives in the config and in
`Lookahead` (airbench's lookahead EMA) and `predict_tta` (its flip + translate test-time views).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from trainer.models.common import kernel_initializer, softmax_head

WHITEN_LAYER = "whiten"
WHITEN_KERNEL = 2  # pixels: side of the whitening patches (airbench hyp net.whitening.kernel_size)
WHITEN_EPS = 5e-4  # added to each eigenvalue before 1/sqrt (airbench init_whitening_conv eps)
WHITEN_IMAGES = 5000  # first training images the patch covariance is estimated from (airbench)
BN_EPSILON = 1e-12  # airbench's BatchNorm eps (PyTorch's default is 1e-5)
LOGIT_SCALE = 1.0 / 9.0  # airbench hyp net.scaling_factor
BLOCK_WIDTHS = (1, 4, 4)  # multiples of `width`: airbench's 64/256/256 at base width 64


@keras.saving.register_keras_serializable(package="trainer")
class PartialDirac(keras.initializers.Initializer):
    """A conv kernel [kh, kw, in, out] whose first min(in, out) filters are the identity (a 1 at
    the centre tap, channel i -> filter i; PyTorch's `nn.init.dirac_(w[:in_channels])`) and whose
    other filters come from `base` (PyTorch's default conv init unless given)."""

    def __init__(self, base: Any = None) -> None:
        self.base = keras.initializers.get(base) if base is not None else kernel_initializer("torch")

    def __call__(self, shape: Sequence[int], dtype: Any = None) -> Any:
        kh, kw, cin, cout = (int(s) for s in shape)
        identity = np.zeros((kh, kw, cin, cout), dtype="float32")
        n = min(cin, cout)
        identity[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        # Filters 0..n-1 are entirely the identity (zeros off-centre), as dirac_ writes them.
        is_identity = np.zeros((1, 1, 1, cout), dtype=bool)
        is_identity[..., :n] = True
        base = self.base(shape, dtype=dtype)
        return ops.where(is_identity, ops.cast(identity, base.dtype), base)

    def get_config(self) -> dict[str, Any]:
        return {"base": keras.initializers.serialize(self.base)}


@keras.saving.register_keras_serializable(package="trainer")
class Whitening(layers.Layer):
    """airbench's first layer: a valid (unpadded) conv whose kernel is frozen (non-trainable) and
    set from data by `set_from_images`; only its bias trains. Before that call the kernel holds
    PyTorch's default conv init, as airbench's layer does before `init_whitening_conv`."""

    def __init__(self, kernel_size: int = WHITEN_KERNEL, eps: float = WHITEN_EPS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)
        self.eps = float(eps)

    def build(self, input_shape: Sequence[int | None]) -> None:
        channels = int(input_shape[-1])
        filters = 2 * channels * self.kernel_size**2  # eigenvectors and their negatives
        self.kernel = self.add_weight(
            shape=(self.kernel_size, self.kernel_size, channels, filters),
            initializer=kernel_initializer("torch"),
            trainable=False,  # airbench: net[0].weight.requires_grad = False
            name="kernel",
        )
        self.bias = self.add_weight(shape=(filters,), initializer="zeros", trainable=True, name="bias")

    def call(self, inputs: Any) -> Any:
        kernel = ops.cast(self.kernel, inputs.dtype)
        x = ops.conv(inputs, kernel, strides=1, padding="valid")
        return ops.add(x, ops.cast(self.bias, x.dtype))

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        n, h, w, c = input_shape
        k = self.kernel_size
        out_h = None if h is None else h - k + 1
        out_w = None if w is None else w - k + 1
        return (n, out_h, out_w, 2 * int(c) * k * k)

    def set_from_images(self, normalized: np.ndarray) -> None:
        """Set the kernel from normalized images [N, H, W, C] (the input this layer sees)."""
        self.kernel.assign(whitening_kernel(normalized, self.kernel_size, self.eps).astype("float32"))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "kernel_size": self.kernel_size, "eps": self.eps}


def patch_covariance(
    normalized: np.ndarray, kernel_size: int = WHITEN_KERNEL, chunk: int = 256
) -> np.ndarray:
    """The [k*k*C, k*k*C] second-moment matrix of every stride-1 k x k patch (airbench's
    `patches_flat.T @ patches_flat / n`, not mean-centred), patches flattened in (row, col, channel)
    order = a Keras kernel's [kh, kw, in] layout. float64, in chunks to bound memory."""
    images = np.asarray(normalized)
    if images.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
    dim = kernel_size * kernel_size * images.shape[-1]
    total = np.zeros((dim, dim), dtype=np.float64)
    count = 0
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].astype(np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(part, (kernel_size, kernel_size), axis=(1, 2))
        # windows: [n, H-k+1, W-k+1, C, kh, kw] -> [patches, kh, kw, C]
        flat = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim)
        total += flat.T @ flat
        count += len(flat)
    if count == 0:
        raise ValueError("no images to estimate the whitening patch covariance from")
    return total / count


def whitening_kernel(
    normalized: np.ndarray, kernel_size: int = WHITEN_KERNEL, eps: float = WHITEN_EPS
) -> np.ndarray:
    """airbench's whitening filters as a Keras kernel [k, k, C, 2*k*k*C]: eigenvectors of the patch
    covariance in descending eigenvalue order, each divided by sqrt(eigenvalue + eps), then the
    same filters negated (so the GELU after it keeps both signs)."""
    channels = np.asarray(normalized).shape[-1]
    eigenvalues, eigenvectors = np.linalg.eigh(patch_covariance(normalized, kernel_size))
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)  # columns = filters
    filters = np.concatenate([scaled, -scaled], axis=1)
    return filters.reshape(kernel_size, kernel_size, channels, -1)


def initialize_whitening(
    model: keras.Model, images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> bool:
    """Set every Whitening layer of `model` from the first WHITEN_IMAGES raw images [N, 32, 32, 3]
    (0..255), normalized with the model's `mean`/`std` as its stem does. False when it has none."""
    found = [layer for layer in model._flatten_layers() if isinstance(layer, Whitening)]
    if not found:
        return False
    pixels = np.asarray(images[:WHITEN_IMAGES], dtype=np.float32)
    normalized = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    for layer in found:
        layer.set_from_images(normalized)
    return True


def _conv(x: keras.KerasTensor, filters: int, *, name: str) -> keras.KerasTensor:
    # airbench's Conv: bias-free, 'same', PyTorch default init with the identity on the first filters.
    return layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=PartialDirac(),
                         name=name)(x)


def _bn(x: keras.KerasTensor, *, bn_momentum: float, name: str) -> keras.KerasTensor:
    # scale=False: airbench freezes the BN weight at 1 (requires_grad=False); the offset trains.
    return layers.BatchNormalization(momentum=bn_momentum, epsilon=BN_EPSILON, scale=False, name=name)(x)


def _block(
    x: keras.KerasTensor, filters: int, *, bn_momentum: float, name: str, last: bool
) -> keras.KerasTensor:
    x = _conv(x, filters, name=f"{name}_conv1")
    x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = _bn(x, bn_momentum=bn_momentum, name=f"{name}_bn1")
    x = layers.Activation("gelu", name=f"{name}_gelu1")(x)
    x = _conv(x, filters, name=f"{name}_conv2")
    x = _bn(x, bn_momentum=bn_momentum, name=f"{name}_bn2")
    # The last block's output is named "last_conv": Grad-CAM reads it.
    return layers.Activation("gelu", name="last_conv" if last else f"{name}_gelu2")(x)


def body(
    x: keras.KerasTensor, *, width: int, dropout: float, bn_momentum: float, init: str
) -> keras.KerasTensor:
    """`init` is accepted for the registry's contract; airbench's convs always use PyTorch's
    default + identity (PartialDirac) and the whitening kernel comes from the data."""
    del init
    x = Whitening(name=WHITEN_LAYER)(x)
    x = layers.Activation("gelu", name="whiten_gelu")(x)  # exact (erf) GELU, as PyTorch's nn.GELU
    for i, multiple in enumerate(BLOCK_WIDTHS):
        last = i == len(BLOCK_WIDTHS) - 1
        x = _block(x, multiple * width, bn_momentum=bn_momentum, name=f"block{i + 1}", last=last)
    x = layers.MaxPooling2D(3, name="final_pool")(x)  # 3x3 -> 1x1 (airbench nn.MaxPool2d(3))
    x = layers.Flatten(name="flatten")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return x


def head(x: keras.KerasTensor, num_classes: int, *, bias: bool, init: str) -> keras.KerasTensor:
    return softmax_head(x, num_classes, scale=LOGIT_SCALE, bias=bias, init=init)


class Lookahead(keras.callbacks.Callback):
    """airbench94's "lookahead EMA" (its LookaheadState), which Keras' `use_ema` is not.

    From epoch `start_epoch` (0-based) on, every `every_steps` optimizer steps: the first time, keep
    a copy of the model's float variables; afterwards average = rho * average + (1 - rho) * weights
    with rho = (decay ** every_steps) * (step / total_steps) ** decay_pow, and COPY THE AVERAGE BACK
    INTO THE MODEL (training continues from it). At each epoch end the model is set to the average
    once more. Differences from Keras' use_ema: that keeps the average apart from the training
    weights, updates it every step with a constant momentum from step 0, and averages trainable
    variables only; airbench's averages batch-norm moving statistics too, as this does.

    At an epoch end the model equals the average, so a run resumed at epoch e > start_epoch starts
    from an exact average (which is why nothing needs checkpointing); `step` counts global optimizer
    steps as epoch * steps_per_epoch + batch + 1 (exact only when the first epoch with updates has
    at least `every_steps` steps, as airbench's 48 >= 5). With steps_per_execution > 1 the
    callback sees every k-th step and updates when a multiple of `every_steps` was passed.
    """

    def __init__(
        self,
        total_steps: int,
        steps_per_epoch: int,
        *,
        decay: float = 0.95,
        every_steps: int = 5,
        start_epoch: int = 3,
        decay_pow: float = 3.0,
    ) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"lookahead decay must be in (0, 1), got {decay}")
        if every_steps < 1 or steps_per_epoch < 1 or total_steps < 1:
            raise ValueError("lookahead every_steps, steps_per_epoch and total_steps must be >= 1")
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay = float(decay)
        self.every_steps = int(every_steps)
        self.start_epoch = int(start_epoch)
        self.decay_pow = float(decay_pow)
        self.average: list[Any] | None = None
        self._epoch = 0
        self._last_step = 0

    def _variables(self) -> list[Any]:
        # Weights and BN statistics; not the augmentation layers' integer seed states.
        return [v for v in self.model.variables if "float" in str(v.dtype)]

    def _sync(self) -> None:
        # Under JAX, fit keeps the state outside the variables between epochs; writing them from a
        # callback needs this sync first (then fit re-reads the variables on the next step).
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def _update(self, rho: float) -> None:
        self._sync()
        variables = self._variables()
        if self.average is None:
            self.average = [ops.copy(v.value) for v in variables]
            return
        new = []
        for v, avg in zip(variables, self.average, strict=True):
            # avg + (1 - rho) * (w - avg): torch's lerp_, exact where w == avg (a frozen variable)
            value = ops.add(avg, ops.multiply(ops.subtract(ops.cast(v.value, avg.dtype), avg), 1.0 - rho))
            v.assign(value)
            new.append(value)
        self.average = new

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._last_step = epoch * self.steps_per_epoch
        if self.average is None and epoch > self.start_epoch:  # resumed after the average began
            self._update(0.0)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = self._epoch * self.steps_per_epoch + batch + 1
        passed = step // self.every_steps > self._last_step // self.every_steps
        self._last_step = step
        if self._epoch >= self.start_epoch and passed:
            done = min(step, self.total_steps) / self.total_steps
            self._update((self.decay**self.every_steps) * done**self.decay_pow)
        if batch + 1 >= self.steps_per_epoch:
            # The epoch's last step: copy the average back now, before fit validates (airbench
            # evaluates after its update(decay=1.0)); on_epoch_end repeats it harmlessly.
            self.on_epoch_end(self._epoch)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.average is not None:
            self._update(1.0)  # copy the average back (airbench: update(decay=1.0) after each epoch)


def lookahead_callbacks(train_cfg: Any, steps_per_epoch: int) -> list[keras.callbacks.Callback]:
    """[Lookahead] as the `train` section of a config sets it (lookahead_* fields), or [] when off."""
    t = train_cfg
    if not t.lookahead_decay:
        return []
    return [
        Lookahead(
            steps_per_epoch * t.epochs,
            steps_per_epoch,
            decay=t.lookahead_decay,
            every_steps=t.lookahead_every_steps,
            start_epoch=t.lookahead_start_epoch,
            decay_pow=t.lookahead_decay_pow,
        )
    ]


# airbench94's test-time views (tta_level 2): weight 1/2 the image, 1/4 each of it translated by one
# pixel up-left and down-right (reflect padding); each view also mirrored, half and half.
TTA_SHIFTS = ((0, 0, 0.5), (-1, -1, 0.25), (1, 1, 0.25))  # (dy, dx, weight)


def _translate(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moved by (dy, dx) pixels, edges reflected (airbench: crops of a reflect-padded image;
    its crop [0:32, 0:32] of the 1-padded image is the content moved down-right by one, here +1)."""
    if dy == 0 and dx == 0:
        return images
    pad = max(abs(dy), abs(dx))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    return np.ascontiguousarray(padded[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w, :])


def predict_tta(model: keras.Model, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """airbench94's flip + translate test-time augmentation: probabilities [N, classes].

    airbench averages logits over the 6 views; the model here ends in a softmax, so this averages
    log-probabilities instead, which ranks the classes exactly as averaged logits do (each view's
    log-softmax is its logits minus a per-image constant) and returns their softmax.
    """
    from trainer.export.tta import mirror  # the flip the exported signatures use

    log_probs = None
    for dy, dx, weight in TTA_SHIFTS:
        view = _translate(np.asarray(images, dtype=np.float32), dy, dx)
        for v in (view, np.ascontiguousarray(mirror(view))):
            p = np.asarray(model.predict(v, batch_size=batch_size, verbose=0), dtype=np.float64)
            term = 0.5 * weight * np.log(np.clip(p, 1e-30, 1.0))
            log_probs = term if log_probs is None else log_probs + term
    assert log_probs is not None
    shifted = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


__all__ = [
    "BN_EPSILON",
    "Lookahead",
    "PartialDirac",
    "WHITEN_LAYER",
    "Whitening",
    "body",
    "head",
    "initialize_whitening",
    "lookahead_callbacks",
    "patch_covariance",
    "predict_tta",
    "whitening_kernel",
]
