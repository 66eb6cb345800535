"""config.py: defaults, YAML file, flags override the file, validation messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from braintumor.training.config import (CHANGEABLE_ON_RESUME, LAUNCH_FIELDS, RECIPE_FIELDS, SCHEDULERS, TrainConfig,
                               field_names, read_config_file, resolve_config, resume_config, write_config)
from braintumor.errors import UserError
from braintumor.training.trainer import make_scheduler


def test_defaults_are_the_reference_recipe():
    cfg = TrainConfig(data="d")
    assert (cfg.arch, cfg.weights, cfg.lr, cfg.image_size, cfg.rotation, cfg.val_split) == \
        ("resnet152", "imagenet", 1e-5, 224, 10.0, 0.15)
    assert (cfg.optimizer, cfg.gc, cfg.lookahead_k, cfg.lookahead_alpha) == ("ranger", "all", 6, 0.5)
    assert cfg.group_split and cfg.validate() is cfg


def test_file_then_flags_and_the_saved_recipe_trains_the_same_run_again(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: /data/train\nepochs: 7\nbatch-size: 64\nlr: 0.0001\n")
    values = read_config_file(path)
    assert values == {"data": "/data/train", "epochs": 7, "batch_size": 64, "lr": 0.0001}
    cfg = resolve_config(values, {"epochs": 3, "lr": None, "arch": "resnet18", "device": "cpu", "workers": 0})
    assert (cfg.data, cfg.epochs, cfg.batch_size, cfg.lr, cfg.arch) == ("/data/train", 3, 64, 0.0001, "resnet18")
    write_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    # The recipe only: launch settings (device, workers, ...) are not part of what the run learned from.
    assert saved == cfg.recipe_dict() and not set(saved) & set(LAUNCH_FIELDS)
    assert set(saved) | set(LAUNCH_FIELDS) == field_names()
    again = resolve_config(read_config_file(tmp_path / "saved.yaml"), {})
    assert again.recipe_dict() == cfg.recipe_dict() and again.device == "auto"


def test_recipe_and_launch_fields_split_as_documented():
    assert {"device", "workers", "progress", "out", "data_cache", "train_step", "name"} <= set(LAUNCH_FIELDS)
    assert {"data", "arch", "lr", "epochs", "seed", "scheduler", "tta"} <= set(RECIPE_FIELDS)
    assert CHANGEABLE_ON_RESUME == ("epochs", *(k for k in LAUNCH_FIELDS if k != "out"))


@pytest.mark.parametrize("text, message", [
    ("epochs: abc\n", r"^epochs in .*bad.yaml must be a whole number, got 'abc'$"),
    ("epochs: 2.5\n", r"^epochs in .* must be a whole number, got 2.5$"),
    ("tta: maybe\n", r"^tta in .* must be true or false, got 'maybe'$"),
    ("arch: 18\n", r"^arch in .* must be text, got 18$"),
    ("lr: fast\n", r"^lr in .* must be a number, got 'fast'$"),
    # files that are not a mapping of known options
    ("epochs: [1, 2", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("data: x\nlearning_rate: 0.1\n", r"unknown option\(s\) in .*: learning_rate \(see braintumor train --help\)"),
])
def test_bad_yaml_files_and_values_are_one_line_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_config_file(path)


def test_yaml_values_are_coerced_to_the_fields_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nweight_decay: 5E-4\nepochs: 3.0\nrotation: 5\nsplit_seed: '7'\n")
    values = read_config_file(path)
    assert values == {"lr": 1e-5, "weight_decay": 5e-4, "epochs": 3, "rotation": 5.0, "split_seed": 7}
    assert type(values["epochs"]) is int and type(values["rotation"]) is float and type(values["lr"]) is float


@pytest.mark.parametrize("old, new", [("onecycle", "linear"), ("none", "constant")])
def test_old_scheduler_names_are_read_with_a_notice(tmp_path, caplog, old, new):
    path = tmp_path / "old.yaml"
    path.write_text(f"scheduler: {old}\ncompile: true\n")
    values = read_config_file(path)
    assert values == {"scheduler": new, "train_step": "compile"}
    notices = [r.getMessage() for r in caplog.records]
    assert any(f"scheduler '{old}'" in m and f"'{new}'" in m for m in notices)
    assert any("train_step: compile" in m for m in notices)
    with pytest.raises(UserError, match="--scheduler must be one of constant, cosine, linear, got 'onecycle'"):
        resolve_config({"data": "d"}, {"scheduler": "onecycle"})  # the flag takes the new names only


def test_scheduler_names_say_what_they_do():
    model = torch.nn.Linear(2, 2)
    curves = {}
    for name in SCHEDULERS:
        cfg = TrainConfig(data="x", lr=1.0, epochs=4, scheduler=name, warmup_epochs=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=2)
        curves[name] = []
        for _ in range(8):
            curves[name].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert curves["constant"] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])  # warm-up over 2 steps, then --lr
    assert curves["linear"] == pytest.approx([0.5, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])  # 0 after the end
    assert curves["cosine"][:2] == pytest.approx([0.5, 1]) and curves["cosine"][-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data="data", val="val", groups="g.csv", teacher="t.pt", weights="w.pth").with_absolute_paths()
    assert (cfg.data, cfg.val, cfg.groups, cfg.teacher, cfg.weights) == tuple(
        str(tmp_path / name) for name in ("data", "val", "g.csv", "t.pt", "w.pth"))
    assert TrainConfig(data="/d", weights="imagenet").with_absolute_paths().weights == "imagenet"
    assert TrainConfig(data="/d", teacher="reference").with_absolute_paths().teacher == "reference"  # the shipped model


def saved_run(tmp_path, **values):
    run_dir = tmp_path / "project" / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (tmp_path / "project" / "data").mkdir()
    return run_dir, {**TrainConfig(data="data", device="cpu", workers=0, data_cache="none").to_dict(), **values}


def test_resume_keeps_the_recipe_and_the_last_launch_settings_and_refuses_recipe_changes(tmp_path):
    run_dir, saved = saved_run(tmp_path, data=str(tmp_path / "project" / "data"), lr=0.1, compile=False)
    cfg = resume_config(saved, {"epochs": 20, "workers": 3, "lr": None}, run_dir)
    assert (cfg.epochs, cfg.workers, cfg.device, cfg.data_cache, cfg.lr, cfg.out) == (20, 3, "cpu", "none", 0.1,
                                                                                       str(run_dir))
    for key, value in (("lr", 0.1), ("arch", "resnet18"), ("tta", True), ("data", "x"), ("out", "elsewhere")):
        with pytest.raises(UserError, match=f"^--resume continues the recipe of .*, so --{key} cannot be given; "
                                            "only --epochs, --workers, --device"):
            resume_config(saved, {key: value}, run_dir)


def test_an_old_runs_relative_data_path_is_found_from_its_folder_or_the_run_folders_parents(tmp_path, monkeypatch):
    run_dir, saved = saved_run(tmp_path)
    monkeypatch.chdir(tmp_path / "project")  # where the run was started
    assert resume_config(saved, {}, run_dir).data == str(tmp_path / "project" / "data")
    monkeypatch.chdir(tmp_path)  # elsewhere: runs/NAME sits two levels below the folder it was started in
    assert resume_config(saved, {}, Path("project/runs/r1")).data == str(tmp_path / "project" / "data")
    moved = tmp_path / "moved" / "r1"
    moved.parent.mkdir()
    run_dir.rename(moved)
    with pytest.raises(UserError, match="^the run's data path 'data' is relative .* resume from the folder the run "
                                        "was started in$"):
        resume_config(saved, {}, moved)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found: /nope.yaml"):
        read_config_file("/nope.yaml")


@pytest.mark.parametrize("override, message", [
    ({"val_split": 1.5}, "--val-split must be between 0 and 1, got 1.5"),
    ({"arch": "vgg"}, "--arch must be one of resnet18"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"lr": -1.0}, "--lr must be positive"),
    ({"optimizer": "lamb"}, "--optimizer must be one of ranger"),
    ({"device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"gc": "some"}, "--gc must be one of all, conv, none, got 'some'"),
    ({"data": ""}, "no training data folder given"),
    ({"data_cache": "disk"}, "--data-cache must be one of auto"),
    ({"image_size": 8}, "--image-size must be at least 32"),
])
def test_validation_messages(override, message):
    with pytest.raises(UserError, match=message):
        resolve_config({"data": "d"}, override)


def alias_bomb() -> bytes:
    """The classic "billion laughs": nine levels of ten aliases each, 10^9 strings once expanded (~440 bytes)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[level]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    lines.append("epochs: *i")
    return ("\n".join(lines) + "\n").encode()


