"""Knowledge distillation (Hinton et al., 2015): a student learns from a trained teacher's softened outputs.

Loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T)), with the KL
divergence averaged over the batch; T^2 keeps the soft term's gradients on the scale of the hard one. The teacher
is any braintumor checkpoint with the same classes; it runs in eval mode on the student's augmented batch,
resized to the teacher's own input size when the two differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, model_from_checkpoint
from .errors import UserError


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


class Teacher:
    """A frozen trained model that gives logits for the student's batches."""

    def __init__(self, path: str, classes: list[str], device: torch.device):
        ckpt = load_checkpoint(path)
        if list(ckpt["classes"]) != list(classes):
            raise UserError(f"the teacher {path} knows the classes {ckpt['classes']}, but the data has {classes}")
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
