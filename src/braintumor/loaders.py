"""From a training config to batches: file checks, the train/val split, and the data path (cache or DataLoader)."""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .augment import Augmentation
from .config import TrainConfig
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, discover, eval_transform, stratified_split, train_transform
from .data import report_unsupported
from .decode import decode_to_tensor
from .distributed import DistInfo, broadcast_object
from .errors import UserError
from .gpu_data import CachedBatches, choose_cache
from .images import find_bad_images

MAX_LISTED_BAD_FILES = 10


@dataclass
class SplitData:
    """Which files train and which validate, with the class list and any skipped bad files."""

    classes: list[str]
    train_paths: list[Path]
    train_labels: list[int]
    val_paths: list[Path]
    val_labels: list[int]
    val_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicate_groups_split: bool = False


def drop_bad_files(paths: list[Path], labels: list[int], root: str, skip_bad: bool, progress: bool,
                   ) -> tuple[list[Path], list[int], list[tuple[str, str]]]:
    """Decode every file once; stop with one message listing bad files, or drop them with ``skip_bad``."""
    bad = find_bad_images(paths, progress=progress)
    if bad and not skip_bad:
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:MAX_LISTED_BAD_FILES])
        more = f"; and {len(bad) - MAX_LISTED_BAD_FILES} more" if len(bad) > MAX_LISTED_BAD_FILES else ""
        raise UserError(f"{len(bad)} unreadable image(s) in {root}: {listed}{more}. Fix or remove them, "
                        "or rerun with --skip-bad to skip them (they are then listed in the run's report)")
    bad_set = {Path(path) for path, _ in bad}
    kept = [(p, y) for p, y in zip(paths, labels) if p not in bad_set]
    return [p for p, _ in kept], [y for _, y in kept], [(str(p), reason) for p, reason in bad]


