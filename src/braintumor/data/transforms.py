"""Preprocessing and augmentation: the per-image CPU transforms and their batched on-device twins.

The DataLoader path transforms PIL images (:func:`train_transform`, :func:`eval_transform`); the cached path
augments uint8 batches on the device (:func:`augment_batch`, :func:`normalize_batch`) with the same distributions
(flip p = 0.5, angle ~ U(-deg, deg), bilinear, zero fill; torchvision's rotation direction and centre);
tests/test_gpu_data.py checks them against each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from braintumor.data.augment import (CROP_RATIO, ERASING_AREA, ERASING_RATIO, Augmentation, RandomIntensity,
                                     intensity_enabled, random_erasing, random_intensity, sample_crop)
from braintumor.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_sizes(image_size: int, rotation: float = 0.0) -> None:
    if int(image_size) != image_size or image_size < 1:
        raise UserError(f"image size must be a positive integer, got {image_size}")
    if rotation < 0 or rotation > 180:
        raise UserError(f"rotation must be between 0 and 180 degrees, got {rotation}")


def train_transform(
    image_size: int,
    rotation: float,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    augmentation: Augmentation | None = None,
) -> v2.Compose:
    """Training transform for a PIL RGB image: resize to (s, s), flip p=0.5, rotate U(-rotation, rotation)
    degrees (bilinear, zero fill; 0 disables it), float tensor in [0, 1], normalize.

    ``augmentation`` (its rotation replaces ``rotation``) adds a random-resized crop of the resized slice (its
    ``crop_area``: torchvision's RandomResizedCrop with scale (crop_area, 1) and ratio CROP_RATIO, back to (s, s),
    before the flip), RandomAffine's scale and shift (RandomAffine then replaces RandomRotation), random gamma /
    brightness / contrast and random erasing (black) before normalizing.
    """
    aug = augmentation if augmentation is not None else Augmentation(rotation=rotation)
    _check_sizes(image_size, aug.rotation)
    size = (int(image_size), int(image_size))
    steps = [v2.Resize(size, antialias=True)]
    if aug.crop_area > 0:
        steps.append(v2.RandomResizedCrop(size, scale=(aug.crop_area, 1.0), ratio=CROP_RATIO, antialias=True))
    steps.append(v2.RandomHorizontalFlip(0.5))
    if aug.affine:
        steps.append(v2.RandomAffine(aug.rotation, translate=(aug.translate, aug.translate),
                                     scale=(1.0 - aug.scale, 1.0 + aug.scale),
                                     interpolation=InterpolationMode.BILINEAR, fill=0))
    elif aug.rotation > 0:
        steps.append(v2.RandomRotation(aug.rotation, interpolation=InterpolationMode.BILINEAR, fill=0))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if intensity_enabled(aug.brightness, aug.contrast, aug.gamma):
        steps.append(RandomIntensity(aug.brightness, aug.contrast, aug.gamma))
    if aug.erasing > 0:
        steps.append(v2.RandomErasing(aug.erasing, scale=ERASING_AREA, ratio=ERASING_RATIO, value=0))
    return v2.Compose(steps + [v2.Normalize(list(mean), list(std))])


def resize_to_uint8(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, S, S) by PIL's antialiased bilinear resize: what the decoded cache stores."""
    size = (int(image_size), int(image_size))
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


class EvalTransform:
    """Evaluation preprocessing of a PIL RGB image: :func:`resize_to_uint8`, then :func:`normalize_batch`.

    The one preprocessing of every evaluation (validation during training on either data path, the final report,
    ``evaluate``, ``predict``, ``serve``): the cached path stores the uint8 step and normalizes batches with the
    same function, so both give bit-identical tensors.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        _check_sizes(image_size)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize_batch(resize_to_uint8(image, self.image_size), self.mean, self.std)


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> EvalTransform:
    """Evaluation transform for a PIL RGB image: resize to (s, s), float tensor in [0, 1], normalize."""
    return EvalTransform(image_size, mean, std)


def resize_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """float (B, C, H, W) -> (B, C, size, size) by antialiased bilinear interpolation (as the DataLoader path's
    Resize); the batch itself when it has that size already."""
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(int(size), int(size)), mode="bilinear", antialias=True, align_corners=False)


def _mean_std(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, ...]:
    # (3, 1, 1) broadcasts over one image (3, H, W) and over a batch (B, 3, H, W) alike.
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return mean_t, std_t


def normalize_batch(
    images_uint8: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, as ToDtype(scale=True) + Normalize."""
    mean_t, std_t = _mean_std(mean, std, images_uint8.device)
    return (images_uint8.to(torch.float32) / 255.0 - mean_t) / std_t


