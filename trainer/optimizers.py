"""Optimizers for a run, built from the `optim` section of its config.

`build_optimizer` makes Keras' SGD (decoupled weight decay, the trainer's historical default),
PyTorch-semantics SGD (`TorchSGD`, coupled weight decay, selected by
`optim.weight_decay_style: coupled`), Adam or RMSprop, each driven by a `WarmupSchedule`.

Why a PyTorch-semantics SGD: the fast CIFAR-10 recipes this project copies (Page's ResNet-9,
configs/resnet9.yaml) were tuned with `torch.optim.SGD`, which differs from `keras.optimizers.SGD`
in three ways. Written for parameter w, gradient g, momentum m, learning rate lr_t at step t:

    PyTorch SGD (dampening 0)               Keras SGD (weight_decay = wd)
    d = g + wd * w          (coupled)       w -= lr_t * wd * w        (decoupled, before the step)
    b = m * b + d                           v = m * v - lr_t * g
    w -= lr_t * (d + m * b) (Nesterov)      w += m * v - lr_t * g     (Nesterov)
    w -= lr_t * b           (plain)         w += v                    (plain)

Conversions from Page's recipe to `TorchSGD` (B = batch size):

* Loss reduction and lr: Page sums the loss over the batch and divides the lr by B
  (lr_p = 0.4 / 512); Keras averages the loss, so its gradient is g_sum / B. The update only sees
  lr_p * g_sum = (lr_p * B) * g_mean, hence lr = lr_p * B (0.4 here).
* Weight decay: PyTorch adds wd_p * w to the summed-loss gradient (wd_p = 5e-4 * 512). With the
  lr rescaled above, lr_p * (g_sum + wd_p * w) = lr * (g_mean + (wd_p / B) * w), hence
  weight_decay = wd_p / B (5e-4 here), added to the mean-loss gradient before momentum.
* Coupled vs decoupled: coupled decay enters the momentum buffer, so a steady decay pull is
  amplified by 1 / (1 - m) (10x at m = 0.9), and with Nesterov it also enters the look-ahead term.
  Keras' decoupled `weight_decay` subtracts lr * wd * w once per step outside the buffer, so
  copying 5e-4 into it decays ~10x less than Page did. That is why the coupled style exists.
* Momentum convention: PyTorch keeps the lr outside the buffer (b sums raw gradients) and
  multiplies the whole step by the current lr; Keras folds each step's lr into its velocity. The
  two agree while the lr is constant, but under a schedule Keras' velocity still carries earlier
  (larger or smaller) lrs, so the steps differ. TorchSGD keeps PyTorch's convention.
* Buffer start: PyTorch sets b = d on the first step; with dampening 0 that equals m * 0 + d, so
  a zero-initialized Keras optimizer variable reproduces it (dampening is not supported).
* Schedule index: Keras evaluates the schedule at the step count before the step (0 first);
  Page's wrapper increments its counter first, so his step k uses lr(k). One step of shift, left
  as is (it only matters with start_factor 0, where Keras' first step has lr 0).
* Batch-norm: unrelated to the optimizer, but PyTorch's BN momentum is 1 - Keras' (see OptimConfig).

airbench94's conversions (its lr and weight decay "per 1024 examples" divided by a kilostep scale,
its bias_scaler parameter group, the whitening bias frozen after 3 epochs) are written out in
configs/airbench94.yaml and tested in tests/trainer/test_airbench.py.

Keras 3's own optimizers cannot express this: every one applies `weight_decay` decoupled, SGD keeps
the lr inside its velocity, and there is no hook to transform gradients between clipping and the
update step. `TorchSGD` therefore overrides only `update_step` (keras.ops only, so it runs and
XLA-compiles under TensorFlow and JAX) and reuses Keras' machinery for everything else: schedule
evaluation at `optimizer.iterations`, `exclude_from_weight_decay`, clipping, loss scaling,
gradient accumulation, EMA and serialization.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import keras
from keras import ops

from trainer.schedules import WarmupSchedule

OPTIMIZERS = ("sgd", "adam", "rmsprop")
WEIGHT_DECAY_STYLES = ("decoupled", "coupled")
# Biases and batch-norm scale/offset get no weight decay (matched anywhere in a variable's name,
# as `exclude_from_weight_decay(var_names=...)` does). Page's ResNet-9 decays every trainable
# parameter (its convolutions and classifier have no bias, so that means the BN scale/offset too);
# pass `no_decay=()` to build_optimizer to reproduce that exactly.
NO_DECAY = ("bias", "gamma", "beta")
# Variable paths (regular expressions, re.search) of airbench's parameter groups: batch-norm
# offsets get optim.bias_lr_scale; the whitening conv's bias stops training after
# optim.whiten_bias_epochs (trainer/models/airbench.py names that layer "whiten").
NORM_BIAS_PATTERN = r"(^|/)beta$"
WHITEN_BIAS_PATTERN = r"(^|/)whiten/bias$"


class OptimSettings(Protocol):
    """The fields of trainer.config.OptimConfig that build_optimizer reads."""

    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    warmup_fraction: float
    start_factor: float
    end_factor: float


@keras.saving.register_keras_serializable(package="trainer")
class TorchSGD(keras.optimizers.Optimizer):
    """SGD with PyTorch's semantics: momentum buffer without the lr, coupled L2 weight decay.

    Per variable w with mean-loss gradient g at step t (lr_t from the schedule):

        d = g + weight_decay * w        (unless w is excluded from weight decay)
        b = momentum * b + d
        w -= lr_t * (d + momentum * b)  if nesterov, else  w -= lr_t * b

    This is `torch.optim.SGD(lr, momentum, weight_decay, nesterov, dampening=0)` on the same
    gradient. Parameter groups as airbench94 uses them: `lr_scales` maps a regular expression on
    a variable's path to a multiplier of its lr; its coupled weight decay is divided by the same
    multiplier, so the per-step decay lr * wd is the group-independent one (airbench's
    bias_scaler: "scales up learning rate (but not weight decay)"). `train_steps` maps a pattern
    to a step count after which the variable is not updated at all (no gradient, momentum or
    decay: PyTorch skips a parameter whose requires_grad turned False). `weight_decay` here is
    PyTorch's (coupled) coefficient; Keras' decoupled decay is kept off (the base class sees
    `weight_decay=None`). Exclude variables with
    `exclude_from_weight_decay(var_names=...)` before the optimizer is built, as with Keras'
    optimizers. See the module docstring for converting a summed-loss recipe.
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = None,
        name: str = "torch_sgd",
        lr_scales: Mapping[str, float] | None = None,
        train_steps: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        # weight_decay=None for the base class: its `_apply_weight_decay` is the decoupled kind.
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs a momentum > 0 (as in torch.optim.SGD)")
        if weight_decay is not None and weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.coupled_weight_decay = float(weight_decay) if weight_decay else 0.0
        self.lr_scales = {str(k): float(v) for k, v in (lr_scales or {}).items()}
        self.train_steps = {str(k): int(v) for k, v in (train_steps or {}).items()}
        if any(v <= 0.0 for v in self.lr_scales.values()):
            raise ValueError(f"lr_scales must be > 0, got {self.lr_scales}")

    def _first_match(self, table: Mapping[str, Any], variable: Any) -> Any:
        # Resolved in Python at trace time (the path is static), so it costs nothing per step.
        # Under TensorFlow update_step sees the backend's tf.Variable (name "scope/beta:0", no
        # path): look up the Keras variable it belongs to.
        keras_variable = self._trainable_variables[self._get_variable_index(variable)]
        path = keras_variable.path
        return next((value for pattern, value in table.items() if re.search(pattern, path)), None)

    def build(self, variables: Sequence[Any]) -> None:
        if self.built:
            return
        super().build(variables)
        # Zero-initialized buffers equal PyTorch's "b = d on the first step" (dampening 0).
        self.momentums = self.add_optimizer_variables(variables, "momentum") if self.momentum else []

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        lr = ops.cast(learning_rate, variable.dtype)
        d = ops.cast(gradient, variable.dtype)
        scale = self._first_match(self.lr_scales, variable) or 1.0
        if scale != 1.0:
            lr = ops.multiply(lr, ops.convert_to_tensor(scale, dtype=variable.dtype))
        steps_limit = self._first_match(self.train_steps, variable)
        # 1 while the variable still trains, 0 after its last step (iterations counts steps done).
        active = None if steps_limit is None else ops.cast(
            ops.less(self.iterations, steps_limit), variable.dtype
        )
        # `_use_weight_decay` is Keras' own lookup of `exclude_from_weight_decay` (resolved in
        # Python at trace time, so it costs nothing inside a compiled step).
        if self.coupled_weight_decay and self._use_weight_decay(variable):
            wd = ops.convert_to_tensor(self.coupled_weight_decay / scale, dtype=variable.dtype)
            d = ops.add(d, ops.multiply(wd, variable))
        if not self.momentum:
            update = ops.multiply(lr, d)
            self.assign_sub(variable, update if active is None else ops.multiply(active, update))
            return
        # convert_to_tensor, not cast: ops.cast(0.9, "float64") goes through float32 first.
        m = ops.convert_to_tensor(self.momentum, dtype=variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        new_buffer = ops.add(ops.multiply(m, buffer), d)
        step = ops.add(d, ops.multiply(m, new_buffer)) if self.nesterov else new_buffer
        update = ops.multiply(lr, step)
        if active is not None:  # frozen: buffer and variable stay as they are
            new_buffer = ops.add(buffer, ops.multiply(active, ops.subtract(new_buffer, buffer)))
            update = ops.multiply(active, update)
        self.assign(buffer, new_buffer)
        self.assign_sub(variable, update)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        # The base class wrote weight_decay=None (its decoupled kind, unused); ours is coupled.
        config.update(
            {"momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.coupled_weight_decay,
             "lr_scales": dict(self.lr_scales), "train_steps": dict(self.train_steps)}
        )
        return config


def build_schedule(optim_cfg: OptimSettings, total_steps: int) -> WarmupSchedule:
    """The run's learning rate as a function of the optimizer's step count."""
    total = max(1, int(total_steps))
    return WarmupSchedule(
        peak=optim_cfg.lr,
        total_steps=total,
        warmup_steps=int(round(optim_cfg.warmup_fraction * total)),
        kind=optim_cfg.schedule,
        start_factor=optim_cfg.start_factor,
        end_factor=optim_cfg.end_factor,
    )


def build_optimizer(
    optim_cfg: OptimSettings,
    total_steps: int,
    no_decay: Sequence[str] = NO_DECAY,
    steps_per_epoch: int | None = None,
) -> keras.optimizers.Optimizer:
    """The optimizer named by `optim_cfg.optimizer`, its lr following `build_schedule`.

    `optim_cfg.weight_decay_style` (default "decoupled") chooses how `weight_decay` acts for sgd:
    "decoupled" is Keras' SGD (w -= lr * wd * w outside the momentum; the trainer's behaviour so
    far), "coupled" is PyTorch's SGD (`TorchSGD`: wd * w added to the gradient before momentum,
    lr outside the buffer), which is what summed-loss PyTorch recipes mean by weight decay.
    adam and rmsprop are Keras' own with decoupled decay; rmsprop keeps Keras' defaults
    (rho 0.9, no momentum) as the Keras CIFAR-10 tutorials use it. Variables whose names contain
    any of `no_decay` get no weight decay, unless `optim_cfg.decay_norm_and_bias` (airbench, Page:
    every trainable variable decays). airbench's groups (coupled sgd only): `bias_lr_scale`
    multiplies the lr of batch-norm offsets (TorchSGD lr_scales), `whiten_bias_epochs` > 0 stops
    the whitening bias after that many epochs of `steps_per_epoch` steps (TorchSGD train_steps).
    """
    name = optim_cfg.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    # getattr until OptimConfig grows the field; a config without it keeps today's behaviour.
    style = getattr(optim_cfg, "weight_decay_style", "decoupled")
    if style not in WEIGHT_DECAY_STYLES:
        raise ValueError(
            f"unknown weight_decay_style {style!r}; choose one of {', '.join(WEIGHT_DECAY_STYLES)}"
        )
    if style == "coupled" and name != "sgd":
        raise ValueError(f"weight_decay_style 'coupled' is implemented for sgd only, not {name!r}")
    schedule = build_schedule(optim_cfg, total_steps)
    wd = optim_cfg.weight_decay or None
    # getattr: these fields are optional for OptimSettings-like objects (defaults = off).
    bias_lr_scale = float(getattr(optim_cfg, "bias_lr_scale", 1.0))
    whiten_bias_epochs = int(getattr(optim_cfg, "whiten_bias_epochs", 0))
    if getattr(optim_cfg, "decay_norm_and_bias", False):
        no_decay = ()
    if (bias_lr_scale != 1.0 or whiten_bias_epochs) and not (name == "sgd" and style == "coupled"):
        raise ValueError(
            "optim.bias_lr_scale and optim.whiten_bias_epochs need optimizer sgd with "
            "weight_decay_style coupled (PyTorch-semantics SGD); reset them to 1.0 and 0 otherwise"
        )
    if whiten_bias_epochs and not steps_per_epoch:
        raise ValueError("optim.whiten_bias_epochs needs steps_per_epoch to convert epochs to steps")
    opt: keras.optimizers.Optimizer
    if name == "sgd" and style == "coupled":
        opt = TorchSGD(
            learning_rate=schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov, weight_decay=wd,
            lr_scales={NORM_BIAS_PATTERN: bias_lr_scale} if bias_lr_scale != 1.0 else None,
            train_steps={WHITEN_BIAS_PATTERN: whiten_bias_epochs * int(steps_per_epoch or 0)}
            if whiten_bias_epochs else None,
        )
    elif name == "sgd":
        opt = keras.optimizers.SGD(
            learning_rate=schedule, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov, weight_decay=wd
        )
    elif name == "adam":
        opt = keras.optimizers.Adam(learning_rate=schedule, weight_decay=wd)
    else:
        opt = keras.optimizers.RMSprop(learning_rate=schedule, weight_decay=wd)
    if wd and no_decay:
        opt.exclude_from_weight_decay(var_names=list(no_decay))
    return opt
