"""The typed config: defaults, files, overrides, and errors that name the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, apply_overrides, from_dict, load


def test_unknown_key_in_file_names_key_and_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: bn_cnn\n  dropuot: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    message = str(err.value)
    assert "model.dropuot" in message
    assert "dropout" in message and "width" in message  # the valid keys, so the typo is obvious
    assert str(path) in message


def test_unknown_section_and_override_key_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        from_dict({"modle": {"arch": "bn_cnn"}})
    with pytest.raises(ConfigError, match="train.epoch'"):
        apply_overrides(Config(), ["train.epoch=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(Config(), ["epochs"])


def test_overrides_are_typed_and_do_not_mutate_the_base() -> None:
    base = Config()
    config = apply_overrides(
        base, ["train.epochs=7", "model.dropout=0.25", "augment.flip=false", "data.num_train=none"]
    )
    assert config.train.epochs == 7 and isinstance(config.train.epochs, int)
    assert config.model.dropout == 0.25
    assert config.augment.flip is False
    assert config.data.num_train is None
    assert base.train.epochs == Config().train.epochs and base.augment.flip is Config().augment.flip


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochs=three", "train.epochs must be an integer"),
        ("augment.flip=maybe", "augment.flip must be true or false"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("optim.optimizer=lion", "optim.optimizer must be sgd, adam or rmsprop"),
        ("data.dataset=mnist", "data.dataset must be cifar10, imagefolder or synthetic"),
    ],
)
def test_bad_values_are_rejected_with_the_fix(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert fragment in str(err.value)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    config = apply_overrides(Config(), ["model.arch=resnet9", "optim.lr=0.4", "data.data_dir=/data/cifar"])
    path = tmp_path / "run" / "config.json"
    config.save(path)
    assert json.loads(path.read_text())["model"]["arch"] == "resnet9"
    assert load(path) == config
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("name", ["quick", "default", "resnet9"])
def test_shipped_profiles_load(project_root: Path, name: str) -> None:
    config = load(project_root / "configs" / f"{name}.yaml")
    assert config.model.arch in ("bn_cnn", "resnet9")


def test_quick_profile_is_small_enough_for_a_cpu(project_root: Path) -> None:
    quick = load(project_root / "configs" / "quick.yaml")
    assert quick.model.arch == "bn_cnn"
    images_seen = quick.data.num_train * quick.train.epochs
    assert images_seen <= 30_000  # ~1-2 minutes at a few hundred images/s on 2 cores
