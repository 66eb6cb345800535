"""train.py: exact resume, run-folder contents, bad input handling, optimizer choices."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml

from braintumor.models.checkpoint import load_checkpoint
from braintumor.training.config import TrainConfig
from braintumor.errors import UserError
from braintumor.training.trainer import format_epoch, make_optimizer, make_scheduler, resume, train
from helpers import make_checkpoint, tiny_config


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
    trust = io.BytesIO()
    torch.save(ckpt.get("trust"), trust)  # the trust tiers fitted into it (their own size is theirs to bound)
    best_bytes = result.best_checkpoint.stat().st_size - trust.tell()
    assert best_bytes < 1.05 * weight_bytes < (result.run_dir / "last.pt").stat().st_size
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
@pytest.mark.parametrize("data_cache, teacher_size", [("none", 0), ("memory", 0), ("memory", 64)])
def test_resume_is_exact_across_a_progressive_size_change_with_ema_and_augmentation(phantom_dir, tmp_path,
                                                                                     data_cache, teacher_size,
                                                                                     monkeypatch):
    options = dict(image_size=48, progressive_resize=32, progressive_until=0.5, ema=0.9, tta=True, scale=0.1,
                   translate=0.05, brightness=0.1, contrast=0.1, gamma=0.1, erasing=0.5, crop_area=0.3, cutmix=1.0,
                   mixup=0.2, data_cache=data_cache, epochs=4)
    if teacher_size:  # a larger teacher: batches at its 64 px, the student's copy resized to 32, then 48 px
        options["teacher"] = str(make_checkpoint(tmp_path / "teacher.pt", image_size=teacher_size, seed=5))
    straight = train(tiny_config(phantom_dir, tmp_path / "straight", **options))
    # The same 4-epoch run, stopped after epoch 2 (its checkpoint and metrics written), then resumed.
    import braintumor.training.trainer as train_module

    plots = []

    def stop_after_second_epoch(rows, path, *_):
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


# ---------------------------------------------------------------- one owner per run folder, divergence, table

TINY_TRAIN = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
              "--lr", "1e-3", "--device", "cpu", "--workers", "0", "--no-progress", "--max-steps-per-epoch", "2"]


def test_a_training_into_a_folder_another_process_holds_exits_2_naming_its_pid(phantom_dir, tmp_path, capsys):
    import os

    from braintumor.cli import main
    from braintumor.utils.locking import exclusive_folder

    run = tmp_path / "run"
    with exclusive_folder(run, "test"):  # flock conflicts between open files, even within one process
        code = main(["train", str(phantom_dir), *TINY_TRAIN, "--out", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"{run} is in use by another braintumor train (PID {os.getpid()})" in err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the holder's folder is untouched
        with pytest.raises(UserError, match=f"PID {os.getpid()}"):  # --resume takes the same lock
            (run / "last.pt").write_bytes(b"")
            resume(run)


def test_the_lock_file_goes_with_its_owner_and_a_lock_on_a_removed_file_does_not_count(tmp_path):
    import os

    from braintumor.utils.locking import _names, exclusive_folder

    run = tmp_path / "run"
    with exclusive_folder(run, "test"):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
    assert run.is_dir() and not (run / ".lock").exists()  # nothing left behind
    # A process that opened the lock file just before its owner removed it holds a file the path no longer names
    # (a newcomer creates a new one): it must not count as the owner.
    (run / ".lock").write_text("")
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        assert _names(run / ".lock", fd)
        os.unlink(run / ".lock")
        assert not _names(run / ".lock", fd)
        (run / ".lock").write_text("")
        assert not _names(run / ".lock", fd)
    finally:
        os.close(fd)


@pytest.mark.slow
def test_two_trainings_into_one_folder_at_once_one_wins_and_the_folder_is_its(phantom_dir, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    procs = {seed: subprocess.Popen([sys.executable, "-m", "braintumor", "train", str(phantom_dir), *TINY_TRAIN,
                                     "--seed", str(seed), "--out", str(run)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (11, 12)}
    done = {seed: (*proc.communicate(timeout=900), proc.returncode) for seed, proc in procs.items()}
    assert sorted(code for _, _, code in done.values()) == [0, 2], done
    (winner,) = [seed for seed, (_, _, code) in done.items() if code == 0]
    (loser,) = [seed for seed in done if seed != winner]
    err = done[loser][1].strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    # the loser either found the folder held (the usual case) or, had it started late, the finished run
    assert (f"in use by another braintumor train (PID {procs[winner].pid})" in err
            or "already holds a run" in err), err
    # the folder is the winner's alone: its recipe, checkpoints and report
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == winner
    assert load_checkpoint(run / "last.pt")["config"]["seed"] == winner
    assert load_checkpoint(run / "best.pt")["config"]["seed"] == winner
    assert (run / "report.json").is_file() and not list(run.glob(".*.tmp"))


def nan_in_validation_from(evaluation: int):
    """A model factory whose network's outputs turn NaN in eval mode from the ``evaluation``-th validation on."""
    from braintumor.models.network import build_model

    def factory(arch, num_classes, weights):
        model = build_model(arch, num_classes=num_classes, weights=weights)
        state = {"validations": 0, "trained": False}

        def hook(module, inputs, output):
            if module.training:
                state["trained"] = True
                return None
            if state["trained"]:  # the first eval forward after training: a new validation pass
                state["validations"] += 1
                state["trained"] = False
            return output * float("nan") if state["validations"] >= evaluation else None

        model.register_forward_hook(hook)
        return model

    return factory


