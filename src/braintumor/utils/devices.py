"""Where computation runs: the torch device a user asked for, and the CPU cores this process may use."""

from __future__ import annotations

import os

import torch

from braintumor.errors import UserError


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' → CUDA when available else CPU; asking for CUDA without one is a user error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda") from err


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
