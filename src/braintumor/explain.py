"""Grad-CAM heat maps from the last convolutional block (captum's LayerGradCam), overlays and their files.

Grad-CAM (Selvaraju et al., 2017) weights each channel of the last convolutional block's activations by the mean
gradient of the explained class's score, sums over channels and keeps the positive part. Here the map is upsampled
bilinearly to the model input size, passed through ReLU and min–max normalized per image, so 1 marks the region
that most supports the class and 0 none (a map that is constant everywhere becomes all zeros).

The attribution runs on the classifier's shared model. captum registers its hooks for one call and removes them
afterwards; the model's train/eval mode and its parameters' ``requires_grad`` flags are restored, and
``classifier.lock`` is held for writing throughout (plain predictions wait), so a long-running server can call
this repeatedly.
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

from .atomic import atomic_write
from .errors import UserError
from .model import gradcam_layer
from .predict import describe_source, expand_inputs


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
    """Grad-CAM for one input (returns an Explanation) or a list of inputs (returns a list, same order).

    ``x`` items are paths, bytes or PIL images; ``target`` is a class name, or None to explain each image's
    predicted class. Needs the PyTorch backend.
    """
    if getattr(classifier, "model", None) is None:
        raise UserError("Grad-CAM needs gradients: load the PyTorch checkpoint (.pt), not an ONNX export")
    if target is not None and target not in classifier.classes:
        raise UserError(f"unknown class {target!r} for --class; this model's classes are: "
                        f"{', '.join(classifier.classes)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    single = not isinstance(x, (list, tuple))
    items = [x] if single else list(x)
    results: list[Explanation] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [classifier.load(item) for item in chunk]
        batch = torch.stack([classifier.preprocess(image) for image in images])
        probabilities, heatmaps = _grad_cam(classifier, batch, target)
        size = (classifier.image_size, classifier.image_size)
        for item, image, row, heatmap in zip(chunk, images, probabilities, heatmaps):
            predicted = int(np.argmax(row))
            explained = predicted if target is None else classifier.classes.index(target)
            results.append(Explanation(
                source=describe_source(item), target=classifier.classes[explained],
                predicted=classifier.classes[predicted], probability=float(row[predicted]),
                target_probability=float(row[explained]), heatmap=heatmap,
                image=image.convert("RGB").resize(size, Image.BILINEAR),
            ))
    return results[0] if single else results


def _grad_cam(classifier, batch: torch.Tensor, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (B, C) and normalized heat maps (B, S, S) for one preprocessed batch."""
    model = classifier.model
    with classifier.lock.write():
        # Per module, not model.train(flag): a caller may keep e.g. frozen batch norms in eval inside a
        # training model, and that mix must survive.
        modes = [(module, module.training) for module in model.modules()]
        requires_grad = [p.requires_grad for p in model.parameters()]
        try:
            # Eval mode: dropout off and batch norm on running statistics, so maps do not depend on the batch.
            model.eval()
            # Gradients are needed only with respect to activations: frozen weights keep the graph small,
            # and an input that requires grad keeps the graph alive even when every weight is frozen.
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            with torch.inference_mode(False), torch.enable_grad():
                inputs = batch.to(classifier.device).clone().requires_grad_(True)
                with torch.no_grad():
                    probabilities = torch.softmax(model(inputs).float(), dim=1)
                if target is None:
                    indices = probabilities.argmax(dim=1)
                else:
                    indices = torch.full((len(inputs),), classifier.classes.index(target), device=inputs.device)
                # A tensor of per-sample indices makes captum select output[i, indices[i]] for row i; an
                # int would explain the same class for every image.
                cam = LayerGradCam(model, gradcam_layer(model))
                attributions = cam.attribute(inputs, target=indices, relu_attributions=False)
            maps = LayerAttribution.interpolate(attributions.detach().float(), tuple(inputs.shape[-2:]),
                                                interpolate_mode="bilinear")
            maps = F.relu(maps[:, 0])
        finally:
            for module, training in modes:
                module.training = training
            for parameter, flag in zip(model.parameters(), requires_grad):
                parameter.requires_grad_(flag)
    return probabilities.cpu().numpy(), _normalize(maps).cpu().numpy().astype(np.float32)


def _normalize(maps: torch.Tensor) -> torch.Tensor:
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
    from .figures import gradcam_panel

    files = expand_inputs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        for file, explanation in zip(chunk, explain(classifier, [str(f) for f in chunk], target=target,
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
