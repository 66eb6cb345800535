"""Ranger: RAdam with LookAhead and Gradient Centralization, as one ``torch.optim.Optimizer``.

Ranger (Less Wright, 2019) stacks three published ideas; this module implements them from the papers:

* **RAdam** -- Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020
  (arXiv:1908.03265). Adam whose adaptive step is scaled by a rectification factor once the approximated
  length of the simple moving average, rho_t, is large enough; before that the step is plain momentum SGD.
* **LookAhead** -- Zhang, Lucas, Hinton and Ba, "Lookahead Optimizer: k steps forward, 1 step back",
  NeurIPS 2019 (arXiv:1907.08610). Slow weights that move a fraction alpha towards the fast weights every
  k steps, after which the fast weights restart from the slow ones.
* **Gradient Centralization** -- Yong, Huang, Hua and Zhang, ECCV 2020 (arXiv:2004.01461). Each weight
  gradient loses its mean over every dimension but the first (per output channel / neuron).

Choices made here, and where they differ from the papers:

* RAdam: the update is ``m / (sqrt(v) + eps)`` with ``sqrt(1 - beta2^t)`` folded into the step size (as
  ``torch.optim.RAdam`` does), so eps is added to the un-corrected root of v. The paper rectifies once
  rho_t > 4; the threshold here is configurable (>= 4) and defaults to 5, like PyTorch and the original Ranger,
  so that with beta2 = 0.999 steps 1-5 are momentum SGD and rectification starts at step 6. Weight decay is
  the decoupled AdamW form ``p <- p * (1 - lr * wd)``, which the RAdam paper does not have.
* LookAhead: a synchronisation resets only the weights; the RAdam moments carry over unchanged. The step counter
  (and with it the k-step schedule) is per parameter, so a parameter that first receives a gradient late
  starts its own schedule then.
* Gradient Centralization: ``gc="all"`` centralizes every gradient with more than one dimension (conv and
  fully connected weights, as in the paper), ``gc="conv"`` only those with more than three, ``gc="none"``
  none. A weight whose rows have a single element (fan-in 1) gets a zero gradient under GC, as the paper's
  formula implies. The gradient is centralized in place in ``p.grad`` (for float32/float64 parameters):
  GC is idempotent, and an out-of-place copy would cost a gradient-sized allocation every step.
* Unlike the first public Ranger, there is no step-size cache shared by all parameter groups: the bias
  corrections and rectification terms are computed per group, so groups with different lr or betas are exact.

Parameters in float16/bfloat16 are updated in float32 (moments and slow weights are kept in float32) and the
result is written back in the parameter's dtype; float64 parameters are updated in float64.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["Ranger"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Smallest gradient dimensionality that gets centralized, per gc mode (None: never).
GC_MIN_DIM = {"all": 2, "conv": 4, "none": None}
_STATE_BUFFERS = ("exp_avg", "exp_avg_sq", "slow_weights")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_options(options: dict[str, Any]) -> None:
    """Raise ValueError naming the first option of a parameter group that is out of range."""
    lr = options["lr"]
    if not _is_real(lr) or not lr >= 0:
        raise ValueError(f"Ranger: lr must be a number >= 0, got {lr!r}")
    betas = options["betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_real(beta) and 0.0 <= beta < 1.0 for beta in betas)
    ):
        raise ValueError(f"Ranger: betas must be two numbers in [0, 1), got {betas!r}")
    eps = options["eps"]
    if not _is_real(eps) or not eps > 0:
        raise ValueError(f"Ranger: eps must be a number > 0 (it keeps m/(sqrt(v)+eps) finite), got {eps!r}")
    weight_decay = options["weight_decay"]
    if not _is_real(weight_decay) or not weight_decay >= 0:
        raise ValueError(f"Ranger: weight_decay must be a number >= 0, got {weight_decay!r}")
    k = options["k"]
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"Ranger: k (LookAhead sync period) must be an integer >= 1, got {k!r}")
    alpha = options["alpha"]
    if not _is_real(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"Ranger: alpha (LookAhead step) must be a number in (0, 1], got {alpha!r}")
    threshold = options["threshold"]
    if not _is_real(threshold) or not threshold >= 4.0:
        raise ValueError(
            f"Ranger: threshold must be a number >= 4 (below 4 the rectification term has no real root), "
            f"got {threshold!r}"
        )
    gc = options["gc"]
    if gc not in GC_MIN_DIM:
        raise ValueError(f"Ranger: gc must be one of 'all', 'conv', 'none', got {gc!r}")
    foreach = options["foreach"]
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"Ranger: foreach must be None, True or False, got {foreach!r}")


def step_scalars(step: int, beta1: float, beta2: float, threshold: float) -> tuple[bool, float]:
    """Return (rectified, step_size) for step number ``step`` (1-based), per the RAdam paper."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2**step / bias_correction2
    if rho_t > threshold:
        # threshold >= 4 gives rho_inf > rho_t > 4, so every factor under the root is positive.
        rectification = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        return True, math.sqrt(bias_correction2 * rectification) / bias_correction1
    return False, 1.0 / bias_correction1


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _gc_target_and_mean(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A view of ``grad`` and the per-output-channel mean to subtract from it in place.

    A contiguous gradient is seen as an (O, n) matrix with an (O, 1) mean: on CPU that subtraction is several
    times faster than broadcasting an (O, 1, 1, 1) keepdim mean over (O, I, kh, kw). Other layouts
    (channels_last) keep their shape, since a reshape would copy and the in-place update would be lost.
    """
    if grad.is_contiguous():
        rows = grad.view(grad.shape[0], -1)
        return rows, rows.mean(dim=1, keepdim=True)
    return grad, grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)


def _centralize_(grad: torch.Tensor) -> None:
    target, mean = _gc_target_and_mean(grad)
    target.sub_(mean)


class Ranger(Optimizer):
    """RAdam + LookAhead + Gradient Centralization (see the module docstring for the algorithm and sources).

    Args:
        params: parameters or parameter-group dicts; every option below can be overridden per group.
        lr: learning rate.
        betas: decay rates of the first and second moment.
        eps: added to sqrt(v) in the rectified update.
        weight_decay: decoupled weight decay, ``p <- p * (1 - lr * weight_decay)``.
        k: LookAhead synchronises the slow weights every k steps.
        alpha: LookAhead step of the slow weights towards the fast ones, in (0, 1].
        threshold: rho_t above which the RAdam update is rectified (>= 4).
        gc: gradient centralization for gradients with dim > 1 ("all"), dim > 3 ("conv") or none ("none").
        foreach: use the multi-tensor ``torch._foreach_*`` path; None picks it for non-CPU tensors (on CPU the
            per-tensor loop is faster: each tensor stays in cache through all of its updates).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        threshold: float = 5.0,
        gc: str = "all",
        foreach: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            k=k,
            alpha=alpha,
            threshold=threshold,
            gc=gc,
            foreach=foreach,
        )
        _validate_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its own options are validated like the constructor's."""
        _validate_options({**self.defaults, **{key: value for key, value in param_group.items() if key != "params"}})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping float32 buffers of half-precision parameters in float32.

        ``Optimizer.load_state_dict`` casts every floating-point state tensor to its parameter's dtype, which
        would round the float32 moments of a bfloat16 parameter; they are restored from ``state_dict`` here.
        The loaded buffers never alias the tensors of ``state_dict``.
        """
        super().load_state_dict(state_dict)
        saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for param_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(param_id)
            if not saved:
                continue
            state = self.state[param]
            dtype = _compute_dtype(param.dtype)
            for key in _STATE_BUFFERS:
                if key in saved:
                    value = saved[key].to(device=param.device, dtype=dtype)
                    state[key] = value.clone() if value is saved[key] else value

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for (device, _dtype, step), bucket in self._gather(group).items():
                self._update_bucket(bucket, group, device, step)
        return loss

    def _update_bucket(self, bucket: tuple[list[torch.Tensor], ...], group: dict[str, Any], device: torch.device,
                       step: int) -> None:
        """Update one bucket (params, grads, exp_avgs, exp_avg_sqs, slow weights) that shares ``step``."""
        beta1, beta2 = group["betas"]
        rectified, step_size = step_scalars(step, beta1, beta2, group["threshold"])
        foreach = group["foreach"]
        if foreach is None:
            foreach = device.type != "cpu"
        update = _update_foreach if foreach else _update_per_tensor
        update(*bucket, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"], gc_min_dim=GC_MIN_DIM[group["gc"]], rectified=rectified,
               step_size=step_size, sync=step % group["k"] == 0, alpha=group["alpha"])

    def _gather(self, group: dict[str, Any]) -> dict[tuple, tuple[list[torch.Tensor], ...]]:
        """Advance the step counter of each parameter with a gradient and bucket them by (device, dtype, step).

        The foreach path needs one set of scalars per call, and parameters that started receiving gradients
        later than the rest have smaller step counts, hence the step in the key.
        """
        buckets: dict[tuple, tuple[list[torch.Tensor], ...]] = defaultdict(lambda: ([], [], [], [], []))
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Ranger does not support sparse gradients")
            if param.is_complex():
                raise RuntimeError("Ranger does not support complex parameters")
            state = self.state[param]
            if not state:
                dtype = _compute_dtype(param.dtype)
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                # LookAhead's slow weights start as a copy of the weights before the first update.
                state["slow_weights"] = param.detach().to(dtype=dtype, copy=True)
            state["step"] += 1
            params, grads, exp_avgs, exp_avg_sqs, slow_weights = buckets[(param.device, param.dtype, state["step"])]
            params.append(param)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            slow_weights.append(state["slow_weights"])
        return buckets


def _update_per_tensor(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_weights: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    gc_min_dim: int | None,
    rectified: bool,
    step_size: float,
    sync: bool,
    alpha: float,
) -> None:
    """One Ranger step, tensor by tensor (all tensors share dtype, device and step count)."""
    for param, grad, exp_avg, exp_avg_sq, slow in zip(params, grads, exp_avgs, exp_avg_sqs, slow_weights):
        half = param.dtype in HALF_DTYPES
        work = param.float() if half else param
        grad = grad.float() if half else grad
        if gc_min_dim is not None and grad.dim() >= gc_min_dim:
            _centralize_(grad)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if weight_decay != 0:
            work.mul_(1.0 - lr * weight_decay)
        if rectified:
            work.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr * step_size)
        else:
            # Momentum SGD: the update reads the moment buffer and never writes into it.
            work.add_(exp_avg, alpha=-lr * step_size)
        if sync:
            slow.lerp_(work, alpha)
            param.copy_(slow)
        elif half:
            param.copy_(work)


def _update_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    slow_weights: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    gc_min_dim: int | None,
    rectified: bool,
    step_size: float,
    sync: bool,
    alpha: float,
) -> None:
    """The same step as ``_update_per_tensor`` with multi-tensor ``torch._foreach_*`` kernels."""
    half = params[0].dtype in HALF_DTYPES
    if half:
        work = [param.float() for param in params]
        grads = [grad.float() for grad in grads]
    else:
        work = params
    if gc_min_dim is not None:
        selected = [index for index, grad in enumerate(grads) if grad.dim() >= gc_min_dim]
        if selected:
            targets, means = zip(*(_gc_target_and_mean(grads[index]) for index in selected))
            torch._foreach_sub_(list(targets), list(means))
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(work, 1.0 - lr * weight_decay)
    if rectified:
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(work, exp_avgs, denominators, -lr * step_size)
    else:
        torch._foreach_add_(work, exp_avgs, alpha=-lr * step_size)
    if sync:
        torch._foreach_lerp_(slow_weights, work, alpha)
        torch._foreach_copy_(params, slow_weights)
    elif half:
        torch._foreach_copy_(params, work)
