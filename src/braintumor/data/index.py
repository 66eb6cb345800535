"""Which files a data folder holds and how they split: discovery, file checks, seeded stratified (grouped) splits.

A data root holds one sub-folder per class (``root/glioma/*.jpg``, ``root/notumor/*.png``, ...). Class names are
the sorted sub-folder names. Hidden entries (names starting with ``.``, e.g. ``.ipynb_checkpoints``, ``.DS_Store``)
are ignored at every level. Images are found recursively inside a class folder (``root/glioma/patient1/a.dcm``
belongs to ``glioma``), so sets that keep one sub-folder per patient or series work unchanged; files are kept when
their extension (any case) is one of :data:`braintumor.data.io.IMAGE_EXTENSIONS`.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from braintumor.data.cache import choose_cache
from braintumor.data.scan import scan_files
from braintumor.data.dedup import DEFAULT_THRESHOLD, group_ids
from braintumor.data.io import IMAGE_EXTENSIONS, unsupported_type_reason
from braintumor.errors import UserError
from braintumor.data.groups import find_groups, merge_groups

MAX_LISTED_BAD_FILES = 10


@dataclass
class ImageFolderIndex:
    """What :func:`discover` found: class names, and one path and label per image (labels index ``classes``)."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _extensions_hint() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _images_in(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive, hidden files and folders skipped), sorted: the one image
    discovery, :func:`braintumor.data.inputs.find_files`."""
    from braintumor.data.inputs import find_files

    return find_files(folder)


def full_suffix(path: Path) -> str:
    """'.nii.gz' for a gzipped NIfTI, else the last extension (lower case)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def unsupported_files(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Files in a data folder that are not read (e.g. .gif, .nii, .nii.gz): reported, never silently skipped."""
    root = Path(root)
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not _is_hidden(d)] if recursive else []
        found += [Path(directory) / name for name in files
                  if not _is_hidden(name) and os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS]
    return sorted(found)


def unsupported_files_warning(root: str | os.PathLike, files: list[Path]) -> str:
    """One line naming how many files are not read and the first few of them."""
    shown = ", ".join(f"'{p.relative_to(root)}'" for p in files[:5]) + (", ..." if len(files) > 5 else "")
    return (f"warning: {len(files)} file(s) in {root} are not images this tool reads and are left out: {shown} "
            f"(supported: {_extensions_hint()})")


def report_unsupported(root: str | os.PathLike) -> list[tuple[str, str]]:
    """Warn (one line on stderr) about files of other types in a data folder; returns (path, reason) for reports."""
    files = unsupported_files(root) if Path(root).is_dir() else []
    if files:
        print(unsupported_files_warning(root, files), file=sys.stderr)
    return [(str(p), unsupported_type_reason(full_suffix(p))) for p in files]


def discover(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolderIndex:
    """Index a folder with one sub-folder per class.

    Without ``classes`` the class names are the sorted sub-folder names and at least two are required. With
    ``classes`` (e.g. a checkpoint's class list) the folder's sub-folders must be a subset of it and labels are
    indices into it; an evaluation folder may lack some classes. Raises UserError for a missing root, a path that
    is not a directory, too few classes, unknown classes, or a class folder without images.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a directory: {root}")
    folder_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))

    if classes is None:
        if len(folder_names) < 2:
            found = f"{len(folder_names)}" + (f": {', '.join(folder_names)}" if folder_names else "")
            raise UserError(f"need at least 2 class folders in {root}, found {found}")
        class_names = folder_names
    else:
        class_names = list(classes)
        unknown = [name for name in folder_names if name not in class_names]
        if unknown:
            raise UserError(
                f"class folders in {root} are not among the model's classes: {', '.join(unknown)} "
                f"(known: {', '.join(class_names)})"
            )
        if not folder_names:
            raise UserError(f"no class folders in {root}: expected sub-folders named {', '.join(class_names)}")

    paths: list[Path] = []
    labels: list[int] = []
    for name in folder_names:
        images = _images_in(root / name)
        if not images:
            raise UserError(f"class folder '{name}' in {root} has no images ({_extensions_hint()})")
        paths.extend(images)
        labels.extend([class_names.index(name)] * len(images))
    return ImageFolderIndex(root=root, classes=class_names, paths=paths, labels=labels)


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; half-up is easier to predict from the docs.
    return int(math.floor(x + 0.5))


def _val_target(n: int, val_fraction: float) -> int:
    """Validation count for a class of n items: round(n*f), at least 1 in val and 1 in train when n >= 2."""
    if n < 2:
        return 0
    return min(max(_round_half_up(n * val_fraction), 1), n - 1)


