"""Helpers shared by test modules (import them from here, not from other test files)."""

from __future__ import annotations

from braintumor.config import TrainConfig


def tiny_config(data, out, **overrides) -> TrainConfig:
    """A resnet18 run at 32 px on the CPU that finishes in seconds."""
    values = dict(data=str(data), arch="resnet18", weights="none", image_size=32, epochs=2, batch_size=8,
                  lr=1e-3, device="cpu", workers=0, seed=7, out=str(out), progress=False)
    values.update(overrides)
    return TrainConfig(**values)
