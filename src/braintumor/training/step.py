"""How a training step runs (eager, compiled, CUDA graphs) and the fixed batch shapes that make that pay.

Step modes (``--train-step``):

* ``eager``: plain PyTorch.
* ``compile``: ``torch.compile`` of the network (forward and backward); the optimizer runs eagerly.
* ``compile-step``: the network as in ``compile``, and Ranger's update compiled into fused kernels
  (:class:`~braintumor.optim.ranger_compiled.CompiledRanger`): the whole step but the loss read-out.
* ``cuda-graphs``: ``compile-step`` with the network in mode "reduce-overhead", which replays each fixed-shape
  step as a CUDA graph (one launch instead of hundreds). CUDA only, one process per node's GPU set without DDP.
* ``auto`` (default): ``eager`` on the CPU (compiling takes about a minute there and seldom pays off); on CUDA
  ``compile`` when the run has enough steps to repay compilation (:data:`AUTO_COMPILE_MIN_STEPS`), else ``eager``.

Precision (``--precision``): training steps run under bf16 autocast on CUDA (``auto``, ``bf16``), and on a
CPU only with ``bf16`` and only where the CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16, e.g. Intel
Sapphire Rapids and later): about 2x faster ResNet-18 steps there (benchmarks/train_throughput.py, variant
eager-bf16). On other CPUs, which would emulate bf16, ``bf16`` falls back to float32 with a notice. Validation on
a CPU stays float32, as ``braintumor evaluate`` computes.

A mode that cannot run here falls back to the nearest one that can, with a one-line notice. Compiled modes and
CUDA graphs need one input shape per phase: training drops a last partial batch (data.pipeline.drop_partial_batch), and
validation pads its last batch to full size (:func:`pad_batch`) and drops the padded rows from its metrics.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from braintumor.choices import PRECISIONS, STEP_MODES
from braintumor.optim.table import OPTIMIZER_TABLE

# auto compiles on CUDA from this many optimizer steps in the run. An estimate until measured on the GPU (see
# benchmarks/gpu_session.sh, which prints the break-even): ~90 s to compile ResNet-152's forward and backward,
# ~8 eager steps/s at batch 256 on an H200, ~1.25x faster when compiled -> 90 * 8 / 0.25 ~ 3,000 steps.
AUTO_COMPILE_MIN_STEPS = 3000


@dataclass(frozen=True)
class StepPlan:
    """The step mode a run uses and, when it is not the one asked for, the one-line reason."""

    mode: str
    notice: str | None = None

    @property
    def compiles_model(self) -> bool:
        return self.mode in ("compile", "compile-step", "cuda-graphs")

    @property
    def compiles_optimizer(self) -> bool:
        return self.mode in ("compile-step", "cuda-graphs")


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot generate code for ``device`` here, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    import shutil

    return None if (shutil.which("g++") or shutil.which("c++")) else "no C++ compiler on the PATH"


def choose_step_mode(requested: str, device: torch.device, *, distributed: bool, total_steps: int,
                     optimizer: str = "ranger") -> StepPlan:
    """Resolve ``--train-step`` for this device and run (see the module docstring)."""
    if requested not in STEP_MODES:
        raise ValueError(f"unknown train step mode {requested!r}")
    if requested == "auto":
        if device.type != "cuda" or compile_unavailable(device) or total_steps < AUTO_COMPILE_MIN_STEPS:
            return StepPlan("eager")
        return StepPlan("compile")
    mode, reasons = requested, []
    if mode == "cuda-graphs" and (device.type != "cuda" or distributed):
        reasons.append("CUDA graphs need one CUDA process without DDP")
        mode = "compile-step"
    if mode != "eager":
        missing = compile_unavailable(device)
        if missing:
            reasons.append(f"torch.compile cannot run ({missing})")
            mode = "eager"
    if mode in ("compile-step", "cuda-graphs") and OPTIMIZER_TABLE[optimizer].compiled is None:
        reasons.append(f"--optimizer {optimizer} has no compiled update: it steps eagerly")
        mode = "compile"
    notice = None
    if mode != requested:
        notice = f"note: --train-step {requested} is not available ({'; '.join(reasons)}): training with {mode}"
    return StepPlan(mode, notice)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16), where bf16 autocast pays."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("amx_bf16") or found.get("avx512_bf16"))


def choose_precision(requested: str, device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype of training steps for ``--precision`` on ``device`` (None: float32) and, when that is
    not what was asked for, the one-line notice (see the module docstring)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}")
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return None, None
    if device.type == "cuda" or native_bf16_cpu():
        return torch.bfloat16, None
    return None, ("note: --precision bf16 is not available (this CPU has no native bfloat16: AMX-BF16 or "
                  "AVX512-BF16): training in float32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for ``dtype`` on ``device`` (a no-op for float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def wrap_network(net: nn.Module, plan: StepPlan) -> nn.Module:
    """The network as the plan runs it (the module itself for eager)."""
    if plan.mode == "cuda-graphs":
        return torch.compile(net, mode="reduce-overhead")
    if plan.compiles_model:
        return torch.compile(net)
    return net


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` (B, ...) followed by zero images up to ``size`` rows (itself when B >= size)."""
    if images.shape[0] >= size:
        return images
    padded = images.new_zeros((size, *images.shape[1:]))
    padded[: images.shape[0]] = images
    return padded