def prepare_split(cfg: TrainConfig, progress: bool) -> SplitData:
    """Discover the data, check every file, and split (grouping duplicates) unless --val is given."""
    index = discover(cfg.data)
    paths, labels, skipped = drop_bad_files(index.paths, index.labels, cfg.data, cfg.skip_bad, progress)
    skipped += report_unsupported(cfg.data)
    if cfg.val:
        val_index = discover(cfg.val, classes=index.classes)
        val_paths, val_labels, val_skipped = drop_bad_files(val_index.paths, val_index.labels, cfg.val,
                                                            cfg.skip_bad, progress)
        val_skipped += report_unsupported(cfg.val)
        return SplitData(index.classes, paths, labels, val_paths, val_labels, f"folder {cfg.val}",
                         skipped + val_skipped)
    from .groups import find_groups, merge_groups

    patients, patient_source = find_groups(paths, cfg.data, cfg.groups)
    groups = None
    if cfg.group_split:
        from .dedup import duplicate_groups

        groups = merge_groups(patients, duplicate_groups(paths))
        largest = max(Counter(groups).values())
        if largest > max(20, len(paths) // 10):
            # Transitive near-duplicate chains can swallow distinct images (e.g. tiny, very uniform images);
            # the split stays leak-free but cannot stratify well. Say so rather than fail.
            print(f"warning: {largest} of {len(paths)} images fall into one duplicate group, so the validation "
                  "split cannot be stratified well; if they are distinct images, use --no-group-split",
                  file=sys.stderr)
    elif patient_source:
        groups = merge_groups(patients)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_idx, val_idx = stratified_split(labels, cfg.val_split, split_seed, groups=groups)
    kept = [what for what, on in ((f"groups from {patient_source}", patient_source),
                                  ("duplicates", cfg.group_split)) if on]
    source = (f"{cfg.val_split:.0%} stratified split of {cfg.data} (seed {split_seed}"
              f"{', ' + ' and '.join(kept) + ' kept on one side' if kept else ''})")
    return SplitData(index.classes, [paths[i] for i in train_idx], [labels[i] for i in train_idx],
                     [paths[i] for i in val_idx], [labels[i] for i in val_idx], source, skipped,
                     duplicate_groups_split=groups is not None)


class LoaderBatches:
    """The DataLoader path: PIL decode + CPU transforms in workers, sharded like DistributedSampler."""

    def __init__(self, paths, labels, *, transform, batch_size: int, shuffle: bool, seed: int, workers: int,
                 dist: DistInfo, pin_memory: bool, training: bool, transform_for_size=None):
        dataset = ImageFolderDataset(paths, labels, transform)
        self.dataset = dataset
        self.transform_for_size = transform_for_size
        if training:
            self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                              shuffle=shuffle, seed=seed)
            source = dataset
        else:  # evaluation: every sample exactly once over all ranks, no padding duplicates
            self.sampler = None
            source = Subset(dataset, list(range(dist.rank, len(dataset), dist.world_size)))
        self.loader = DataLoader(source, batch_size=batch_size, sampler=self.sampler, shuffle=False,
                                 num_workers=workers, pin_memory=pin_memory,
                                 drop_last=training and drop_partial_batch(len(dataset), batch_size, dist))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        # Workers (started afresh each epoch) seed their RNGs from this generator, so augmentations depend
        # on (seed, epoch) alone and a resumed run sees the same images as an uninterrupted one.
        self.loader.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def set_image_size(self, size: int | None) -> None:
        """Build batches at ``size`` from the next epoch on (progressive resizing; workers start each epoch)."""
        if size is not None and self.transform_for_size is not None:
            self.dataset.transform = self.transform_for_size(size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def drop_partial_batch(n_images: int, batch_size: int, dist: DistInfo) -> bool:
    """Training drops a last partial batch when a full one exists: BatchNorm's statistics over a handful of
    images (a single one fails outright) would give that step wild gradients, worse the more ranks share."""
    return math.ceil(n_images / dist.world_size) >= batch_size


def build_batches(split: SplitData, cfg: TrainConfig, device: torch.device, dist: DistInfo, progress: bool):
    """Train and val batch iterables on the configured data path; returns (train, val, cache_mode)."""
    per_rank_batch = cfg.batch_size // dist.world_size
    if per_rank_batch < 1 or cfg.batch_size % dist.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} (global) must be a multiple of the {dist.world_size} processes")
    n_images = len(split.train_paths) + len(split.val_paths)
    # Rank 0 decides for all: ranks with different free memory must still share one data path.
    mode = broadcast_object(choose_cache(cfg.data_cache, n_images, cfg.image_size, device), dist)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    augmentation = Augmentation.from_config(cfg)
    val_size = cfg.inference_image_size
    if mode == "none":
        common = dict(batch_size=per_rank_batch, seed=cfg.seed, workers=cfg.workers, dist=dist,
                      pin_memory=device.type == "cuda")

        def transform_for_size(size: int):
            return train_transform(size, cfg.rotation, mean, std, augmentation=augmentation)

        train = LoaderBatches(split.train_paths, split.train_labels, shuffle=True, training=True,
                              transform=transform_for_size(cfg.image_size), transform_for_size=transform_for_size,
                              **common)
        val = LoaderBatches(split.val_paths, split.val_labels, shuffle=False, training=False,
                            transform=eval_transform(val_size, mean, std), **common)
        return train, val, mode
    store = device if mode == "gpu" else torch.device("cpu")
    show = progress and dist.is_main and sys.stderr.isatty()
    pin = mode == "memory" and device.type == "cuda"  # pinned host memory: asynchronous copies to the GPU
    train_images = decode_to_tensor(split.train_paths, cfg.image_size, store, pin_memory=pin, progress=show)
    val_images = decode_to_tensor(split.val_paths, val_size, store, pin_memory=pin, progress=show)
    val_shard = slice(dist.rank, None, dist.world_size)
    common = dict(augmentation=augmentation, mean=mean, std=std, device=device, seed=cfg.seed)
    train = CachedBatches(train_images, torch.tensor(split.train_labels), per_rank_batch, shuffle=True,
                          augment=True, rank=dist.rank, world_size=dist.world_size,
                          drop_last=drop_partial_batch(len(split.train_paths), per_rank_batch, dist), **common)
    val = CachedBatches(val_images[val_shard], torch.tensor(split.val_labels)[val_shard], per_rank_batch,
                        shuffle=False, augment=False, **common)
    return train, val, mode
