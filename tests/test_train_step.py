"""train_step.py: step-mode choice and fallbacks, fixed validation shapes, compiled step = eager step."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from braintumor.training import step as train_step
from braintumor.optim import Ranger
from braintumor.optim.ranger_compiled import CompiledRanger
from braintumor.training.trainer import Trainer, train
from braintumor.training.step import StepPlan, choose_precision, choose_step_mode, pad_batch, wrap_network

from helpers import tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_eager_on_the_cpu_and_compiles_only_long_cuda_runs(monkeypatch):
    assert choose_step_mode("auto", CPU, distributed=False, total_steps=10**6) == StepPlan("eager")
    monkeypatch.setattr(train_step, "compile_unavailable", lambda device: None)
    long_run = train_step.AUTO_COMPILE_MIN_STEPS
    assert choose_step_mode("auto", CUDA, distributed=True, total_steps=long_run) == StepPlan("compile")
    assert choose_step_mode("auto", CUDA, distributed=False, total_steps=long_run - 1) == StepPlan("eager")
    monkeypatch.setattr(train_step, "compile_unavailable", lambda device: "triton is not installed")
    assert choose_step_mode("auto", CUDA, distributed=False, total_steps=long_run) == StepPlan("eager")


def test_a_mode_that_cannot_run_falls_back_with_one_line_saying_why(monkeypatch):
    monkeypatch.setattr(train_step, "compile_unavailable", lambda device: None)
    plan = choose_step_mode("cuda-graphs", CPU, distributed=False, total_steps=1)
    assert plan.mode == "compile-step" and "CUDA graphs need one CUDA process" in plan.notice
    assert choose_step_mode("cuda-graphs", CUDA, distributed=True, total_steps=1).mode == "compile-step"
    assert choose_step_mode("cuda-graphs", CUDA, distributed=False, total_steps=1) == StepPlan("cuda-graphs")
    plan = choose_step_mode("compile-step", CPU, distributed=False, total_steps=1, optimizer="adamw")
    assert plan.mode == "compile" and "--optimizer adamw" in plan.notice and "\n" not in plan.notice
    monkeypatch.setattr(train_step, "compile_unavailable", lambda device: "no C++ compiler on the PATH")
    plan = choose_step_mode("compile", CPU, distributed=False, total_steps=1)
    assert plan.mode == "eager" and plan.notice.endswith("(torch.compile cannot run (no C++ compiler on the "
                                                         "PATH)): training with eager")
    assert choose_step_mode("eager", CPU, distributed=False, total_steps=1) == StepPlan("eager")


def test_bf16_runs_on_cuda_and_on_a_cpu_only_when_asked_and_native(monkeypatch):
    assert choose_precision("auto", CUDA) == (torch.bfloat16, None)
    assert choose_precision("fp32", CUDA) == (None, None)
    monkeypatch.setattr(train_step, "native_bf16_cpu", lambda: True)
    assert choose_precision("auto", CPU) == (None, None)  # the CPU default stays float32
    assert choose_precision("bf16", CPU) == (torch.bfloat16, None)
    monkeypatch.setattr(train_step, "native_bf16_cpu", lambda: False)
    dtype, notice = choose_precision("bf16", CPU)
    assert dtype is None and "no native bfloat16" in notice and notice.endswith("training in float32")
    with pytest.raises(ValueError):
        choose_precision("fp16", CPU)


def test_native_bf16_reads_the_cpu_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": True},
                        raising=False)
    assert train_step.native_bf16_cpu()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True}, raising=False)
    assert not train_step.native_bf16_cpu()


@pytest.mark.slow
def test_cpu_bf16_trains_in_bf16_and_validates_in_float32(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_step, "native_bf16_cpu", lambda: True)
    trainer = Trainer(tiny_config(phantom_dir, tmp_path / "run", precision="bf16", data_cache="memory",
                                  max_steps_per_epoch=1), tmp_path / "run")
    dtypes = []
    hook = trainer.model.fc.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    trainer.train_one_epoch(0)
    trainer.validate()
    hook.remove()
    assert dtypes[0] == torch.bfloat16 and set(dtypes[1:]) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not a bf16 model


def test_pad_batch_appends_zero_images():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    padded = pad_batch(images, 5)
    assert padded.shape == (5, 3, 2, 2) and torch.equal(padded[:2], images) and not padded[2:].any()
    assert pad_batch(images, 2) is images


def test_validation_sees_one_batch_shape_and_its_metrics_ignore_the_padding(phantom_dir, tmp_path):
    # 24 phantoms, 15 % held out -> 4 validation images in a batch of 6: one batch padded with 2 zero images.
    trainer = Trainer(tiny_config(phantom_dir, tmp_path / "run", batch_size=6, data_cache="memory"), tmp_path / "run")
    shapes = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    padded = trainer.validate()
    hook.remove()
    assert len(shapes) == 1 and shapes[0][0] == 6 and len(trainer.split.val_paths) == 4
    # The same metrics from the unpadded batches.
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in trainer.val_batches:
            logits = trainer.model(images)
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
            count += labels.numel()
    assert count == 4
    assert padded["val_accuracy"] == correct / count
    assert padded["val_loss"] == pytest.approx(loss_sum / count, rel=1e-5)


@pytest.mark.slow
def test_time_to_first_epoch_is_logged_once(phantom_dir, tmp_path):
    result = train(tiny_config(phantom_dir, tmp_path / "run", epochs=2, data_cache="memory",
                              max_steps_per_epoch=1))
    first, second = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert first["seconds_to_first_epoch"] >= first["seconds"] > 0
    assert "seconds_to_first_epoch" not in second


@pytest.mark.slow
def test_the_trainer_builds_what_the_step_mode_says(phantom_dir, tmp_path):
    trainer = Trainer(tiny_config(phantom_dir, tmp_path / "run", train_step="compile-step"), tmp_path / "run")
    assert trainer.step_plan == StepPlan("compile-step")
    assert isinstance(trainer.optimizer, CompiledRanger) and trainer.net is not trainer.model
    assert hasattr(trainer.net, "_orig_mod")  # compiled lazily: nothing was compiled yet
    eager = Trainer(tiny_config(phantom_dir, tmp_path / "eager"), tmp_path / "eager")
    assert eager.step_plan == StepPlan("eager") and eager.net is eager.model
    assert type(eager.optimizer) is Ranger


def tiny_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 4))


def run_steps(plan: StepPlan, steps: int = 13) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The Trainer's loop body on a tiny network: forward, loss, zero_grad, backward, step, schedule."""
    model = tiny_network().train()
    net = wrap_network(model, plan)
    optimizer = (CompiledRanger if plan.compiles_optimizer else Ranger)(model.parameters(), lr=1e-2,
                                                                        weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        images = torch.randn(8, 3, 8, 8, generator=generator)
        labels = torch.randint(0, 4, (8,), generator=generator)
        loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses, {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_losses_and_weights():
    """13 steps cross RAdam's rectification (step 6) and two LookAhead syncs (6, 12), with a changing lr."""
    eager_losses, eager_weights = run_steps(StepPlan("eager"))
    compiled_losses, compiled_weights = run_steps(StepPlan("compile-step"))
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert eager_losses[-1] < eager_losses[0] - 0.05  # the steps do move the weights
    for key, value in eager_weights.items():
        assert torch.allclose(compiled_weights[key], value, atol=1e-5), key
