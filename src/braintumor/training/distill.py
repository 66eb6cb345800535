"""Knowledge distillation (Hinton et al., 2015): a student learns from a trained teacher's softened outputs.

Loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T)), with the KL
divergence averaged over the batch; T^2 keeps the soft term's gradients on the scale of the hard one. The teacher
is any braintumor checkpoint with the same classes; it runs in eval mode on the student's augmented batch,
resized to the teacher's own input size when the two differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from braintumor.models.checkpoint import load_checkpoint, model_from_checkpoint
from braintumor.training.config import split_of
from braintumor.errors import UserError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      weight: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The combined loss above; weight 0 is exactly the cross-entropy."""
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


class Teacher:
    """A frozen trained model that gives logits for the student's batches."""

    def __init__(self, path: str, classes: list[str], device: torch.device, *, student_config: dict[str, Any]):
        ckpt = load_checkpoint(path)
        if list(ckpt["classes"]) != list(classes):
            raise UserError(f"the teacher {path} knows the classes {ckpt['classes']}, but the data has {classes}")
        conflict = split_conflict(ckpt.get("config"), student_config)
        if conflict:
            raise UserError(f"the teacher {path} may have seen this run's validation images: {conflict}; "
                            "distil on the teacher's own split (same --split-seed, --val-split and grouping) "
                            "so the validation figures stay honest")
        self.model: nn.Module = model_from_checkpoint(ckpt).to(device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.image_size = int(ckpt["image_size"])
        self.arch = ckpt["arch"]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return self.model(images).float()