def _sample_params(
    batch_size: int, rotation_deg: float, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (flip: bool (B,), angle in degrees: float32 (B,)) as RandomHorizontalFlip(0.5) and
    RandomRotation(rotation_deg) draw them: flip when U(0,1) < 0.5, angle ~ U(-deg, deg)."""
    flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
    angle = (torch.rand(batch_size, generator=generator, device=device) * 2.0 - 1.0) * float(rotation_deg)
    return flip, angle


def _flip_rotate_theta(flip: torch.Tensor, angle_deg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """affine_grid matrices (B, 2, 3) for a horizontal flip (where ``flip``) followed by a rotation.

    torchvision rotates by +angle counter-clockwise about the image centre: output pixel p (centred pixel
    coordinates, y down) samples input R p with R = [[cos, -sin], [sin, cos]]. affine_grid works in coordinates
    normalized by (W/2, H/2) (align_corners=False), hence the aspect factors. The flip negates the sampled x.
    """
    ones = torch.ones_like(angle_deg, dtype=torch.float32)
    return _affine_theta(flip, angle_deg, ones, 0.0 * ones, 0.0 * ones, height, width)


def _affine_theta(flip: torch.Tensor, angle_deg: torch.Tensor, scale: torch.Tensor, shift_x: torch.Tensor,
                  shift_y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """affine_grid matrices (B, 2, 3) for a flip, then torchvision's affine (rotation and scale about the centre,
    then a shift of (shift_x, shift_y) pixels, x right, y down).

    torchvision's inverse map samples input q = R(-angle) (p - t) / scale for output p (centred coordinates); in
    affine_grid's normalized coordinates t becomes (2 shift_x / W, 2 shift_y / H). The flip negates the sampled x.
    """
    radians = angle_deg.to(torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(radians) / scale, torch.sin(radians) / scale
    sign = 1.0 - 2.0 * flip.to(torch.float32)
    a, b = cos, -sin * (height / width)
    c, d = sin * (width / height), cos
    tx, ty = 2.0 * shift_x.to(torch.float32) / width, 2.0 * shift_y.to(torch.float32) / height
    row_x = torch.stack([sign * a, sign * b, -sign * (a * tx + b * ty)], dim=1)
    row_y = torch.stack([c, d, -(c * tx + d * ty)], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def _crop_theta(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """affine_grid matrices (B, 2, 3) that resize each (top, left, h, w) pixel box of ``boxes`` to the whole
    output (resized_crop's geometry: the box's outer pixel edges map to the output's)."""
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    zeros = torch.zeros_like(h)
    row_x = torch.stack([w / width, zeros, (2.0 * left + w) / width - 1.0], dim=1)
    row_y = torch.stack([zeros, h / height, (2.0 * top + h) / height - 1.0], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def _then(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The affine_grid matrix of sampling through ``second`` and then ``first``: output p -> first(second(p))."""
    linear = first[:, :, :2] @ second[:, :, :2]
    offset = (first[:, :, :2] @ second[:, :, 2:]) + first[:, :, 2:]
    return torch.cat([linear, offset], dim=2)


def _sample_affine(batch_size: int, scale: float, translate: float, size: int, generator: torch.Generator | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (scale, shift_x, shift_y) as RandomAffine draws them: scale ~ U(1 - s, 1 + s); shifts in whole
    pixels, round(U(-t * size, t * size)) (torchvision rounds its translation to pixels)."""
    draws = torch.rand(batch_size, 3, generator=generator, device=device)
    factor = 1.0 + (draws[:, 0] * 2.0 - 1.0) * scale
    max_shift = float(translate * size)
    shifts = torch.round((draws[:, 1:] * 2.0 - 1.0) * max_shift)
    return factor, shifts[:, 0], shifts[:, 1]


def augment_batch(
    images_uint8: torch.Tensor,
    rotation_deg: float,
    generator: torch.Generator | None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    scale: float = 0.0,
    translate: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 0.0,
    gamma: float = 0.0,
    erasing: float = 0.0,
    crop_area: float = 0.0,
    out_size: int | None = None,
) -> torch.Tensor:
    """Random flip (p = 0.5) and rotation (U(-deg, deg), bilinear, zero fill) per sample, then normalize.

    uint8 (B, 3, H, W) -> float32 on the same device; the random draws come from ``generator``, which must live on
    that device. rotation_deg = 0 flips only. ``scale`` / ``translate`` add RandomAffine's scale U(1 - s, 1 + s) and
    shift of up to ``translate`` of the size; ``brightness`` / ``contrast`` / ``gamma`` add
    :func:`braintumor.data.augment.random_intensity`, ``erasing`` :func:`braintumor.data.augment.random_erasing`
    (black, before normalizing), ``crop_area`` a random-resized crop (:func:`braintumor.data.augment.sample_crop`,
    resized back to the full size before the flip, in the same sampling pass); each draws random numbers only
    when switched on, so switching none on replays the flip-and-rotate stream exactly. ``out_size`` resizes the
    result (antialiased bilinear, as the DataLoader path's Resize; progressive resizing).
    """
    batch = images_uint8.to(torch.float32) / 255.0
    flip, angle = _sample_params(batch.shape[0], rotation_deg, generator, batch.device)
    if scale > 0 or translate > 0:
        factor, shift_x, shift_y = _sample_affine(batch.shape[0], scale, translate, batch.shape[-1], generator,
                                                  batch.device)
        theta = _affine_theta(flip, angle, factor, shift_x, shift_y, batch.shape[-2], batch.shape[-1])
    elif rotation_deg > 0:
        theta = _flip_rotate_theta(flip, angle, batch.shape[-2], batch.shape[-1])
    else:
        theta = None
    if crop_area > 0:  # crop and resize first, then flip / rotate / shift the crop: one sampling pass
        boxes = sample_crop(batch.shape[0], batch.shape[-2], batch.shape[-1], crop_area, generator, batch.device)
        if theta is None:
            theta = _flip_rotate_theta(flip, torch.zeros_like(angle), batch.shape[-2], batch.shape[-1])
        theta = _then(_crop_theta(boxes, batch.shape[-2], batch.shape[-1]), theta)
    if theta is not None:
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        # Zero padding before normalization is RandomRotation's fill=0 (black) in [0, 1] pixel space.
        batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    if out_size is not None:
        batch = resize_batch(batch, out_size)
    batch = random_intensity(batch, brightness, contrast, gamma, generator)
    batch = random_erasing(batch, erasing, generator)
    mean_t, std_t = _mean_std(mean, std, batch.device)
    return (batch - mean_t) / std_t
