"""Training augmentation options, random brightness / contrast / gamma and random erasing shared by both data
paths, and CutMix / MixUp of whole batches.

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

Random erasing (Zhong et al., 2020; the Cutout / Hide-and-Seek family) blacks out one rectangle of an image with
probability ``erasing``: the rectangle covers U(0.02, 0.33) of the image with aspect ratio log-uniform in
[0.3, 3.3], placed uniformly where it fits (up to 10 draws; none fits: the image stays whole), torchvision's
``RandomErasing`` algorithm and defaults. A classifier then cannot rely on any one region, the margins included.
The DataLoader path uses torchvision's ``v2.RandomErasing`` (value 0 before normalizing: black), the cached path
:func:`random_erasing`, vectorised over the batch with the same draws' distribution.

CutMix (Yun et al., 2019) and MixUp (Zhang et al., 2018) act on a normalized batch on the training device, after
either data path (:func:`batch_mixer`): torchvision's ``v2.CutMix`` / ``v2.MixUp``, which pair each slice with its
neighbour in the (shuffled) batch and turn the labels into class shares. CutMix pastes a rectangle of the other
slice (its area a Beta(a, a) share), so a slice's label must be found in the part of the image that carries it;
the mixed labels train with the same cross-entropy (soft targets). They draw from torch's global generator, which
the trainer reseeds every epoch (``utils.seeding``, stream "global"), so a resumed run mixes as an uninterrupted
one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class Augmentation:
    """What training randomizes, shared by the DataLoader path (:func:`braintumor.data.transforms.train_transform`)
    and the cached path (:func:`braintumor.data.transforms.augment_batch`): horizontal flip (always, p = 0.5),
    rotation in degrees, RandomAffine's scale (U(1 - s, 1 + s)) and shift (fraction of the size), the intensity
    changes below, random erasing's probability and a random-resized crop's smallest share of the area (before
    the flip). Zero switches a change off."""

    rotation: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    erasing: float = 0.0
    crop_area: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "Augmentation":
        """The augmentation a :class:`braintumor.training.config.TrainConfig` asks for."""
        return cls(rotation=cfg.rotation, scale=cfg.scale, translate=cfg.translate, brightness=cfg.brightness,
                   contrast=cfg.contrast, gamma=cfg.gamma, erasing=cfg.erasing, crop_area=cfg.crop_area)

    @property
    def affine(self) -> bool:
        """Whether scale or shift is on (then RandomAffine replaces RandomRotation on the DataLoader path)."""
        return self.scale > 0 or self.translate > 0

    def batch_kwargs(self) -> dict[str, float]:
        """The keyword arguments of :func:`braintumor.data.transforms.augment_batch` besides the rotation."""
        return {"scale": self.scale, "translate": self.translate, "brightness": self.brightness,
                "contrast": self.contrast, "gamma": self.gamma, "erasing": self.erasing, "crop_area": self.crop_area}


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


CROP_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect ratios (w / h)
_CROP_ATTEMPTS = 10


def sample_crop(batch_size: int, height: int, width: int, min_area: float, generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
    """Per-image crop boxes (B, 4) as (top, left, height, width) in whole pixels, as torchvision's
    ``RandomResizedCrop.get_params(scale=(min_area, 1), ratio=CROP_RATIO)`` draws them per image: up to 10 draws
    of an area U(min_area, 1) x H x W and an aspect ratio exp(U(log 3/4, log 4/3)), w = round(sqrt(area ratio)),
    h = round(sqrt(area / ratio)); the first draw that fits is placed at a uniform top-left corner; when none
    fits, the central crop of the nearest allowed aspect (the whole image for a square one)."""
    draws = torch.rand(batch_size, 4 * _CROP_ATTEMPTS, generator=generator, device=device)
    area_u, ratio_u, top_u, left_u = draws.view(batch_size, _CROP_ATTEMPTS, 4).unbind(-1)
    area = height * width * (min_area + area_u * (1.0 - min_area))
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_low + ratio_u * (log_high - log_low))
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.floor(top_u.gather(1, first)[:, 0] * (height - h + 1))
    left = torch.floor(left_u.gather(1, first)[:, 0] * (width - w + 1))
    # The fallback: torchvision's central crop.
    fall_h, fall_w = height, width
    if width / height < CROP_RATIO[0]:
        fall_h = round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        fall_w = round(height * CROP_RATIO[1])
    any_fit = fits.any(dim=1)
    h = torch.where(any_fit, h, torch.full_like(h, fall_h))
    w = torch.where(any_fit, w, torch.full_like(w, fall_w))
    top = torch.where(any_fit, top, torch.full_like(top, (height - fall_h) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (width - fall_w) // 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


ERASING_AREA = (0.02, 0.33)  # torchvision RandomErasing's defaults: share of the image, and aspect ratio h / w
ERASING_RATIO = (0.3, 3.3)
_ERASING_ATTEMPTS = 10


def sample_erasing(batch_size: int, height: int, width: int, probability: float,
                   generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Per-image rectangles (B, 4) as (top, left, height, width), height 0 where nothing is erased.

    torchvision's ``RandomErasing.get_params`` per image: with probability ``probability``, up to 10 draws of an
    area U(0.02, 0.33) x H x W and an aspect ratio exp(U(log 0.3, log 3.3)), h = round(sqrt(area ratio)),
    w = round(sqrt(area / ratio)); the first draw with h < H and w < W is placed at a uniform top-left corner."""
    draws = torch.rand(batch_size, 1 + 4 * _ERASING_ATTEMPTS, generator=generator, device=device)
    erase = draws[:, 0] < probability
    area_u, ratio_u, top_u, left_u = draws[:, 1:].view(batch_size, _ERASING_ATTEMPTS, 4).unbind(-1)
    area = height * width * (ERASING_AREA[0] + area_u * (ERASING_AREA[1] - ERASING_AREA[0]))
    log_low, log_high = math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])
    ratio = torch.exp(log_low + ratio_u * (log_high - log_low))
    h, w = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # the first draw that fits (0 if none does)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.floor(top_u.gather(1, first)[:, 0] * (height - h + 1))
    left = torch.floor(left_u.gather(1, first)[:, 0] * (width - w + 1))
    h = torch.where(erase & fits.any(dim=1), h, torch.zeros_like(h))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def random_erasing(batch: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Black out (0) one random rectangle per image of a float batch (B, C, H, W) with probability
    ``probability`` (:func:`sample_erasing`); identity, drawing nothing, when it is 0."""
    if probability <= 0:
        return batch
    height, width = batch.shape[-2:]
    boxes = sample_erasing(batch.shape[0], height, width, probability, generator, batch.device)
    top, left, h, w = (boxes[:, k].view(-1, 1) for k in range(4))
    rows = torch.arange(height, device=batch.device).view(1, -1)
    columns = torch.arange(width, device=batch.device).view(1, -1)
    inside_rows = (rows >= top) & (rows < top + h)  # (B, H)
    inside_columns = (columns >= left) & (columns < left + w)  # (B, W)
    inside = inside_rows[:, :, None] & inside_columns[:, None, :]
    return batch.masked_fill(inside[:, None], 0.0)


def batch_mixer(cutmix: float, mixup: float, num_classes: int) -> v2.Transform | None:
    """CutMix and / or MixUp of a training batch: ``mixer(images, labels)`` gives the mixed images and (B, classes)
    label shares. ``cutmix`` and ``mixup`` are the Beta(a, a) concentrations (0: off); with both on, each batch
    takes one of the two with equal chance (as timm does). None when both are off."""
    mixers = ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []) + \
             ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
