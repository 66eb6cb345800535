"""Batches for training and evaluation: one interface (``set_epoch``, ``set_image_size``, ``len``, iteration
over (images, labels)) with two implementations, the DataLoader path and the decoded cache (host or GPU)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from braintumor.data.augment import Augmentation
from braintumor.data.cache import decode_to_tensor
from braintumor.data.index import SplitData
from braintumor.data.io import read_image
from braintumor.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, augment_batch, eval_transform,
                                        normalize_batch, resize_batch, train_transform)
from braintumor.errors import UserError
from braintumor.utils.seeding import derive_seed


class Ranks(Protocol):
    """Which process this is among how many (``braintumor.training.distributed.DistInfo`` is one; the data
    layer only reads these three)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...


@dataclass(frozen=True)
class BatchSettings:
    """What :func:`build_batches` needs to know of a run, built by ``TrainConfig.batch_settings()`` (the data
    layer never reads the training configuration). ``batch_size`` is the global batch over all processes."""

    batch_size: int
    seed: int
    workers: int
    image_size: int
    inference_image_size: int
    augmentation: Augmentation = Augmentation()


def batch_settings_of(settings) -> BatchSettings:
    """``settings`` itself, or what an object offering ``batch_settings()`` (a ``TrainConfig``) builds."""
    if isinstance(settings, BatchSettings):
        return settings
    if hasattr(settings, "batch_settings"):
        return settings.batch_settings()
    raise TypeError(f"build_batches needs BatchSettings, not {type(settings).__name__}")


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image, label) pairs read with :func:`braintumor.data.io.read_image` and passed through ``transform``."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int],
        transform: Callable | None,
    ):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = [int(label) for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class ShardSampler(torch.utils.data.Sampler):
    """A DataLoader sampler over :func:`shard_indices`: the cached path's order and sharding, for the loader path."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int, pad: bool):
        self.n, self.shuffle, self.seed, self.pad = n, shuffle, seed, pad
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        return shard_indices(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank,
                             world_size=self.world_size, pad=self.pad)

    def __iter__(self):
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return len(self._indices())


class LoaderBatches:
    """The DataLoader path: PIL decode + CPU transforms in workers, ordered and sharded by :func:`shard_indices`.

    Training pads every rank's shard to the same length (as DistributedSampler does); evaluation
    (``training=False``) gives every sample exactly once over all ranks.
    """

    def __init__(self, paths, labels, *, transform, batch_size: int, shuffle: bool, seed: int, workers: int,
                 dist: Ranks, pin_memory: bool, training: bool, transform_for_size=None):
        dataset = ImageFolderDataset(paths, labels, transform)
        self.dataset = dataset
        self.transform_for_size = transform_for_size
        self.sampler = ShardSampler(len(dataset), shuffle=shuffle, seed=seed, rank=dist.rank,
                                    world_size=dist.world_size, pad=training)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, shuffle=False,
                                 num_workers=workers, pin_memory=pin_memory,
                                 drop_last=training and drop_partial_batch(len(dataset), batch_size, dist))
        self.seed = seed
        self.rank = dist.rank

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        # Workers (started afresh each epoch) seed their RNGs from this generator, so augmentations depend
        # on (seed, epoch, rank) alone and a resumed run sees the same images as an uninterrupted one.
        self.loader.generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, "loader"))

    def set_image_size(self, size: int | None) -> None:
        """Build batches at ``size`` from the next epoch on (progressive resizing; workers start each epoch)."""
        if size is not None and self.transform_for_size is not None:
            self.dataset.transform = self.transform_for_size(size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def drop_partial_batch(n_images: int, batch_size: int, dist: Ranks) -> bool:
    """Training drops a last partial batch when a full one exists: BatchNorm's statistics over a handful of
    images (a single one fails outright) would give that step wild gradients, worse the more ranks share."""
    return math.ceil(n_images / dist.world_size) >= batch_size


def build_batches(split: SplitData, settings: BatchSettings, device: torch.device, dist: Ranks, progress: bool):
    """Train and val batch iterables on the split's data path (``split.cache_mode``, chosen by rank 0 for all
    ranks); returns (train, val, cache_mode). Images the split's scan kept decoded are used as they are.
    ``settings`` may also be an object with a ``batch_settings()`` method (a ``TrainConfig``)."""
    cfg = batch_settings_of(settings)
    per_rank_batch = cfg.batch_size // dist.world_size
    if per_rank_batch < 1 or cfg.batch_size % dist.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} (global) must be a multiple of the {dist.world_size} processes")
    mode = split.cache_mode
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    augmentation = cfg.augmentation
    val_size = cfg.inference_image_size
    if mode == "none":
        common = dict(batch_size=per_rank_batch, seed=cfg.seed, workers=cfg.workers, dist=dist,
                      pin_memory=device.type == "cuda")

        def transform_for_size(size: int):
            return train_transform(size, augmentation.rotation, mean, std, augmentation=augmentation)

        train = LoaderBatches(split.train_paths, split.train_labels, shuffle=True, training=True,
                              transform=transform_for_size(cfg.image_size), transform_for_size=transform_for_size,
                              **common)
        val = LoaderBatches(split.val_paths, split.val_labels, shuffle=False, training=False,
                            transform=eval_transform(val_size, mean, std), **common)
        return train, val, mode
    store = device if mode == "gpu" else torch.device("cpu")
    show = progress and dist.is_main and sys.stderr.isatty()
    pin = mode == "memory" and device.type == "cuda"  # pinned host memory: asynchronous copies to the GPU
    train_images, val_images = split.train_images, split.val_images
    if train_images is None or val_images is None:  # DDP: the split reached every rank without pixels
        train_images = decode_to_tensor(split.train_paths, cfg.image_size, store, pin_memory=pin, progress=show)
        val_images = decode_to_tensor(split.val_paths, val_size, store, pin_memory=pin, progress=show)
    else:
        train_images, val_images = (_store(images, store, pin) for images in (train_images, val_images))
    val_shard = slice(dist.rank, None, dist.world_size)
    common = dict(augmentation=augmentation, mean=mean, std=std, device=device, seed=cfg.seed)
    train = CachedBatches(train_images, torch.tensor(split.train_labels), per_rank_batch, shuffle=True,
                          augment=True, rank=dist.rank, world_size=dist.world_size,
                          drop_last=drop_partial_batch(len(split.train_paths), per_rank_batch, dist), **common)
    val = CachedBatches(val_images[val_shard], torch.tensor(split.val_labels)[val_shard], per_rank_batch,
                        shuffle=False, augment=False, **common)
    return train, val, mode


def _store(images: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """Decoded images moved to where the cache lives (pinned host memory when ``pin``)."""
    if pin and torch.cuda.is_available():
        return images.pin_memory()
    return images.to(device)


# --- the decoded cache --------------------------------------------------------------------------------------


def shard_indices(
    n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1, pad: bool = True
) -> torch.Tensor:
    """This rank's sample indices for an epoch, sharded as torch's DistributedSampler (drop_last=False) does.

    The permutation is shared by all ranks: a CPU generator seeded with ``derive_seed(seed, epoch, 0, "shuffle")``.
    With ``pad`` the list is extended by
    wrapping around so every rank gets ceil(n / world_size) samples, then rank r takes every world_size-th
    index from r. Without ``pad`` ranks get uneven shards and every sample exactly once (for evaluation).
    """
    if shuffle:
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0, "shuffle"))
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    if pad and world_size > 1 and n > 0:
        total = math.ceil(n / world_size) * world_size
        extra = total - n
        order = torch.cat([order, order.repeat(math.ceil(extra / n))[:extra]])
    return order[rank::world_size]


class CachedBatches:
    """Batches (float32 images, int64 labels) on ``device`` from a decoded uint8 cache (N, 3, S, S).

    Each epoch (``set_epoch``) is ordered and sharded across DDP ranks by :func:`shard_indices` (padding by
    wrap-around unless ``pad=False``). With ``augment`` every batch is flipped/rotated by :func:`augment_batch`
    from a generator seeded by ``derive_seed(seed, epoch, rank, "augment")``, so a run is
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
            generator.manual_seed(derive_seed(self.seed, self.epoch, self.rank, "augment"))
        for batch_number in range(len(self)):
            index = indices[batch_number * self.batch_size : (batch_number + 1) * self.batch_size]
            images, labels = self._gather(index)
            if self.augment:
                aug = self.augmentation
                yield augment_batch(images, aug.rotation, generator, self.mean, self.std, out_size=self.out_size,
                                    **aug.batch_kwargs()), labels
            else:
                batch = normalize_batch(images, self.mean, self.std)
                if self.out_size is not None:
                    batch = resize_batch(batch, self.out_size)
                yield batch, labels
