"""Build a torchvision ResNet with the project's classification head, and load its weights."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from braintumor.choices import ARCHS
from braintumor.errors import UserError

# torchvision's best ImageNet weights for each architecture (V2 where torchvision has them).
_IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    "resnet152": "ResNet152_Weights.IMAGENET1K_V2",
}

HEAD_HIDDEN = 512
HEAD_DROPOUT = 0.5


def classification_head(in_features: int, num_classes: int, dropout: float = HEAD_DROPOUT) -> nn.Sequential:
    """The reference recipe's head: Linear(in→512) → ReLU → Dropout(0.5) → Linear(512→classes)."""
    return nn.Sequential(
        nn.Linear(in_features, HEAD_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(HEAD_HIDDEN, num_classes),
    )


def build_model(arch: str = "resnet152", num_classes: int = 4, weights: str | os.PathLike = "none", *,
                norm_layer: Callable[[int], nn.Module] | None = None, head_dropout: float = HEAD_DROPOUT) -> nn.Module:
    """A ResNet whose ``fc`` is the project's head; ``weights`` is "imagenet", "none" or a state-dict path.

    ImageNet or file weights are loaded into the backbone before the head is replaced, so only the head
    starts from random initialisation. ``norm_layer`` replaces BatchNorm (e.g. ``lambda c: nn.GroupNorm(8, c)``,
    whose output does not depend on how a batch is split across processes); ``head_dropout`` sets the head's
    dropout. Both are for experiments through :func:`braintumor.training.trainer.train`'s ``model_factory``; checkpoints
    record only the architecture's name, so such models are loaded back by the same factory, not by name.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    if num_classes < 2:
        raise UserError(f"need at least 2 classes, got {num_classes}")
    model = getattr(models, arch)(weights=None, **({"norm_layer": norm_layer} if norm_layer else {}))
    weights = str(weights)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
    elif weights != "none":
        _load_backbone_file(model, Path(weights))
    model.fc = classification_head(model.fc.in_features, num_classes, head_dropout)
    return model


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block, where Grad-CAM reads activations."""
    return model.layer4


def torch_load_problem(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words for a one-line error.

    Never torch's own advice to retry with ``weights_only=False``: that would run code from the file."""
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        return ("it holds Python objects other than tensors and plain data, and braintumor will not unpickle it "
                "(not a braintumor checkpoint or state dict)")
    first_line = text.splitlines()[0] if text else type(err).__name__
    # e.g. "101" (a magic-number mismatch inside torch), IndexError/KeyError from the unpickler on text
    if (isinstance(err, (pickle.UnpicklingError, KeyError, IndexError, TypeError, EOFError)) or first_line.isdigit()
            or "weights_only" in text):
        return "not a PyTorch checkpoint file"
    return first_line


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's own mechanism (TORCH_HOME cache, else download)."""
    weights = models.get_weight(_IMAGENET_WEIGHTS[arch])
    file_name = os.path.basename(weights.url)
    checkpoint_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, HTTPError, OSError, hash mismatch: all mean "not available here"
        raise UserError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({type(err).__name__}): "
            f"put {file_name} (from {weights.url}) into {checkpoint_dir}/, or use --weights none or --weights PATH"
        ) from err


def _load_backbone_file(model: nn.Module, path: Path) -> None:
    """Load a torchvision-format state dict (its ``fc`` is ignored when its shape differs)."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path} (use --weights imagenet, none, or a state-dict path)")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes: noise on top of the one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's loader fails on foreign bytes in many ways
        raise UserError(f"cannot read weights file {path}: {torch_load_problem(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a braintumor checkpoint: take its weights
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        names = ", ".join((missing + unexpected)[:4])
        raise UserError(
            f"weights file {path} does not match {type(model).__name__}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected keys (e.g. {names}); check --arch"
        )
