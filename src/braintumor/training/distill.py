"""Knowledge distillation (Hinton et al., 2015): a student learns from a trained teacher's softened outputs.

Loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T)), with the KL
divergence averaged over the batch; T^2 keeps the soft term's gradients on the scale of the hard one. The teacher
is any braintumor checkpoint with the same classes; it runs in eval mode on the student's augmented batch, so both
see the same flips, rotations and mixing. A teacher whose input is larger than the student's sees that batch at its
own size: the training images are decoded and augmented there and the student's copy is resized down
(:func:`training_source_size`), because a batch resized *up* is a blurred slice (a 192 px model trained here loses
4 points of validation accuracy on 128 px slices upsampled to 192). A smaller teacher gets the batch resized down.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from braintumor.data.transforms import resize_batch
from braintumor.models.checkpoint import load_checkpoint, model_from_checkpoint
from braintumor.training.config import split_of
from braintumor.errors import UserError

log = logging.getLogger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      weight: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The combined loss above; weight 0 is exactly the cross-entropy. ``labels``: class indices (B,), or class
    shares (B, classes) of a CutMix / MixUp batch."""
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if weight == 0:
        return hard
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction="batchmean") * temperature**2
    return (1.0 - weight) * hard + weight * soft


def split_conflict(teacher_config: dict[str, Any] | None, student_config: dict[str, Any]) -> str | None:
    """Why a teacher may have trained on the student's validation images, or None when its recorded training
    run rules that out (or records nothing to compare: another folder, or no provenance).

    Both are run configs (``TrainConfig.to_dict()`` or a checkpoint's ``config``). A teacher that saw the
    student's validation slices makes the student's validation figures (and the choice of best.pt) optimistic,
    so this is refused rather than warned about.
    """
    if not teacher_config or not teacher_config.get("data"):
        return None
    data, val = student_config["data"], student_config.get("val")
    taught_on = Path(teacher_config["data"]).resolve()
    if val is not None:
        same = taught_on == Path(val).resolve()
        return f"it was trained on {teacher_config['data']}, this run's validation folder" if same else None
    if taught_on != Path(data).resolve():
        return None
    if teacher_config.get("val"):
        return f"it was trained on all of {data} (it validated on {teacher_config['val']})"
    theirs, ours = split_of(teacher_config), split_of(student_config)
    differ = [f"--{key.replace('_', '-')} {theirs[key]} there, {ours[key]} here" for key in theirs
              if theirs[key] != ours[key]]
    return f"it was trained on another split of {data} ({'; '.join(differ)})" if differ else None


def teacher_training_paths(teacher_config: dict[str, Any]) -> list[Path] | None:
    """The files the teacher's recorded run trained on, rebuilt from its data folder and split settings, or
    None when that folder is not here (nothing to compare)."""
    from braintumor.data.index import prepare_split
    from braintumor.training.config import from_saved

    if not teacher_config or not teacher_config.get("data") or not Path(teacher_config["data"]).is_dir():
        return None
    if teacher_config.get("val"):  # it validated on another folder: it trained on all of this one
        from braintumor.data.index import discover

        return list(discover(teacher_config["data"]).paths)
    try:
        taught = from_saved(teacher_config, "the teacher's config", skip_bad=True, progress=False)
        return list(prepare_split(taught.split_settings(), False).train_paths)
    except (UserError, TypeError, ValueError):  # a groups file gone, settings of another version: cannot rebuild
        return None


def content_conflict(teacher_config: dict[str, Any] | None, student_config: dict[str, Any],
                     student_val_paths: list[Path]) -> str | None:
    """Why the teacher saw this run's validation images, judged by content: how many of them have the pixels
    (exact hash, braintumor.data.dedup) of an image the teacher's recorded run trained on. None when none do,
    or when the teacher's data folder is not here. For a teacher trained on this very folder
    :func:`split_conflict` decides from the split settings, without hashing."""
    from braintumor.data.dedup import hash_files

    if not teacher_config or not teacher_config.get("data") or not student_val_paths:
        return None
    same_folder = Path(teacher_config["data"]).resolve() == Path(student_config["data"]).resolve()
    if same_folder and not student_config.get("val"):
        return None
    log.info(f"checking this run's validation images against the teacher's training images in "
             f"{teacher_config['data']} (by content; hashes are cached)")
    taught_on = teacher_training_paths(teacher_config)
    if not taught_on:
        return None
    seen = {record.get("exact") for record in hash_files(taught_on)[0]} - {None}
    ours = hash_files(student_val_paths)[0]
    shared = [str(path) for path, record in zip(student_val_paths, ours) if record.get("exact") in seen]
    if not shared:
        return None
    return (f"{len(shared)} of this run's {len(student_val_paths)} validation images (e.g. {shared[0]}) have the "
            f"pixels of images it trained on in {teacher_config['data']}")


def check_teacher(path: str, student_config: dict[str, Any], student_val_paths: list[Path], *,
                  ckpt: dict[str, Any] | None = None) -> None:
    """UserError when the teacher checkpoint at ``path`` (``ckpt``: the one already loaded from it) trained on any
    of this run's validation images, by its recorded split settings (:func:`split_conflict`) or by content
    (:func:`content_conflict`)."""
    teacher_config = (ckpt if ckpt is not None else load_checkpoint(path)).get("config")
    conflict = (split_conflict(teacher_config, student_config)
                or content_conflict(teacher_config, student_config, student_val_paths))
    if conflict:
        raise seen_validation_error(path, conflict)


def seen_validation_error(path: str, conflict: str) -> UserError:
    """The one-line refusal of a teacher that may have trained on this run's validation images."""
    return UserError(f"the teacher {path} may have seen this run's validation images: {conflict}; distil on the "
                     "teacher's own split (same --split-seed, --val-split and grouping) so the validation figures "
                     "stay honest")


def training_source_size(student_size: int, teacher_size: int | None) -> int:
    """The size training images are decoded and augmented at: the student's, or a larger teacher's."""
    return max(int(student_size), int(teacher_size or 0))


class Teacher:
    """A frozen trained model that gives logits for the student's batches."""

    def __init__(self, path: str, classes: list[str], device: torch.device, *, student_config: dict[str, Any],
                 ckpt: dict[str, Any] | None = None):
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)  # ckpt: the one already loaded from ``path``
        if list(ckpt["classes"]) != list(classes):
            raise UserError(f"the teacher {path} knows the classes {ckpt['classes']}, but the data has {classes}")
        conflict = split_conflict(ckpt.get("config"), student_config)
        if conflict:  # check_teacher also compares content; this cheap check stays for direct users
            raise seen_validation_error(path, conflict)
        self.model: nn.Module = model_from_checkpoint(ckpt).to(device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.image_size = int(ckpt["image_size"])
        self.arch = ckpt["arch"]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a normalized batch, resized to the teacher's input size when it has another."""
        return self.model(resize_batch(images, self.image_size)).float()
