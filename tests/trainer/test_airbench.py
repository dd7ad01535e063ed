"""The airbench arch and configs/airbench94.yaml against airbench94.py (KellerJordan/cifar10-airbench).

The NumPy references below are written from airbench94.py's own code (its main(): summed loss,
torch.optim.SGD parameter groups with lr / kilostep_scale, weight decay wd / lr, bias_scaler,
LambdaLR over `triangle`, requires_grad=False for the whitening bias after 3 epochs; its
LookaheadState; its get_whitening_parameters), not from trainer/: the Keras side must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.jax_subprocess import run_under_jax
from tests.trainer.preemption import KillAfterEpoch, Killed
from trainer import config as config_mod
from trainer.models import build_model
from trainer.models.airbench import WHITEN_EPS, Lookahead, PartialDirac, predict_tta
from trainer.optimizers import TorchSGD, build_optimizer, build_schedule
from trainer.recipe import resolve

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT_ROOT / "configs" / "airbench94.yaml"

# airbench94.py hyp['opt'] (the anchor's numbers, in its own units).
AB_LR, AB_WD, AB_MOMENTUM, AB_BIAS_SCALER, AB_BATCH = 11.5, 0.0153, 0.85, 64.0, 1024


def airbench_config(**sections: dict) -> config_mod.Config:
    config = config_mod.load(CONFIG)
    payload = {name: values for name, values in sections.items()}
    return config_mod.from_dict(payload, config) if payload else config


def triangle(steps: int, start: float, end: float, peak: float) -> np.ndarray:
    """airbench94's lr multipliers: linear through (0, start), (int(peak*steps), 1), (steps, end)."""
    return np.interp(np.arange(steps + 1), [0, int(peak * steps), steps], [start, 1.0, end])


def airbench_sgd(params: dict[str, np.ndarray], mean_grads: list[dict[str, np.ndarray]], total_steps: int,
                 whiten_frozen_from: int) -> dict[str, np.ndarray]:
    """airbench94's optimizer loop in NumPy (float64): summed loss (g_sum = B * g_mean), two
    parameter groups, Nesterov torch.optim.SGD, LambdaLR(triangle), whitening bias skipped from
    step `whiten_frozen_from` on (requires_grad False -> grad None -> PyTorch skips it)."""
    kilostep_scale = 1024 * (1 + 1 / (1 - AB_MOMENTUM))
    lr = AB_LR / kilostep_scale
    wd = AB_WD * AB_BATCH / kilostep_scale
    lr_biases = lr * AB_BIAS_SCALER
    # norm_biases (BN offsets): lr_biases, wd / lr_biases; other_params: lr, wd / lr.
    group = {n: ((lr_biases, wd / lr_biases) if n.endswith("beta") else (lr, wd / lr)) for n in params}
    schedule = triangle(total_steps, start=0.2, end=0.07, peak=0.23)
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for k, grads in enumerate(mean_grads):
        for name in p:
            if name == "whiten/bias" and k >= whiten_frozen_from:
                continue
            group_lr, group_wd = group[name]
            d = AB_BATCH * grads[name] + group_wd * p[name]
            buf[name] = AB_MOMENTUM * buf[name] + d  # first step: 0 + d = PyTorch's clone(d)
            p[name] -= group_lr * schedule[k] * (d + AB_MOMENTUM * buf[name])
    return p


def test_the_config_loads_and_resolves_to_airbench_numbers():
    config = config_mod.load(CONFIG)
    recipe = resolve(config, 50_000)
    assert (config.model.arch, recipe.width, recipe.batch_size) == ("airbench", 64, 1024)
    assert recipe.steps_per_epoch == 48 and recipe.total_steps == 480  # airbench: 476 (9.9 epochs)
    # lr and weight decay follow from airbench's own numbers, not copied: see the YAML header.
    assert recipe.lr == pytest.approx(AB_LR / (1 + 1 / (1 - AB_MOMENTUM)))
    assert config.optim.weight_decay == pytest.approx(AB_WD / AB_LR)
    assert config.optim.bn_momentum == 0.6  # Keras convention; PyTorch's momentum arg is 0.4
    # At another batch the lr scales linearly, as airbench's lr "per 1024 examples" does.
    half = config_mod.from_dict({"train": {"batch_size": 512}}, config)
    assert resolve(half, 50_000).lr == pytest.approx(0.75)


