"""config.py: defaults, YAML file, flags override the file, validation messages."""

from __future__ import annotations

import pytest
import yaml

from braintumor.config import TrainConfig, read_config_file, resolve_config, write_config
from braintumor.errors import UserError


def test_defaults_are_the_reference_recipe():
    cfg = TrainConfig(data="d")
    assert (cfg.arch, cfg.weights, cfg.lr, cfg.image_size, cfg.rotation, cfg.val_split) == \
        ("resnet152", "imagenet", 1e-5, 224, 10.0, 0.15)
    assert (cfg.optimizer, cfg.gc, cfg.lookahead_k, cfg.lookahead_alpha) == ("ranger", "all", 6, 0.5)
    assert cfg.group_split and cfg.validate() is cfg


def test_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: /data/train\nepochs: 7\nbatch-size: 64\nlr: 0.0001\n")
    values = read_config_file(path)
    assert values == {"data": "/data/train", "epochs": 7, "batch_size": 64, "lr": 0.0001}
    cfg = resolve_config(values, {"epochs": 3, "lr": None, "arch": "resnet18"})
    assert (cfg.data, cfg.epochs, cfg.batch_size, cfg.lr, cfg.arch) == ("/data/train", 3, 64, 0.0001, "resnet18")
    write_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text()) == cfg.to_dict()


@pytest.mark.parametrize("text, message", [
    ("epochs: [1, 2", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("data: x\nlearning_rate: 0.1\n", r"unknown option\(s\) in .*: learning_rate"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_config_file(path)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found: /nope.yaml"):
        read_config_file("/nope.yaml")


@pytest.mark.parametrize("override, message", [
    ({"val_split": 1.5}, "--val-split must be between 0 and 1, got 1.5"),
    ({"arch": "vgg"}, "--arch must be one of resnet18"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"lr": -1.0}, "--lr must be positive"),
    ({"optimizer": "lamb"}, "--optimizer must be one of ranger"),
    ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
    ({"data_cache": "disk"}, "--data-cache must be one of auto"),
    ({"image_size": 8}, "--image-size must be at least 32"),
])
def test_validation_messages(override, message):
    with pytest.raises(UserError, match=message):
        resolve_config({"data": "d"}, override)
