"""The recipe a run resolves for its data: auto batch size, lr scaling, flip per dataset, warnings."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, from_dict
from trainer.recipe import AUTO_MAX_BATCH, AUTO_MIN_BATCH, AUTO_MIN_STEPS, auto_batch_size, resolve


def _config(**sections: dict) -> object:
    return from_dict(sections)


@pytest.mark.parametrize(
    ("num_train", "batch"),
    [
        (45_000, 256),  # full CIFAR-10 minus validation: the GPU recipes' batch
        (50_000, 256),
        (2_700, 64),  # the quick profile's subset
        (1_293, 32),  # the issue's ~1,400 scans less 10% validation: 40 steps/epoch, not 5
        (600, 16),  # small: never below the floor
        (40, 16),
    ],
)
def test_auto_batch_gives_enough_steps_per_epoch(num_train: int, batch: int) -> None:
    assert auto_batch_size(num_train) == batch
    assert AUTO_MIN_BATCH <= batch <= AUTO_MAX_BATCH
    if batch > AUTO_MIN_BATCH:
        assert num_train // batch >= AUTO_MIN_STEPS


def test_default_config_fits_a_small_dataset() -> None:
    recipe = resolve(_config(data={"dataset": "imagefolder"}), num_train=1293)
    assert recipe.batch_size == 32 and recipe.steps_per_epoch == 40
    assert recipe.width == 32  # bn_cnn's 64 / 2 below 20,000 images
    assert recipe.lr == pytest.approx(0.1)  # not scaled down with the batch (lr_batch_size null)
    assert any("auto" in line and "batch 32" in line for line in recipe.reasons)
    assert recipe.warnings == []


@pytest.mark.parametrize(("num_train", "width"), [(45_000, 64), (20_000, 64), (19_999, 32), (1_000, 32)])
def test_auto_width_follows_the_training_set_size(num_train: int, width: int) -> None:
    assert resolve(_config(), num_train).width == width
    assert resolve(_config(model={"width": 48}), num_train).width == 48


def test_linear_lr_scaling_when_a_profile_names_its_batch() -> None:
    recipe = resolve(_config(data={"dataset": "imagefolder"}, optim={"lr_batch_size": 256}), num_train=1293)
    assert recipe.lr == pytest.approx(0.1 * 32 / 256)


def test_explicit_batch_is_kept_and_lr_follows_it() -> None:
    recipe = resolve(_config(train={"batch_size": 128}, optim={"lr": 0.4, "lr_batch_size": 512}), 10_000)
    assert recipe.batch_size == 128 and recipe.lr == pytest.approx(0.1)


def test_lr_batch_size_null_uses_lr_as_given() -> None:
    recipe = resolve(_config(train={"batch_size": 32}, optim={"lr": 0.05, "lr_batch_size": None}), 5_000)
    assert recipe.lr == 0.05


def test_too_few_steps_warn_and_name_the_fix() -> None:
    recipe = resolve(_config(train={"batch_size": 256, "epochs": 10}), num_train=1_260)
    assert recipe.total_steps == 40
    assert len(recipe.warnings) == 1
    assert "only 40 optimizer steps" in recipe.warnings[0] and "batch_size" in recipe.warnings[0]


def test_batch_larger_than_training_split_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"larger than the training split \(100 images\).*auto"):
        resolve(_config(train={"batch_size": 256}), num_train=100)


@pytest.mark.parametrize(
    ("dataset", "asked", "flip"),
    [("cifar10", None, True), ("synthetic", None, True), ("imagefolder", None, False),
     ("imagefolder", True, True), ("cifar10", False, False)],
)
def test_flip_is_chosen_per_dataset_unless_set(dataset: str, asked: bool | None, flip: bool) -> None:
    recipe = resolve(_config(data={"dataset": dataset}, augment={"flip": asked}), num_train=5_000)
    assert recipe.flip is flip
    why = next(line for line in recipe.reasons if line.startswith("flip"))
    assert ("set in the config" in why) is (asked is not None)


def test_apply_puts_the_numbers_in_a_copy() -> None:
    config = _config(data={"dataset": "imagefolder"})
    resolved = resolve(config, 1293).apply(config)
    assert resolved.train.batch_size == 32 and resolved.augment.flip is False and resolved.model.width == 32
    assert resolved.optim.lr == pytest.approx(0.1) and resolved.optim.lr_batch_size is None
    assert config.train.batch_size == "auto" and config.augment.flip is None  # the asked config is kept
    assert config.model.width == "auto"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train": {"batch_size": "big"}}, "train.batch_size must be auto or an integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be auto or an integer >= 1"),
        ({"optim": {"optimizer": "lion"}}, "optim.optimizer must be sgd, adam or rmsprop"),
        ({"model": {"width": "wide"}}, "model.width must be auto or an integer"),
        ({"optim": {"optimizer": "adam", "weight_decay_style": "coupled"}}, "needs optim.optimizer=sgd"),
        ({"train": {"ema_momentum": 1.0}}, r"train.ema_momentum must be in \[0, 1\)"),
    ],
)
def test_bad_recipe_settings_name_the_fix(override: dict, message: str) -> None:
    from trainer.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(_config(**override))


def test_batch_size_parses_auto_and_integers_from_the_command_line() -> None:
    from trainer.config import apply_overrides

    config = apply_overrides(_config(), ["train.batch_size=64"])
    assert config.train.batch_size == 64
    config = apply_overrides(config, ["train.batch_size=auto"])
    assert config.train.batch_size == "auto"


def test_unknown_arch_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown model.arch 'vgg'; choose one of: .*bn_cnn.*mlp.*nin"):
        resolve(_config(model={"arch": "vgg"}), 1000)
