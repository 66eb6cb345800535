"""train.py: exact resume, run-folder contents, bad input handling, optimizer choices."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from braintumor.models.checkpoint import load_checkpoint
from braintumor.training.config import TrainConfig
from braintumor.errors import UserError
from braintumor.training.trainer import format_epoch, make_optimizer, make_scheduler, resume, train
from helpers import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("data_cache", ["none", "memory"])
def test_two_plus_two_epochs_resumed_equal_four_straight(phantom_dir, tmp_path, data_cache):
    straight = train(tiny_config(phantom_dir, tmp_path / "straight", epochs=4, data_cache=data_cache))
    first = train(tiny_config(phantom_dir, tmp_path / "resumed", epochs=2, data_cache=data_cache))
    assert load_checkpoint(first.run_dir / "last.pt")["epoch"] == 2
    resumed = resume(first.run_dir, {"epochs": 4})
    a = load_checkpoint(straight.run_dir / "last.pt")
    b = load_checkpoint(resumed.run_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # Optimizer state too, LookAhead's slow weights and step counters included.
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and all("slow_weights" in s for s in state_a.values())
    for index, buffers in state_a.items():
        for name, value in buffers.items():
            other = state_b[index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, name)
    # The metrics log holds each epoch once, in order, and matches the uninterrupted run's.
    rows_a = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in rows_a] == pytest.approx([r["train_loss"] for r in rows_b], abs=1e-12)


@pytest.mark.slow
def test_run_folder_holds_everything_predict_and_users_need(phantom_dir, tmp_path):
    result = train(tiny_config(phantom_dir, tmp_path / "run", epochs=1))
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "training_curves.png", "last.pt", "best.pt", "report.md",
            "report.json", "confusion_matrix.png", "reliability.png"} <= names
    ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert ckpt["image_size"] == 32 and ckpt["arch"] == "resnet18" and len(ckpt["mean"]) == 3
    # every epoch reseeds, so no checkpoint carries an RNG state
    assert ckpt["config"]["lr"] == 1e-3 and "rng" not in load_checkpoint(result.run_dir / "last.pt")
    # best.pt is for inference: the weights and the spec, about the weights' size; last.pt holds the rest.
    assert not {"optimizer", "scheduler", "rng", "history"} & set(ckpt)
    weight_bytes = sum(t.numel() * t.element_size() for t in ckpt["model"].values())
    assert result.best_checkpoint.stat().st_size < 1.05 * weight_bytes < (result.run_dir / "last.pt").stat().st_size
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["data"] == str(phantom_dir) and saved["epochs"] == 1
    row = json.loads((result.run_dir / "metrics.jsonl").read_text())
    assert set(row) >= {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                        "images_per_second"}
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["n"] == 4  # 15 % of 24 phantoms, stratified: one per class
    # A finished run is never overwritten by accident.
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_config(phantom_dir, tmp_path / "run", epochs=1))
    with pytest.raises(UserError, match="already finished 1 epochs"):
        resume(result.run_dir)


@pytest.mark.slow
def test_bad_files_stop_the_run_or_are_skipped_and_reported(phantom_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    good = (data / "glioma" / "glioma_0000.png").read_bytes()
    (data / "glioma" / "broken.png").write_bytes(good[: len(good) // 2])
    (data / "notumor" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError) as info:
        train(tiny_config(data, tmp_path / "stopped", epochs=1))
    message = str(info.value)
    assert message.startswith("2 unreadable image(s) in ") and "--skip-bad" in message
    assert "broken.png (truncated image)" in message and "empty.jpg (empty file (0 bytes))" in message
    assert not (tmp_path / "stopped").exists()  # nothing half-written
    result = train(tiny_config(data, tmp_path / "skipped", epochs=1, skip_bad=True))
    report = json.loads((result.run_dir / "report.json").read_text())
    skipped = report["extra"]["skipped_unreadable_files"]
    assert len(skipped) == 2 and any("broken.png" in s for s in skipped)


@pytest.mark.slow
def test_separate_validation_folder(phantom_dir, tmp_path):
    result = train(tiny_config(phantom_dir, tmp_path / "run", epochs=1, val=str(phantom_dir)))
    assert json.loads((result.run_dir / "report.json").read_text())["n"] == 24


@pytest.mark.parametrize("name", ["ranger", "radam", "adam", "adamw", "sgd"])
def test_every_optimizer_choice_builds_and_steps(name):
    model = torch.nn.Linear(3, 2)
    cfg = TrainConfig(data="x", optimizer=name, lr=0.1, epochs=2, scheduler="cosine", warmup_epochs=1)
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=2)
    lrs = []
    for _ in range(4):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)  # linear warm-up over 2 steps
    assert lrs[2] > lrs[3] > 0  # cosine decay afterwards


@pytest.mark.slow
@pytest.mark.parametrize("data_cache", ["none", "memory"])
def test_resume_is_exact_across_a_progressive_size_change_with_ema_and_augmentation(phantom_dir, tmp_path,
                                                                                     data_cache, monkeypatch):
    options = dict(image_size=48, progressive_resize=32, progressive_until=0.5, ema=0.9, tta=True, scale=0.1,
                   translate=0.05, brightness=0.1, contrast=0.1, gamma=0.1, data_cache=data_cache, epochs=4)
    straight = train(tiny_config(phantom_dir, tmp_path / "straight", **options))
    # The same 4-epoch run, stopped after epoch 2 (its checkpoint and metrics written), then resumed.
    import braintumor.training.trainer as train_module

    plots = []

    def stop_after_second_epoch(rows, path):
        plots.append(path)
        if len(plots) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "plot_training_curves", stop_after_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(phantom_dir, tmp_path / "resumed", **options))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed = resume(tmp_path / "resumed")
    rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["image_size"] for row in rows] == [32, 32, 48, 48]  # the planned sizes, the change after resume
    a = load_checkpoint(straight.run_dir / "last.pt")
    b = load_checkpoint(resumed.run_dir / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"]["module"][key], b["ema"]["module"][key]), key
    assert a["ema"]["updates"] == b["ema"]["updates"] > 0
    # Inference uses the averaged weights at the full size, with the stored TTA setting.
    from braintumor.models.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(b)
    assert all(torch.equal(v, b["ema"]["module"][k]) for k, v in model.state_dict().items())
    assert b["image_size"] == 48 and b["tta"] is True


@pytest.mark.slow
def test_eval_image_size_is_what_validation_and_the_model_use(phantom_dir, tmp_path):
    result = train(tiny_config(phantom_dir, tmp_path / "run", epochs=1, image_size=32, eval_image_size=40,
                               data_cache="memory"))
    assert load_checkpoint(result.best_checkpoint)["image_size"] == 40
    from braintumor.inference.classifier import Classifier

    classifier = Classifier.from_checkpoint(result.best_checkpoint)
    assert classifier.image_size == 40
    assert classifier.preprocess(classifier.load(next(phantom_dir.rglob("*.png")))).shape == (3, 40, 40)


def test_epoch_line_names_the_start_lr_and_the_size_only_while_it_is_reduced():
    row = {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85,
           "lr": 1.3e-5, "seconds": 10.0, "images_per_second": 40.0, "image_size": 96}
    line = format_epoch(row, 20, improved=True, image_size=128)
    assert "train at 96 px loss" in line and "start lr 1.30e-05" in line and line.endswith("*best")
    assert " px" not in format_epoch({**row, "image_size": 128}, 20, improved=False, image_size=128)
