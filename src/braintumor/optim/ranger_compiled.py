"""Ranger with its update compiled by ``torch.compile`` into a few fused kernels (for CUDA).

The arithmetic is :class:`~braintumor.optim.ranger.Ranger`'s, step for step; what differs is how it is scheduled.
The foreach path launches one kernel per operation over all tensors plus one mean per centralized gradient (467
for ResNet-152); here the whole update of a bucket is one traced function that inductor fuses. So that a single
graph serves every step, everything that changes from step to step goes in as one small tensor: the signed step
(-lr * step size), the weight-decay factor, and whether this step is rectified and whether LookAhead
synchronises; both branches are computed and selected with ``torch.where`` (cheap: the update is memory-bound and
reads the same tensors either way). A new graph is compiled only for a new bucket layout (parameters, dtypes).

State and ``state_dict`` are Ranger's own, so a run can switch between the two at a checkpoint. One visible
difference: ``p.grad`` is left as it was, where Ranger centralizes it in place (writing it back inside the traced
function also trips an inductor CPU code-generation bug in torch 2.14).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from braintumor.optim.ranger import GC_MIN_DIM, HALF_DTYPES, Ranger, step_scalars


def _update_fused(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], slow_weights: list[torch.Tensor], scalars: torch.Tensor, *,
                  beta1: float, beta2: float, eps: float, gc_min_dim: int | None, alpha: float) -> None:
    """One Ranger step; ``scalars`` = (-lr * step_size, 1 - lr * weight_decay, rectified, sync) as float32."""
    signed_step, decay, rectified, sync = scalars.unbind()
    for param, grad, exp_avg, exp_avg_sq, slow in zip(params, grads, exp_avgs, exp_avg_sqs, slow_weights):
        half = param.dtype in HALF_DTYPES
        grad32 = grad.float() if half else grad
        if gc_min_dim is not None and grad.dim() >= gc_min_dim:
            grad32 = grad32 - grad32.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
        exp_avg.lerp_(grad32, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad32, grad32, value=1.0 - beta2)
        direction = torch.where(rectified > 0, exp_avg / (exp_avg_sq.sqrt() + eps), exp_avg)
        work = (param.float() if half else param) * decay.to(exp_avg.dtype) + direction * signed_step.to(exp_avg.dtype)
        slow.copy_(torch.where(sync > 0, slow.lerp(work, alpha), slow))
        param.copy_(torch.where(sync > 0, slow, work))


class CompiledRanger(Ranger):
    """:class:`Ranger` whose per-step update runs as one ``torch.compile``-d function per parameter bucket."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._compiled_update: Callable = torch.compile(_update_fused, dynamic=False)

    def _update_bucket(self, bucket: tuple[list[torch.Tensor], ...], group: dict[str, Any], device: torch.device,
                       step: int) -> None:
        beta1, beta2 = group["betas"]
        rectified, step_size = step_scalars(step, beta1, beta2, group["threshold"])
        scalars = torch.tensor([-group["lr"] * step_size, 1.0 - group["lr"] * group["weight_decay"],
                                float(rectified), float(step % group["k"] == 0)], dtype=torch.float32)
        self._compiled_update(*bucket, scalars.to(device, non_blocking=True), beta1=beta1, beta2=beta2,
                              eps=group["eps"], gc_min_dim=GC_MIN_DIM[group["gc"]], alpha=group["alpha"])