def test_a_config_file_of_binary_bytes_is_one_line(tmp_path):
    from braintumor.training.config import read_config_file

    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00" + bytes(range(256)))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 0\)") as raised:
        read_config_file(path)
    assert "\n" not in str(raised.value)


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    from braintumor.cli import main
    from braintumor.training.config import read_config_file

    path = tmp_path / "bomb.yaml"
    path.write_bytes(alias_bomb())
    assert len(path.read_bytes()) < 500
    with pytest.raises(UserError, match="expands to more than 10,000 values") as raised:
        read_config_file(path)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400
    assert main(["train", "--config", str(path)]) == 2


def test_a_large_value_is_quoted_short_in_the_error(tmp_path):
    from braintumor.training.config import read_config_file

    path = tmp_path / "list.yaml"
    path.write_text("epochs: [&a [" + ",".join(["x" * 50] * 9) + "], " + ",".join(["*a"] * 80) + "]\n")
    with pytest.raises(UserError, match="epochs in .* must be a whole number") as raised:
        read_config_file(path)
    assert len(str(raised.value)) < 400


def test_too_big_or_too_deep_config_files_are_one_line(tmp_path):
    from braintumor.training.config import MAX_CONFIG_BYTES, read_config_file

    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(UserError, match="a config is at most"):
        read_config_file(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("epochs: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError) as raised:
        read_config_file(deep)
    assert "\n" not in str(raised.value)