def test_the_optimizer_from_the_config_replays_airbench_sgd():
    """Same weights and mean-loss gradients through the config's optimizer and airbench's loop."""
    config = airbench_config()
    total_steps, steps_per_epoch = 10, 2  # whitening bias frozen after 3 epochs = 6 steps
    rng = np.random.default_rng(0)
    shapes = {"block1_conv1/kernel": (3, 3, 2, 4), "block1_bn1/beta": (4,), "logits/kernel": (4, 3),
              "whiten/bias": (6,)}
    params = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    grads = [{name: rng.normal(scale=1e-3, size=shape) for name, shape in shapes.items()}
             for _ in range(total_steps)]
    expected = airbench_sgd(params, grads, total_steps, whiten_frozen_from=3 * steps_per_epoch)

    optimizer = build_optimizer(config.optim, total_steps, steps_per_epoch=steps_per_epoch)
    assert isinstance(optimizer, TorchSGD)
    variables = {}
    for name, value in params.items():
        scope, leaf = name.split("/")
        with keras.name_scope(scope):
            variables[name] = keras.Variable(value.astype(np.float32), name=leaf)
    for step_grads in grads:
        optimizer.apply_gradients([(step_grads[n].astype(np.float32), variables[n]) for n in shapes])
    for name in shapes:
        got = keras.ops.convert_to_numpy(variables[name])
        np.testing.assert_allclose(got, expected[name], rtol=2e-5, atol=2e-6, err_msg=name)
    # The frozen bias really stopped (and moved before): a wrong freeze would fail above too.
    assert not np.allclose(expected["whiten/bias"], params["whiten/bias"])


def test_the_parameter_groups_hold_inside_an_xla_compiled_train_step():
    """The whitening-bias freeze and the BN-offset lr scale are decided per variable at trace time
    and by the step counter inside the compiled step: check them through fit's XLA path."""
    config = airbench_config()
    images = smooth_images(16, seed=4)
    model = build_model("airbench", num_classes=10, mean=images.mean(axis=(0, 1, 2)),
                        std=images.std(axis=(0, 1, 2)), width=4, whitening_images=images)
    # 1 step per "epoch": the whitening bias trains for whiten_bias_epochs (3) steps, then stops.
    model.compile(optimizer=build_optimizer(config.optim, 6, steps_per_epoch=1),
                  loss="sparse_categorical_crossentropy", jit_compile=True)
    kernel = keras.ops.convert_to_numpy(model.get_layer("whiten").kernel)
    labels = np.arange(16) % 10
    biases = [keras.ops.convert_to_numpy(model.get_layer("whiten").bias)]
    for _ in range(5):
        assert np.isfinite(model.train_on_batch(images, labels))
        biases.append(keras.ops.convert_to_numpy(model.get_layer("whiten").bias))
    assert model.jit_compile is True
    assert all(not np.array_equal(biases[k], biases[k + 1]) for k in range(3))  # steps 0, 1, 2 train
    np.testing.assert_array_equal(biases[4], biases[3])  # frozen from step 3 on
    np.testing.assert_array_equal(biases[5], biases[3])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("whiten").kernel), kernel)


