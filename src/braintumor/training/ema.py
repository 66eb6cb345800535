"""Exponential moving average of a model's weights (Polyak averaging), as in timm's ModelEmaV3.

After every optimizer step each floating-point parameter becomes ``ema = d * ema + (1 - d) * p`` with
``d = min(decay, (1 + n) / (10 + n))`` at update n (1-based): the warm-up keeps the average from being dominated
by the random initial weights in short runs. Buffers (BatchNorm running statistics, batch counters) are copied,
not averaged: the running statistics already are averages, of the live model's activations. Validation, best.pt
and the final report use the averaged weights when ``--ema`` is on.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma:
    """Averaged copy of ``model`` (same device, eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights; copy its buffers."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        averaged = [p for p in self.module.parameters()]
        live = [p.detach() for p in model.parameters()]
        floating = [(a, p) for a, p in zip(averaged, live) if a.is_floating_point()]
        if floating:
            torch._foreach_lerp_([a for a, _ in floating], [p for _, p in floating], weight)
        self.copy_buffers(model)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """Take ``model``'s buffers (BatchNorm statistics) as they are."""
        for target, source in zip(self.module.buffers(), model.buffers()):
            target.copy_(source)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
