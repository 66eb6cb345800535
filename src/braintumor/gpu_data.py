"""Decode-once cache choice and batched on-device augmentation.

With ``--data-cache gpu|memory`` every image is decoded once to uint8 at the training size
(:func:`braintumor.decode.decode_to_tensor`) and kept resident on the GPU (or in pinned host memory);
:func:`choose_cache` picks where it fits. Batches are then gathered, flipped, rotated and normalized on the device
in a few batched kernels instead of per image in DataLoader workers. The distributions are those of
:func:`braintumor.data.train_transform` (flip p = 0.5, angle ~ U(-deg, deg), bilinear, zero fill; torchvision's
rotation direction and centre); tests/test_gpu_data.py checks them against data.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from braintumor.data import IMAGENET_MEAN, IMAGENET_STD
from braintumor.errors import UserError
from braintumor.augment import Augmentation, random_intensity

CACHE_MODES = ("auto", "none", "memory", "gpu")


# --- cache choice ---------------------------------------------------------------------------------------------


def cache_bytes(n_images: int, image_size: int) -> int:
    """Bytes of a decoded uint8 cache of n_images RGB images of image_size x image_size."""
    return int(n_images) * 3 * int(image_size) ** 2


def _available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (or sysconf), capped by a cgroup v2 memory limit when there is one."""
    available = 0
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not available:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def choose_cache(
    mode: str,
    n_images: int,
    image_size: int,
    device: str | torch.device,
    *,
    free_gpu_bytes: int | None = None,
    available_ram_bytes: int | None = None,
) -> str:
    """Resolve ``--data-cache`` to "gpu", "memory" or "none".

    "auto": "gpu" on CUDA when the decoded set (N*3*S*S bytes) fits in a quarter of free GPU memory, else "memory"
    when it fits in a quarter of available RAM, else "none". Explicit modes are honoured; "gpu" without a CUDA
    device is a UserError. Memory figures are measured unless given.
    """
    if mode not in CACHE_MODES:
        raise UserError(f"unknown data cache '{mode}': choose one of {', '.join(CACHE_MODES)}")
    device = torch.device(device)
    if mode == "gpu" and device.type != "cuda":
        raise UserError(f"--data-cache gpu needs a CUDA device, but the device is {device}: use memory or auto")
    if mode != "auto":
        return mode
    needed = cache_bytes(n_images, image_size)
    if device.type == "cuda":
        if free_gpu_bytes is None:
            free_gpu_bytes = torch.cuda.mem_get_info(device)[0]
        if needed <= free_gpu_bytes / 4:
            return "gpu"
    if available_ram_bytes is None:
        available_ram_bytes = _available_ram_bytes()
    if needed <= available_ram_bytes / 4:
        return "memory"
    return "none"


# --- augmentation ---------------------------------------------------------------------------------------------


def _mean_std(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, ...]:
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean_t, std_t


def normalize_batch(
    images_uint8: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std, as ToDtype(scale=True) + Normalize."""
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
    out_size: int | None = None,
) -> torch.Tensor:
    """Random flip (p = 0.5) and rotation (U(-deg, deg), bilinear, zero fill) per sample, then normalize.

    uint8 (B, 3, H, W) -> float32 on the same device; the random draws come from ``generator``, which must live on
    that device. rotation_deg = 0 flips only. ``scale`` / ``translate`` add RandomAffine's scale U(1 - s, 1 + s) and
    shift of up to ``translate`` of the size; ``brightness`` / ``contrast`` / ``gamma`` add
    :func:`braintumor.augment.random_intensity`; each draws random numbers only when switched on, so switching
    none on replays the flip-and-rotate stream exactly. ``out_size`` resizes the result (antialiased bilinear, as
    the DataLoader path's Resize; progressive resizing).
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
    if theta is not None:
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        # Zero padding before normalization is RandomRotation's fill=0 (black) in [0, 1] pixel space.
        batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    if out_size is not None and out_size != batch.shape[-1]:
        batch = F.interpolate(batch, size=(out_size, out_size), mode="bilinear", antialias=True,
                              align_corners=False)
    batch = random_intensity(batch, brightness, contrast, gamma, generator)
    mean_t, std_t = _mean_std(mean, std, batch.device)
    return (batch - mean_t) / std_t


# --- batches --------------------------------------------------------------------------------------------------


def shard_indices(
    n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1, pad: bool = True
) -> torch.Tensor:
    """This rank's sample indices for an epoch, as torch's DistributedSampler (drop_last=False) picks them.

    The permutation comes from a CPU generator seeded with seed + epoch; with ``pad`` the list is extended by
    wrapping around so every rank gets ceil(n / world_size) samples, then rank r takes every world_size-th
    index from r. Without ``pad`` ranks get uneven shards and every sample exactly once (for evaluation).
    """
    if shuffle:
        generator = torch.Generator().manual_seed(int(seed) + int(epoch))
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    if pad and world_size > 1 and n > 0:
        total = math.ceil(n / world_size) * world_size
        extra = total - n
        order = torch.cat([order, order.repeat(math.ceil(extra / n))[:extra]])
    return order[rank::world_size]


def _augment_seed(seed: int, epoch: int, rank: int) -> int:
    # SeedSequence mixes (seed, epoch, rank) into independent streams; 63 bits fit manual_seed on every device.
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), int(epoch), int(rank)]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