@pytest.mark.slow
def test_a_non_finite_validation_loss_stops_the_run_keeping_the_last_finite_checkpoints(phantom_dir, tmp_path):
    cfg = tiny_config(phantom_dir, tmp_path / "run", epochs=3, max_steps_per_epoch=1)
    with pytest.raises(UserError) as raised:
        train(cfg, model_factory=nan_in_validation_from(2))
    message = str(raised.value)
    assert "\n" not in message and "the validation loss became non-finite after epoch 2" in message
    assert "best.pt (epoch 1)" in message and "last.pt (epoch 1)" in message
    run = tmp_path / "run"
    assert load_checkpoint(run / "best.pt")["epoch"] == 1 and load_checkpoint(run / "last.pt")["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / "report.json").exists()  # no trust fit, no report on NaN


def test_a_run_diverging_in_its_first_epoch_leaves_no_folder_behind(phantom_dir, tmp_path, capsys):
    from braintumor.cli import main

    run = tmp_path / "run"
    code = main(["train", str(phantom_dir), *TINY_TRAIN, "--optimizer", "sgd", "--lr", "1e4", "--out", str(run)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]  # progress, then the error
    assert code == 2 and lines[-1].startswith("error: training diverged"), lines
    assert sum(line.startswith("error") for line in lines) == 1 and not any("Traceback" in line for line in lines)
    assert not run.exists()


def test_weights_none_at_a_fine_tuning_lr_is_warned_about():
    from braintumor.training.config import config_warnings

    (warning,) = config_warnings(TrainConfig(data="x", weights="none"))  # the default lr, 1e-5
    assert warning.startswith("warning: --weights none") and "1e-05" in warning and "scratch-cpu" in warning
    assert config_warnings(TrainConfig(data="x", weights="none", lr=1e-3)) == []
    assert config_warnings(TrainConfig(data="x")) == []  # ImageNet weights: 1e-5 is the fine-tuning rate


def test_the_default_recipe_on_a_cpu_gets_a_time_estimate_and_the_cpu_recipe():
    from braintumor.training.config import cpu_time_hint

    hint = cpu_time_hint(TrainConfig(data="x"), train_images=4852, cores=2)  # resnet152, 224 px, 10 epochs
    assert hint is not None and "\n" not in hint and "--recipe scratch-cpu" in hint
    assert "resnet152 at 224 px" in hint and "ImageNet" in hint and " h for 10 epochs" in hint
    assert cpu_time_hint(TrainConfig(data="x", recipe="seed"), 4852, 2) is None  # a recipe was chosen
    assert cpu_time_hint(TrainConfig(data="x", arch="resnet18"), 4852, 2) is None  # small network
    assert cpu_time_hint(TrainConfig(data="x"), train_images=24, cores=2) is None  # a few minutes


def test_one_optimizer_table_gives_the_config_choices_and_the_trainer_optimizers():
    import inspect

    from braintumor.optim.table import OPTIMIZER_TABLE
    from braintumor.training.config import FIELDS
    from braintumor.training.trainer import Trainer

    assert FIELDS["optimizer"].metadata["choices"] == tuple(OPTIMIZER_TABLE)
    for name, entry in OPTIMIZER_TABLE.items():
        optimizer = make_optimizer(TrainConfig(data="x", optimizer=name, lr=0.1), torch.nn.Linear(2, 2).parameters())
        assert type(optimizer) is entry.cls
        group = optimizer.param_groups[0]
        assert group["lr"] == 0.1 and all(group[key] == value for key, value in entry.defaults.items()), name
    ranger = make_optimizer(TrainConfig(data="x", lookahead_k=3, gc="conv"), torch.nn.Linear(2, 2).parameters())
    assert ranger.param_groups[0]["k"] == 3 and ranger.param_groups[0]["gc"] == "conv"
    # Trainer.__init__ is a list of named steps, not a dozen jobs inline
    assert len(inspect.getsource(Trainer.__init__).splitlines()) <= 15


@pytest.mark.slow
def test_a_tiny_run_from_random_weights_at_the_default_lr_says_so_on_stderr(phantom_dir, tmp_path, capsys):
    from braintumor.cli import main

    args = [arg for arg in TINY_TRAIN if arg not in ("--lr", "1e-3")]  # the default lr, 1e-5
    assert main(["train", str(phantom_dir), *args, "--max-steps-per-epoch", "1", "--out", str(tmp_path / "r")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --weights none")]
    assert len(warnings) == 1 and "learns next to nothing" in warnings[0]


def test_loss_curves_are_titled_by_the_loss_the_run_optimised(tmp_path):
    from braintumor.training.config import TrainConfig
    from braintumor.training.trainer import loss_title
    from braintumor.visualize.figures import plot_training_curves

    assert loss_title(TrainConfig(data="d")) == "Cross-entropy loss"
    assert loss_title(TrainConfig(data="d", distill_weight=0.5)) == "Cross-entropy loss"  # no teacher: no distillation
    distilled = loss_title(TrainConfig(data="d", teacher="t.pt", distill_weight=0.7, distill_temperature=2.0))
    assert distilled == "Loss\ntrain: 0.3 × cross-entropy + 0.7 × distillation (T 2)\nvalidation: cross-entropy"
    assert loss_title(TrainConfig(data="d", teacher="t.pt", distill_weight=0.0)) == "Cross-entropy loss"
    mixed = loss_title(TrainConfig(data="d", label_smoothing=0.1, mixup=0.2))
    assert mixed == "Loss\ntrain: cross-entropy, label smoothing 0.1, CutMix / MixUp labels\nvalidation: cross-entropy"
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5,
             "val_accuracy": 0.4 + e / 10, "lr": 1e-3} for e in (1, 2)]
    assert plot_training_curves(rows, tmp_path / "curves.png", distilled).stat().st_size > 0