def test_the_schedule_is_airbench_triangle():
    config = airbench_config()
    total = 476
    schedule = build_schedule(config.optim, total)
    got = np.array([float(schedule(k)) for k in range(total)]) / config.optim.lr
    np.testing.assert_allclose(got, triangle(total, 0.2, 0.07, 0.23)[:total], atol=1e-6)


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """Correlated pixels (blurred noise with mixed channels), as photos are: a patch covariance far
    from the identity, which the whitening layer must undo."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, 34, 34, 3))
    blurred = (noise[:, :-2, :-2] + noise[:, 1:-1, 1:-1] + noise[:, 2:, 2:] + noise[:, 1:-1, :-2]) / 4
    mixed = blurred @ np.array([[1.0, 0.6, 0.3], [0.2, 1.0, 0.5], [0.1, 0.4, 1.0]])
    return np.clip(128 + 40 * mixed, 0, 255).astype(np.float32)


def test_the_whitening_conv_whitens_patches_and_is_frozen():
    images = smooth_images(64)
    mean, std = images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))
    model = build_model("airbench", num_classes=10, mean=mean, std=std, width=8, whitening_images=images)
    whiten = model.get_layer("whiten")
    assert [v.path for v in whiten.trainable_variables] == ["whiten/bias"]
    assert "whiten/kernel" in [v.path for v in model.non_trainable_variables]
    out = keras.ops.convert_to_numpy(keras.Model(model.input, whiten.output)(images)).reshape(-1, 24)
    # airbench's reference: eigendecomposition of the uncentred second moment of 2x2 patches.
    x = (images - mean) / std
    patches = np.stack([x[:, i:i + 31, j:j + 31, :] for i in (0, 1) for j in (0, 1)], axis=3).reshape(-1, 12)
    eigenvalues = np.linalg.eigvalsh(patches.T @ patches / len(patches))[::-1]
    first, second = out[:, :12], out[:, 12:]
    np.testing.assert_allclose(second, -first, atol=1e-5)  # the negated copies
    covariance = first.T @ first / len(first)
    # Identity up to airbench's eps: diag(lambda / (lambda + 5e-4)), zero off the diagonal.
    np.testing.assert_allclose(covariance, np.diag(eigenvalues / (eigenvalues + WHITEN_EPS)), atol=2e-4)
    assert np.diag(covariance).min() > 0.9
    # The inputs were far from white: the whitening did the work.
    assert eigenvalues.max() / eigenvalues.min() > 20


def test_identity_initialised_convs_pass_their_input_through():
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    wider = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, kernel_initializer=PartialDirac())
    y = keras.ops.convert_to_numpy(wider(x))
    np.testing.assert_array_equal(y[..., :4], x)  # first in_channels filters: dirac
    assert np.abs(y[..., 4:]).min() >= 0 and np.abs(y[..., 4:]).mean() > 0.1  # the rest: random init
    narrower = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, kernel_initializer=PartialDirac())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(narrower(x)), x[..., :3])
    # In the model: a block's second conv (square) is the identity at init.
    model = build_model("airbench", num_classes=10, mean=[0.0] * 3, std=[1.0] * 3, width=8)
    kernel = keras.ops.convert_to_numpy(model.get_layer("block2_conv2").kernel)
    identity = np.zeros_like(kernel)
    identity[1, 1, np.arange(32), np.arange(32)] = 1.0
    np.testing.assert_array_equal(kernel, identity)


def airbench_lookahead(initial: list[np.ndarray], deltas: list[list[np.ndarray]], steps_per_epoch: int,
                       total: int) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """airbench94's training loop with its LookaheadState (start_epochs 1, every_n_steps 2, decay_base
    0.9, decay_pow 3 here), where optimizer step k 'trains' by adding deltas[k] to the weights.
    Returns the weights after each step (before the lookahead acts) and the final weights."""
    weights = [w.astype(np.float64) for w in initial]
    ema, snapshots, step = None, [], 0
    for epoch in range(total // steps_per_epoch):
        for _ in range(steps_per_epoch):
            weights = [w + d for w, d in zip(weights, deltas[step], strict=True)]
            snapshots.append(weights)
            step += 1
            if epoch >= 1 and step % 2 == 0:
                if ema is None:
                    ema = [w.copy() for w in weights]
                else:
                    rho = 0.9**2 * (step / total) ** 3.0
                    ema = [e + (1 - rho) * (w - e) for e, w in zip(ema, weights, strict=True)]  # lerp_
                    weights = [e.copy() for e in ema]  # net_param.copy_(ema_param)
        if ema is not None:
            weights = [e.copy() for e in ema]  # update(decay=1.0) after each epoch
    return snapshots, weights


def test_lookahead_matches_airbench_lookahead_state():
    """Drive the callback as fit does; each step 'trains' by adding a known delta to the weights."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    variables = [v for v in model.variables if "float" in str(v.dtype)]
    assert len(variables) == 6  # kernel, bias, gamma, beta and the BN moving statistics
    steps_per_epoch, total = 4, 12
    rng = np.random.default_rng(2)
    deltas = [[rng.normal(size=v.shape) for v in variables] for _ in range(total)]
    initial = [keras.ops.convert_to_numpy(v) for v in variables]
    expected_snapshots, expected_final = airbench_lookahead(initial, deltas, steps_per_epoch, total)

    callback = Lookahead(total, steps_per_epoch, decay=0.9, every_steps=2, start_epoch=1, decay_pow=3.0)
    callback.set_model(model)
    step = 0
    for epoch in range(total // steps_per_epoch):
        callback.on_epoch_begin(epoch)
        for batch in range(steps_per_epoch):
            for v, d in zip(variables, deltas[step], strict=True):
                v.assign(keras.ops.convert_to_numpy(v) + d.astype(np.float32))
            for v, want in zip(variables, expected_snapshots[step], strict=True):
                np.testing.assert_allclose(keras.ops.convert_to_numpy(v), want, rtol=1e-5, atol=1e-5)
            callback.on_train_batch_end(batch)
            step += 1
        callback.on_epoch_end(epoch)
    for v, want in zip(variables, expected_final, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(v), want, rtol=1e-5, atol=1e-5)
    # Not a no-op: the final weights differ from plain training (the sum of all deltas).
    plain = [w + sum(d[i] for d in deltas) for i, w in enumerate(initial)]
    assert not np.allclose(expected_final[0], plain[0])


def test_tta_weights_six_views_as_airbench():
    """predict_tta ranks classes as airbench's mean of logits over its 6 weighted views."""
    images = smooth_images(8, seed=3)
    model = build_model("airbench", num_classes=10, mean=images.mean(axis=(0, 1, 2)),
                        std=images.std(axis=(0, 1, 2)), width=8, whitening_images=images)
    logits_model = keras.Model(model.input, model.get_layer("logit_scale").output)

    def logits(x: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(logits_model(x)).astype(np.float64)

    def mirror(x: np.ndarray) -> np.ndarray:
        return 0.5 * logits(x) + 0.5 * logits(x[:, :, ::-1])

    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, 2:34, 2:34], padded[:, 0:32, 0:32]
    expected = 0.5 * mirror(images) + 0.25 * mirror(down_right) + 0.25 * mirror(up_left)
    got = predict_tta(model, images)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-9)
    softmax = np.exp(expected - expected.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got, softmax / softmax.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


# A tiny airbench run: the real recipe at width 8 on 256 generated images, lookahead and the
# whitening-bias freeze both inside its 2 epochs of 4 steps.
TINY = {
    "data": {"dataset": "synthetic", "num_train": 256, "num_test": 64, "val_fraction": 0.0},
    "model": {"width": 8},
    "optim": {"whiten_bias_epochs": 1, "lr": 0.1},
    "train": {"epochs": 2, "batch_size": 64, "lookahead_start_epoch": 1, "lookahead_every_steps": 2,
              "tensorboard": False, "verbose": 0, "mixed_precision": "off"},
}

def tiny_run(run_dir: str) -> dict:
    """Train TINY with the real trainer (fit, checkpoints, model.keras) under the current backend."""
    from trainer import run_files
    from trainer.models.airbench import initialize_whitening
    from trainer.train import train

    config = config_mod.from_dict(TINY, config_mod.load(CONFIG))
    biases = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            biases.append(keras.ops.convert_to_numpy(self.model.get_layer("whiten").bias).tolist())

    result = train(config, run_dir, callbacks=[Record()], evaluate=False, log=lambda _m: None)
    model = keras.saving.load_model(f"{run_dir}/model.keras")
    dataset = run_files.load_run_dataset(config)
    fresh = keras.models.clone_model(model)
    initialize_whitening(fresh, dataset.x_train, dataset.mean, dataset.std)
    probabilities = keras.ops.convert_to_numpy(model(dataset.x_test[:4], training=False))
    return {
        "backend": keras.backend.backend(),
        "losses": [h["loss"] for h in result.history],
        "biases": biases,
        "kernel_is_data_init": bool(np.allclose(
            keras.ops.convert_to_numpy(model.get_layer("whiten").kernel),
            keras.ops.convert_to_numpy(fresh.get_layer("whiten").kernel), atol=1e-6)),
        "probabilities_sum": probabilities.sum(axis=1).tolist(),
    }  # fmt: skip


TINY_RUN_UNDER_JAX = """
import json, sys
from tests.trainer.test_airbench import tiny_run
print("RESULT" + json.dumps(tiny_run(sys.argv[1])))
"""


def check_tiny_run(outcome: dict) -> None:
    assert len(outcome["losses"]) == 2 and all(np.isfinite(outcome["losses"]))
    assert outcome["kernel_is_data_init"]  # frozen through training and saved with the model
    b0, b1 = (np.asarray(b) for b in outcome["biases"])
    assert np.abs(b0).max() > 0  # the whitening bias trained in epoch 0 ...
    np.testing.assert_array_equal(b1, b0)  # ... and not after whiten_bias_epochs=1 (lookahead on)
    np.testing.assert_allclose(outcome["probabilities_sum"], 1.0, atol=1e-5)


@pytest.mark.slow
def test_airbench_trains_under_tensorflow(tmp_path):
    outcome = tiny_run(str(tmp_path / "run"))
    assert outcome["backend"] == "tensorflow"
    check_tiny_run(outcome)
    # The run's report carries the figure the anchor quotes: accuracy under airbench's six views.
    from trainer.evaluate import evaluate_run
    from trainer.models.airbench import predict_tta

    metrics = evaluate_run(tmp_path / "run", log=lambda _m: None)
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    from trainer import run_files

    dataset = run_files.load_run_dataset(run_files.read_config(tmp_path / "run"))
    expected = float(np.mean(predict_tta(model, dataset.x_test).argmax(axis=1) == dataset.y_test))
    assert metrics["test_accuracy_airbench_tta"] == pytest.approx(expected)


@pytest.mark.slow
def test_airbench_trains_under_jax(tmp_path):
    output = run_under_jax(TINY_RUN_UNDER_JAX, str(tmp_path / "run")).stdout
    result = next(line for line in output.splitlines() if line.startswith("RESULT"))
    outcome = json.loads(result[len("RESULT"):])
    assert outcome["backend"] == "jax"
    check_tiny_run(outcome)


@pytest.mark.slow
def test_a_resumed_airbench_run_equals_an_uninterrupted_one(tmp_path):
    """The lookahead average is not checkpointed: at an epoch end the model equals it, so a run
    resumed after its start continues exactly (the averaging and the whitening-bias freeze)."""
    from trainer.train import train

    overrides = {**TINY, "data": {**TINY["data"], "num_train": 128},
                 "train": {**TINY["train"], "epochs": 3, "batch_size": 32, "lookahead_start_epoch": 0}}
    config = config_mod.from_dict(overrides, config_mod.load(CONFIG))
    quiet = lambda _m: None  # noqa: E731
    train(config, tmp_path / "straight", evaluate=False, log=quiet)
    with pytest.raises(Killed):
        train(config, tmp_path / "killed", callbacks=[KillAfterEpoch(2)], evaluate=False, log=quiet)
    train(config, tmp_path / "killed", resume=True, evaluate=False, log=quiet)
    w1 = keras.saving.load_model(tmp_path / "straight" / "checkpoints" / "last.keras", compile=False).weights
    w2 = keras.saving.load_model(tmp_path / "killed" / "checkpoints" / "last.keras", compile=False).weights
    for v1, v2 in zip(w1, w2, strict=True):
        np.testing.assert_allclose(np.asarray(v1), np.asarray(v2), rtol=1e-4, atol=1e-5, err_msg=v1.path)