class CachedBatches:
    """Batches (float32 images, int64 labels) on ``device`` from a decoded uint8 cache (N, 3, S, S).

    Each epoch (``set_epoch``) shuffles with a generator seeded by seed + epoch and shards across DDP ranks as
    DistributedSampler does (padding by wrap-around unless ``pad=False``). With ``augment`` every batch is
    flipped/rotated by :func:`augment_batch` from a generator seeded by (seed, epoch, rank), so a run is
    deterministic for a seed and resumes identically at an epoch boundary; otherwise batches are only normalized.
    ``drop_last`` drops this rank's last incomplete batch. A CPU cache feeding a CUDA device is gathered into
    pinned memory and copied asynchronously.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int] | torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        augment: bool = False,
        rotation: float = 0.0,
        augmentation: Augmentation | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        device: str | torch.device | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(images.device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.augmentation = augmentation if augmentation is not None else Augmentation(rotation=float(rotation))
        self.rotation = self.augmentation.rotation
        self.out_size: int | None = None
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.device = torch.device(device) if device is not None else images.device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def set_image_size(self, size: int | None) -> None:
        """Resize batches to ``size`` (progressive resizing); None keeps the cached size."""
        self.out_size = None if size is None or size == self.images.shape[-1] else int(size)

    def _indices(self) -> torch.Tensor:
        return shard_indices(self.images.shape[0], shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                             rank=self.rank, world_size=self.world_size, pad=self.pad)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (drop_last taken into account)."""
        count = len(self._indices())
        return (count // self.batch_size) * self.batch_size if self.drop_last else count

    def __len__(self) -> int:
        count = len(self._indices())
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images.device == self.device:
            return self.images.index_select(0, index), self.labels.index_select(0, index)
        if self.images.device.type == "cpu" and self.device.type == "cuda":
            # The caching host allocator reuses pinned blocks and keeps them alive until the copy is done.
            staging = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
            torch.index_select(self.images, 0, index, out=staging)
            return staging.to(self.device, non_blocking=True), self.labels.index_select(0, index).to(self.device)
        return (self.images.index_select(0, index).to(self.device),
                self.labels.index_select(0, index).to(self.device))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices().to(self.images.device)
        generator = None
        if self.augment:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(_augment_seed(self.seed, self.epoch, self.rank))
        for batch_number in range(len(self)):
            index = indices[batch_number * self.batch_size : (batch_number + 1) * self.batch_size]
            images, labels = self._gather(index)
            if self.augment:
                aug = self.augmentation
                yield augment_batch(images, aug.rotation, generator, self.mean, self.std, scale=aug.scale,
                                    translate=aug.translate, out_size=self.out_size,
                                    **aug.intensity_kwargs()), labels
            else:
                batch = normalize_batch(images, self.mean, self.std)
                if self.out_size is not None:
                    batch = F.interpolate(batch, size=(self.out_size, self.out_size), mode="bilinear",
                                          antialias=True, align_corners=False)
                yield batch, labels
