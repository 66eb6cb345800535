"""Training augmentation options, and random brightness / contrast / gamma shared by both data paths.

Scanners and protocols differ in overall intensity, contrast and the shape of the grey-level curve; small random
changes of the three make a classifier less sensitive to them. Per image, on float pixels in [0, 1] and in this
order: gamma ``x ** g`` with ``log g ~ U(-gamma, gamma)`` (log-uniform, so darkening and brightening are equally
likely), brightness ``x * b`` with ``b ~ U(1 - brightness, 1 + brightness)``, contrast ``(x - m) * c + m`` with
``c ~ U(1 - contrast, 1 + contrast)`` and ``m`` the image's mean (torchvision's ``adjust_contrast`` uses the mean
of the grey image; on grey slices the two agree), then clipping to [0, 1] once at the end (torchvision's
functional ``adjust_*`` clip after each step; the two differ only where brightness pushes pixels past 1; the
shipped reference model was trained with this arithmetic). Zero-valued background stays zero under
gamma and brightness. The DataLoader path calls :class:`RandomIntensity` per image, the cached path calls
:func:`random_intensity` per batch: the same arithmetic, so the two paths agree in distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Augmentation:
    """What training randomizes, shared by the DataLoader path (:func:`braintumor.data.transforms.train_transform`)
    and the cached path (:func:`braintumor.data.transforms.augment_batch`): horizontal flip (always, p = 0.5),
    rotation in degrees, RandomAffine's scale (U(1 - s, 1 + s)) and shift (fraction of the size), and the intensity
    changes below. Zero switches a change off."""

    rotation: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "Augmentation":
        """The augmentation a :class:`braintumor.training.config.TrainConfig` asks for."""
        return cls(rotation=cfg.rotation, scale=cfg.scale, translate=cfg.translate, brightness=cfg.brightness,
                   contrast=cfg.contrast, gamma=cfg.gamma)

    @property
    def affine(self) -> bool:
        """Whether scale or shift is on (then RandomAffine replaces RandomRotation on the DataLoader path)."""
        return self.scale > 0 or self.translate > 0

    def intensity_kwargs(self) -> dict[str, float]:
        return {"brightness": self.brightness, "contrast": self.contrast, "gamma": self.gamma}


def intensity_enabled(brightness: float, contrast: float, gamma: float) -> bool:
    """Whether any of the three changes is switched on."""
    return brightness > 0 or contrast > 0 or gamma > 0


def sample_intensity(batch_size: int, brightness: float, contrast: float, gamma: float,
                     generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Per-image factors (B, 3): gamma, brightness, contrast, drawn in that order from ``generator``."""
    draws = torch.rand(batch_size, 3, generator=generator, device=device) * 2.0 - 1.0
    spreads = torch.tensor([gamma, brightness, contrast], dtype=torch.float32, device=device)
    factors = 1.0 + draws * spreads
    factors[:, 0] = torch.exp(draws[:, 0] * gamma)
    return factors


def apply_intensity(batch: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Apply (B, 3) gamma / brightness / contrast factors to float images (B, C, H, W) in [0, 1]."""
    view = (-1, 1, 1, 1)
    gamma, brightness, contrast = (factors[:, k].view(view) for k in range(3))
    out = batch.clamp(0.0, 1.0).pow(gamma) * brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).clamp(0.0, 1.0)


def random_intensity(batch: torch.Tensor, brightness: float, contrast: float, gamma: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random gamma, brightness and contrast per image of a float batch in [0, 1]; identity when all are 0."""
    if not intensity_enabled(brightness, contrast, gamma):
        return batch
    factors = sample_intensity(batch.shape[0], brightness, contrast, gamma, generator, batch.device)
    return apply_intensity(batch, factors)


class RandomIntensity:
    """The per-image transform of the DataLoader path (float tensor (C, H, W) in [0, 1]); torch's global RNG."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, gamma: float = 0.0):
        for name, value in (("brightness", brightness), ("contrast", contrast), ("gamma", gamma)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.brightness, self.contrast, self.gamma = float(brightness), float(contrast), float(gamma)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random_intensity(image.as_subclass(torch.Tensor)[None], self.brightness, self.contrast,
                                self.gamma)[0]

    def __repr__(self) -> str:
        return f"RandomIntensity(brightness={self.brightness}, contrast={self.contrast}, gamma={self.gamma})"
