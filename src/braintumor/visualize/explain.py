"""Grad-CAM heat maps (captum's LayerGradCam) as a pure function of (model, layer, batch), and their files.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional block's activations by the mean
gradient of the explained class's score, sums over channels and keeps the positive part. Here the map is upsampled
bilinearly to the model input size, passed through ReLU and min–max normalized per image, so 1 marks the region
that most supports the class and 0 none (a map that is constant everywhere becomes all zeros).

:func:`grad_cam` touches nothing but the model it is given: captum registers its hooks for one call and removes
them afterwards, and the model's train/eval mode and its parameters' ``requires_grad`` flags are restored. Reading
files and locking a shared model belong to the caller (``Classifier.explain`` holds its lock for writing, so
plain predictions wait), so a long-running server can call it repeatedly.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam
from PIL import Image
from torch import nn

from braintumor.utils.atomic import atomic_write
from braintumor.data.inputs import expand_inputs


@dataclass
class Explanation:
    """One image's Grad-CAM: the explained class, the prediction, and a heat map at the model input size."""

    source: str
    target: str
    predicted: str
    probability: float
    target_probability: float
    heatmap: np.ndarray
    image: Image.Image

    @classmethod
    def of(cls, source: str, classes: Sequence[str], probabilities: np.ndarray, heatmap: np.ndarray,
           image: Image.Image, target: int | None = None) -> "Explanation":
        """The explanation of one row of ``grad_cam``'s output (``target`` None: the predicted class)."""
        predicted = int(np.argmax(probabilities))
        explained = predicted if target is None else int(target)
        return cls(source=source, target=classes[explained], predicted=classes[predicted],
                   probability=float(probabilities[predicted]), target_probability=float(probabilities[explained]),
                   heatmap=heatmap, image=image)

    def overlay(self, alpha: float = 0.45, colormap: str = "jet") -> Image.Image:
        """The heat map in a matplotlib colour map blended over the grayscale slice (RGB, S x S)."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        size = self.heatmap.shape[::-1]
        gray = np.asarray(self.image.convert("L").resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
        colours = matplotlib.colormaps[colormap](self.heatmap)[..., :3].astype(np.float32)
        blended = (1.0 - alpha) * gray[..., None] + alpha * colours
        return Image.fromarray(np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8), mode="RGB")

    def caption(self) -> str:
        """One line naming the prediction and the class the map explains."""
        return f"predicted: {self.predicted} (p={self.probability:.2f}) · Grad-CAM for: {self.target}"


def explain(classifier, x, target: str | None = None, batch_size: int = 16):
    """Grad-CAM for one input or a list of inputs through a Classifier (see ``Classifier.explain``)."""
    return classifier.explain(x, target=target, batch_size=batch_size)


def find_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """The submodule named ``layer`` (dotted, e.g. ``"layer4"``); a clear error when the model has none."""
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(f"the model has no layer {layer!r} for Grad-CAM; its top-level layers are: "
                         f"{', '.join(names)}") from None


def grad_cam(model: nn.Module, layer: str | nn.Module, batch: torch.Tensor,
             targets: Sequence[int] | torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (B, C) and normalized Grad-CAM maps (B, H, W) at ``layer`` for a preprocessed batch
    (on the model's device); ``targets`` holds each image's class index (None: its predicted class).

    The model runs in eval mode (dropout off, batch norm on running statistics: a map does not depend on the
    rest of the batch); its modes, ``requires_grad`` flags and hooks are as before when this returns.
    """
    target_layer = find_layer(model, layer)
    # Per module, not model.train(flag): a caller may keep e.g. frozen batch norms in eval inside a
    # training model, and that mix must survive.
    modes = [(module, module.training) for module in model.modules()]
    requires_grad = [p.requires_grad for p in model.parameters()]
    try:
        model.eval()
        # Gradients are needed only with respect to activations: frozen weights keep the graph small,
        # and an input that requires grad keeps the graph alive even when every weight is frozen.
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            inputs = batch.clone().requires_grad_(True)
            with torch.no_grad():
                probabilities = torch.softmax(model(inputs).float(), dim=1)
            indices = (probabilities.argmax(dim=1) if targets is None
                       else torch.as_tensor(targets, dtype=torch.long, device=inputs.device))
            # A tensor of per-sample indices makes captum select output[i, indices[i]] for row i; an
            # int would explain the same class for every image.
            attributions = LayerGradCam(model, target_layer).attribute(inputs, target=indices,
                                                                        relu_attributions=False)
        maps = LayerAttribution.interpolate(attributions.detach().float(), tuple(inputs.shape[-2:]),
                                            interpolate_mode="bilinear")
        maps = F.relu(maps[:, 0])
    finally:
        for module, training in modes:
            module.training = training
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    return probabilities.cpu().numpy(), normalize_maps(maps).cpu().numpy().astype(np.float32)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min–max scaling to [0, 1]; a constant map (no evidence anywhere) becomes zeros."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    span = high - low
    scaled = (maps - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(maps))


def write_explanations(classifier, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                       target: str | None = None, batch_size: int = 16) -> list[Path]:
    """Write one Grad-CAM panel PNG per image (folders are expanded) and return the written paths.

    Each panel is the slice beside its overlay with a colour bar and a caption (``figures.gradcam_panel``, always
    the same size). Files are named ``<stem>_gradcam_<class>.png`` after the explained class, so a rerun
    replaces its own files instead of leaving stale ones beside them.
    """
    from braintumor.visualize.figures import gradcam_panel

    files = expand_inputs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        for file, explanation in zip(chunk, classifier.explain([str(f) for f in chunk], target=target,
                                                               batch_size=batch_size)):
            name = _unique_name(f"{_safe(file.stem)}_gradcam_{_safe(explanation.target)}", taken)
            buffer = io.BytesIO()
            gradcam_panel(explanation).save(buffer, format="PNG")
            written.append(atomic_write(out_dir / name, lambda handle: handle.write(buffer.getvalue())))
    return written


def _safe(name: str) -> str:
    """A file-name-safe version of a class name or stem."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def _unique_name(stem: str, taken: set[str]) -> str:
    """``stem.png``, or ``stem-2.png``, ... when two inputs (from different folders) share a stem."""
    name, counter = f"{stem}.png", 1
    while name in taken:
        counter += 1
        name = f"{stem}-{counter}.png"
    taken.add(name)
    return name