def stratified_split(
    labels: Sequence[int],
    val_fraction: float,
    seed: int,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[int], list[int]]:
    """Seeded split into (train_idx, val_idx), both sorted, stratified by class.

    Each class with n >= 2 samples sends round(n * val_fraction) of them (at least 1, at most n - 1) to validation;
    a class with a single sample stays in training. With ``groups`` (one hashable per sample, e.g. duplicate-group
    ids) all members of a group land on the same side: a group counts for its majority label (ties: lowest label),
    and per class the shuffled groups are added to validation while that moves the class's validation image count
    closer to its target; a class with at least two groups keeps at least one group on each side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = [int(label) for label in labels]
    rng = np.random.default_rng(seed)

    if groups is None:
        val: list[int] = []
        for label in sorted(set(labels)):
            members = [i for i, y in enumerate(labels) if y == label]
            shuffled = rng.permutation(members)
            val.extend(int(i) for i in shuffled[: _val_target(len(members), val_fraction)])
        val_set = set(val)
        return [i for i in range(len(labels)) if i not in val_set], sorted(val_set)

    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries but labels has {len(labels)}")
    members_of: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):  # dicts keep first-appearance order: deterministic for any hashable keys
        members_of.setdefault(group, []).append(i)
    group_label = {}
    for group, members in members_of.items():
        counts = Counter(labels[i] for i in members)
        group_label[group] = min(counts, key=lambda y: (-counts[y], y))

    val_set: set[int] = set()
    for label in sorted(set(group_label.values())):
        class_groups = [g for g in members_of if group_label[g] == label]
        n_images = sum(len(members_of[g]) for g in class_groups)
        target = _val_target(n_images, val_fraction)
        order = [class_groups[k] for k in rng.permutation(len(class_groups))]
        chosen: list[Hashable] = []
        count = 0
        for group in order:
            if len(class_groups) - len(chosen) <= 1 or count >= target:
                break
            size = len(members_of[group])
            if abs(count + size - target) < abs(count - target):
                chosen.append(group)
                count += size
        if not chosen and len(class_groups) >= 2 and target > 0:
            # Every group overshoots the target: take the smallest so that the class is still validated.
            chosen.append(min(order, key=lambda g: len(members_of[g])))
        for group in chosen:
            val_set.update(members_of[group])
    return [i for i in range(len(labels)) if i not in val_set], sorted(val_set)




@dataclass(frozen=True)
class SplitSettings:
    """What :func:`prepare_split` needs to know of a run: the folders, the split (fraction, seed, grouping) and
    how files are checked and cached. Built by ``TrainConfig.split_settings()`` (the data layer never reads the
    training configuration; ``split_seed`` is already resolved, --split-seed else --seed)."""

    data: str
    val: str | None = None
    val_split: float = 0.15
    split_seed: int = 0
    group_split: bool = True
    groups: str | None = None
    skip_bad: bool = False
    data_cache: str = "none"
    image_size: int = 224
    inference_image_size: int = 224


def split_settings_of(settings) -> SplitSettings:
    """``settings`` itself, or what an object offering ``split_settings()`` (a ``TrainConfig``) builds."""
    if isinstance(settings, SplitSettings):
        return settings
    if hasattr(settings, "split_settings"):
        return settings.split_settings()
    raise TypeError(f"prepare_split needs SplitSettings, not {type(settings).__name__}")


@dataclass
class SplitData:
    """Which files train and which validate, with the class list and any skipped bad files.

    ``cache_mode`` is where batches come from (:func:`braintumor.data.cache.choose_cache`); when the scan kept the
    images decoded, ``train_images`` (at the training size) and ``val_images`` (at the inference size) hold them
    as uint8 (N, 3, S, S), in the order of the paths.
    """

    classes: list[str]
    train_paths: list[Path]
    train_labels: list[int]
    val_paths: list[Path]
    val_labels: list[int]
    val_source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicate_groups_split: bool = False
    cache_mode: str = "none"
    train_images: torch.Tensor | None = None
    val_images: torch.Tensor | None = None


def keep_readable(paths: Sequence[Path], errors: Sequence[str | None], root: str | os.PathLike, skip_bad: bool,
                  ) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of the readable files and (path, reason) of the others; without ``skip_bad`` any bad file stops
    the run with one message listing them."""
    bad = [(str(path), reason) for path, reason in zip(paths, errors) if reason is not None]
    if bad and not skip_bad:
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:MAX_LISTED_BAD_FILES])
        more = f"; and {len(bad) - MAX_LISTED_BAD_FILES} more" if len(bad) > MAX_LISTED_BAD_FILES else ""
        raise UserError(f"{len(bad)} unreadable image(s) in {root}: {listed}{more}. Fix or remove them, "
                        "or rerun with --skip-bad to skip them (they are then listed in the run's report)")
    return [i for i, reason in enumerate(errors) if reason is None], bad


def drop_bad_files(paths: list[Path], labels: list[int], root: str, skip_bad: bool, progress: bool,
                   ) -> tuple[list[Path], list[int], list[tuple[str, str]]]:
    """Decode every file once; stop with one message listing bad files, or drop them with ``skip_bad``."""
    kept, bad = keep_readable(paths, scan_files(paths, progress=progress).errors, root, skip_bad)
    return [paths[i] for i in kept], [labels[i] for i in kept], bad


def _grouped_split(cfg: SplitSettings, paths: list[Path], labels: list[int], records: list[dict] | None,
                   ) -> tuple[list[int], list[int], str, bool]:
    """(train indices, val indices, a phrase naming the split, whether groups were kept together)."""
    patients, patient_source = find_groups(paths, cfg.data, cfg.groups)
    groups = None
    if cfg.group_split:
        groups = merge_groups(patients, group_ids(records, DEFAULT_THRESHOLD).tolist())
        largest = max(Counter(groups).values())
        if largest > max(20, len(paths) // 10):
            # Transitive near-duplicate chains can swallow distinct images (e.g. tiny, very uniform images);
            # the split stays leak-free but cannot stratify well. Say so rather than fail.
            print(f"warning: {largest} of {len(paths)} images fall into one duplicate group, so the validation "
                  "split cannot be stratified well; if they are distinct images, use --no-group-split",
                  file=sys.stderr)
    elif patient_source:
        groups = merge_groups(patients)
    split_seed = cfg.split_seed
    train_idx, val_idx = stratified_split(labels, cfg.val_split, split_seed, groups=groups)
    kept = [what for what, on in ((f"groups from {patient_source}", patient_source),
                                  ("duplicates", cfg.group_split)) if on]
    source = (f"{cfg.val_split:.0%} stratified split of {cfg.data} (seed {split_seed}"
              f"{', ' + ' and '.join(kept) + ' kept on one side' if kept else ''})")
    return train_idx, val_idx, source, groups is not None


def prepare_split(settings: SplitSettings, progress: bool, *, device: torch.device | None = None,
                  keep_images: bool = False) -> SplitData:
    """Discover the data, check every file, and split (grouping duplicates) unless --val is given.

    With a ``device`` the data cache is chosen for it (``cache_mode``); with ``keep_images`` too, a cached run
    keeps the images the check decoded, so each file is decoded once (see :mod:`braintumor.data.scan`).
    ``settings`` may also be an object with a ``split_settings()`` method (a ``TrainConfig``).
    """
    cfg = split_settings_of(settings)
    index = discover(cfg.data)
    val_index = discover(cfg.val, classes=index.classes) if cfg.val else None
    n_images = len(index.paths) + (len(val_index.paths) if val_index else 0)
    mode = "none" if device is None else choose_cache(cfg.data_cache, n_images, cfg.image_size, device)
    sizes = (cfg.image_size, cfg.inference_image_size) if keep_images and mode != "none" else ()
    scan = scan_files(index.paths, hashes=cfg.group_split and not cfg.val, sizes=sizes, progress=progress)
    kept, skipped = keep_readable(index.paths, scan.errors, cfg.data, cfg.skip_bad)
    skipped += report_unsupported(cfg.data)
    paths, labels = [index.paths[i] for i in kept], [index.labels[i] for i in kept]
    if val_index is not None:
        val_scan = scan_files(val_index.paths, sizes=sizes[1:], progress=progress)
        val_kept, val_skipped = keep_readable(val_index.paths, val_scan.errors, cfg.val, cfg.skip_bad)
        split = SplitData(index.classes, paths, labels, [val_index.paths[i] for i in val_kept],
                          [val_index.labels[i] for i in val_kept], f"folder {cfg.val}",
                          skipped + val_skipped + report_unsupported(cfg.val), cache_mode=mode)
        train_rows, val_rows = kept, val_kept
    else:
        records = None if scan.records is None else [scan.records[i] for i in kept]
        train_idx, val_idx, source, grouped = _grouped_split(cfg, paths, labels, records)
        split = SplitData(index.classes, [paths[i] for i in train_idx], [labels[i] for i in train_idx],
                          [paths[i] for i in val_idx], [labels[i] for i in val_idx], source, skipped,
                          duplicate_groups_split=grouped, cache_mode=mode)
        train_rows, val_rows, val_scan = [kept[i] for i in train_idx], [kept[i] for i in val_idx], scan
    if sizes:
        split.train_images = scan.keep(train_rows, cfg.image_size)
        split.val_images = val_scan.keep(val_rows, cfg.inference_image_size)
    return split
