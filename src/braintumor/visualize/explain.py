"""Explanation maps of a classifier's decision, one function for every method: :func:`explain_batch`.

Methods (``METHODS``), each giving one map per image at the model input size, positive part, min–max normalized
per image (1 marks the region that most supports the explained class, 0 none; a constant map becomes all zeros):

- ``gradcam`` (Selvaraju et al., 2017): a block's activations weighted per channel by the spatial mean of the
  class score's gradient, summed over channels.
- ``gradcampp`` (Grad-CAM++, Chattopadhay et al., 2018): channel weights from positive gradients with the
  closed-form second/third-order coefficients (the exponential-score form, as in pytorch-grad-cam).
- ``hirescam`` (Draelos & Carin, 2020): gradient times activation element-wise, summed over channels (no spatial
  averaging of the gradient, so the map is faithful to the score).
- ``layercam`` (Jiang et al., 2021): positive gradient times activation element-wise.
- ``occlusion`` (Zeiler & Fergus, 2014; captum ``Occlusion``): the drop of the class score (logit) when a square
  patch of side 3/16 of the input (24 px at 128 px; half-side stride) is replaced by black.
- ``integrated-gradients`` (Sundararajan et al., 2017; captum ``IntegratedGradients``): path integral of the
  gradient from a black image, 16 steps (Gauss–Legendre), summed over colour channels, positive part, smoothed by
  a Gaussian of sigma 1/64 of the side so that the maximum marks a region, not one noisy pixel.

The CAM methods share one computation (:func:`cam_maps`: captum's ``LayerGradientXActivation`` hooks the
layers and returns the class score's gradient there; the four methods differ only in how they combine gradient
and activation), so several methods and layers cost one backward pass. They read the block named by ``layer``
(dotted, e.g. ``"layer3"``; default ``DEFAULT_LAYERS[method]``) and upsample bilinearly. "Black" is each image's
per-channel minimum, the background of an MRI slice. The class score is the logit (a softmax near 1 barely moves
when evidence is removed). ``DEFAULT_METHOD`` was chosen by ``benchmarks/localization.py`` (docs/localization.md).

Mirror averaging (``mirror=True``, the default ``DEFAULT_MIRROR`` on every surface): each map is the mean of the
image's map and its left-right mirror's map flipped back, each min–max normalized first, for the same explained
class. The models train with random flips, so both views are inputs they know; a map that holds in only one of
them is the view's artefact (a CAM's coarse grid and its left-right asymmetry), not the slice's evidence. It costs
a second pass of the method. On the 600 box slices it raised Grad-CAM++ at layer3's pointing game from 45.7 % to
53.0 % on the shipped model and from 53.2 % to 59.0 % on a 192 px model (docs/localization.md); ``mirror=False``
gives the single-view map of the literature.

:func:`explain_batch` touches nothing but the model it is given: captum registers its hooks for one call and
removes them afterwards, and the model's train/eval mode and its parameters' ``requires_grad`` flags are
restored. Reading files and locking a shared model belong to the caller (``Classifier.explain`` holds its lock for
writing, so plain predictions wait), so a long-running server can call it repeatedly.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradientXActivation, Occlusion
from PIL import Image
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from braintumor.utils.atomic import atomic_write
from braintumor.data.inputs import expand_inputs

CAM_METHODS = ("gradcam", "gradcampp", "hirescam", "layercam")
METHODS = CAM_METHODS + ("occlusion", "integrated-gradients")
# Chosen by the localisation benchmark on the shipped model (docs/localization.md): Grad-CAM++ at layer3 has the
# highest pointing game of the CAM family and layers (45.7 % of 600 box slices, centre baseline 32.2 %), at the
# cost of one backward pass; Grad-CAM keeps its classic last block.
DEFAULT_METHOD = "gradcampp"
DEFAULT_LAYERS = {"gradcam": "layer4", "gradcampp": "layer3", "hirescam": "layer3", "layercam": "layer3"}
DEFAULT_LAYER = DEFAULT_LAYERS[DEFAULT_METHOD]
DEFAULT_MIRROR = True  # average each map with its mirror view's (see the module docstring); chosen by the benchmark
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "hirescam": "HiResCAM", "layercam": "LayerCAM",
                 "occlusion": "Occlusion", "integrated-gradients": "Integrated gradients"}

OCCLUSION_WINDOW = 3 / 16  # patch side as a share of the input side (24 px at 128 px)
IG_STEPS = 16
IG_SMOOTHING = 1 / 64  # Gaussian sigma as a share of the input side


@dataclass
class Explanation:
    """One image's explanation: the explained class, the prediction, the method (with its block ``layer`` for the
    CAM methods, None otherwise, and whether the map is averaged with the mirror view's) and its map at the model
    input size."""

    source: str
    target: str
    predicted: str
    probability: float
    target_probability: float
    heatmap: np.ndarray
    image: Image.Image
    method: str = DEFAULT_METHOD
    mirror: bool = DEFAULT_MIRROR
    layer: str | None = None

    @classmethod
    def of(cls, source: str, classes: Sequence[str], probabilities: np.ndarray, heatmap: np.ndarray,
           image: Image.Image, target: int | None = None, method: str = DEFAULT_METHOD,
           mirror: bool = DEFAULT_MIRROR, layer: str | None = None) -> "Explanation":
        """The explanation of one row of ``explain_batch``'s output (``target`` None: the predicted class)."""
        predicted = int(np.argmax(probabilities))
        explained = predicted if target is None else int(target)
        return cls(source=source, target=classes[explained], predicted=classes[predicted],
                   probability=float(probabilities[predicted]), target_probability=float(probabilities[explained]),
                   heatmap=heatmap, image=image, method=method, mirror=bool(mirror), layer=layer)

    @property
    def method_label(self) -> str:
        """The method's display name (e.g. "Grad-CAM")."""
        return METHOD_LABELS.get(self.method, self.method)

    @property
    def setting(self) -> str:
        """How the map was made, for captions: e.g. "Grad-CAM++ at layer3, averaged with the mirrored slice's map"."""
        where = f" at {self.layer}" if self.layer else ""
        return f"{self.method_label}{where}, " + ("averaged with the mirrored slice's map" if self.mirror
                                                  else "single view (not mirror-averaged)")

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
        return f"predicted: {self.predicted} (p={self.probability:.2f}) · {self.method_label} for: {self.target}"


def explain(classifier, x, target: str | None = None, batch_size: int = 16, **options):
    """Explanations of one input or a list of inputs through a Classifier (see ``Classifier.explain``);
    ``options`` (``method=``, ``layer=``, ``mirror=``) are passed on when given."""
    return classifier.explain(x, target=target, batch_size=batch_size, **options)


def find_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """The submodule named ``layer`` (dotted, e.g. ``"layer4"``); a clear error when the model has none."""
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(f"the model has no layer {layer!r} for a CAM explanation; its top-level layers are: "
                         f"{', '.join(names)}") from None


def check_method(method: str, layer: str | nn.Module | None = None) -> str:
    """``method`` if it is one of METHODS; a ValueError naming the choices otherwise, or when ``layer`` is given
    to a method that reads no layer."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of: {', '.join(METHODS)}")
    if layer is not None and method not in CAM_METHODS:
        raise ValueError(f"--layer applies to the CAM methods ({', '.join(CAM_METHODS)}), not to {method!r}")
    return method


def layer_of(method: str, layer: str | nn.Module | None = None) -> str | nn.Module | None:
    """The block ``method`` reads: ``layer`` when given, else the method's default (None for a method without
    layers: occlusion, integrated gradients)."""
    return layer if layer is not None else DEFAULT_LAYERS.get(method)


def explain_batch(model: nn.Module, batch: torch.Tensor, method: str = DEFAULT_METHOD,
                  layer: str | nn.Module | None = None,
                  targets: Sequence[int] | torch.Tensor | None = None,
                  mirror: bool = DEFAULT_MIRROR) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (B, C) and explanation maps (B, S, S) float32 in [0, 1] of a preprocessed batch
    (B, 3, S, S) on the model's device; ``targets`` holds each image's class index (None: its predicted class).

    ``method`` is one of METHODS; ``layer`` names the block a CAM method reads (None: DEFAULT_LAYERS[method]);
    ``mirror`` averages each map with its mirror view's (module docstring). The probabilities are the batch's own
    (not the mirror's). The model runs in eval mode (a map does not depend on the rest of the batch); its modes,
    ``requires_grad`` flags and hooks are as before when this returns.
    """
    check_method(method, layer)
    if method in CAM_METHODS:
        probabilities, maps = explain_cam_batch(model, batch, [method],
                                                [layer_of(method, layer)], targets, mirror=mirror)
        return probabilities, maps[method, 0]
    with _explaining(model), torch.inference_mode(False), torch.enable_grad():
        probabilities, inputs, indices = _prepare(model, batch, targets, requires_grad=False)
        maps = _ATTRIBUTORS[method](model, inputs, indices)
        mirrored = _ATTRIBUTORS[method](model, _mirror_view(inputs), indices).flip(-1) if mirror else None
    return probabilities, _combined(maps, mirrored)


def explain_cam_batch(model: nn.Module, batch: torch.Tensor, methods: Sequence[str] = CAM_METHODS,
                      layers: Sequence[str | nn.Module] = (DEFAULT_LAYER,),
                      targets: Sequence[int] | torch.Tensor | None = None, mirror: bool = DEFAULT_MIRROR
                      ) -> tuple[np.ndarray, dict[tuple[str, int], np.ndarray]]:
    """Several CAM methods at several layers from one backward pass per view (what ``explain_batch`` gives for
    each): probabilities (B, C) and {(method, position of the layer in ``layers``): maps (B, S, S) in [0, 1]}."""
    for method in methods:
        if method not in CAM_METHODS:
            raise ValueError(f"{method!r} is not a CAM method; choose from: {', '.join(CAM_METHODS)}")
    modules = [find_layer(model, layer) for layer in layers]
    with _explaining(model), torch.inference_mode(False), torch.enable_grad():
        # An input that requires grad keeps the graph to a layer alive even when every weight is frozen.
        probabilities, inputs, indices = _prepare(model, batch, targets, requires_grad=True)
        maps = cam_maps(model, inputs, indices, modules, methods)
        mirrored = ({key: value.flip(-1) for key, value in
                     cam_maps(model, _mirror_view(inputs), indices, modules, methods).items()} if mirror else {})
    return probabilities, {key: _combined(value, mirrored.get(key)) for key, value in maps.items()}


def _prepare(model, batch, targets, requires_grad):
    """Probabilities, a fresh input tensor and the per-image class indices to explain."""
    inputs = batch.clone().requires_grad_(requires_grad)
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs).float(), dim=1)
    # A tensor of per-sample indices makes captum select output[i, indices[i]] for row i; an int would
    # explain the same class for every image.
    indices = (probabilities.argmax(dim=1) if targets is None
               else torch.as_tensor(targets, dtype=torch.long, device=inputs.device))
    if indices.shape != (len(inputs),):
        raise ValueError(f"got {len(indices)} targets for {len(inputs)} images")
    return probabilities.cpu().numpy(), inputs, indices


def _mirror_view(inputs: torch.Tensor) -> torch.Tensor:
    """The left-right mirror of a batch, a fresh leaf that requires grad when ``inputs`` does."""
    return inputs.detach().flip(-1).requires_grad_(inputs.requires_grad)


def _normalized(maps: torch.Tensor) -> torch.Tensor:
    """Positive part, per-map min–max normalization."""
    return normalize_maps(F.relu(maps.detach().float()))


def _finish(maps: torch.Tensor) -> np.ndarray:
    """``_normalized`` as float32 numpy."""
    return _normalized(maps).cpu().numpy().astype(np.float32)


def _combined(maps: torch.Tensor, mirrored: torch.Tensor | None) -> np.ndarray:
    """``_finish`` of raw maps, or with ``mirrored`` (the mirror view's raw maps, flipped back) the normalized
    mean of the two, each normalized first so that neither view's scale dominates."""
    if mirrored is None:
        return _finish(maps)
    return _finish(_normalized(maps) + _normalized(mirrored))


def grad_cam(model: nn.Module, layer: str | nn.Module, batch: torch.Tensor,
             targets: Sequence[int] | torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Classic single-view Grad-CAM at ``layer``: ``explain_batch(model, batch, "gradcam", layer, targets,
    mirror=False)``."""
    return explain_batch(model, batch, "gradcam", layer=layer, targets=targets, mirror=False)


@contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen weights inside; every module's mode and every ``requires_grad`` flag restored after."""
    # Per module, not model.train(flag): a caller may keep e.g. frozen batch norms in eval inside a
    # training model, and that mix must survive.
    modes = [(module, module.training) for module in model.modules()]
    requires_grad = [p.requires_grad for p in model.parameters()]
    try:
        model.eval()
        # Gradients are needed only with respect to activations or inputs: frozen weights keep the graph small.
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)


def _upsampled(maps: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) or (B, h, w) layer maps, bilinearly resized to the input's (B, S, S)."""
    maps = maps if maps.dim() == 4 else maps[:, None]
    return LayerAttribution.interpolate(maps.float(), tuple(inputs.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def _black(inputs: torch.Tensor) -> torch.Tensor:
    """Each image's per-channel minimum (an MRI slice's background), broadcast to the input's shape."""
    return inputs.amin(dim=(2, 3), keepdim=True).expand_as(inputs).contiguous()


def cam_maps(model: nn.Module, inputs: torch.Tensor, indices: torch.Tensor, layers: Sequence[str | nn.Module],
             methods: Sequence[str] = CAM_METHODS) -> dict[tuple[str, int], torch.Tensor]:
    """Raw (un-normalized) maps (B, S, S) of CAM methods at several layers from one backward pass:
    {(method, layer position): maps}. Inputs must require grad; the caller restores the model's state."""
    modules = [find_layer(model, layer) for layer in layers]
    # captum hooks every layer for one forward pass and takes the class score's gradient at each output;
    # multiply_by_inputs=False returns the gradient alone, and a hook of ours keeps the activations.
    attributor = LayerGradientXActivation(model, modules if len(modules) > 1 else modules[0],
                                          multiply_by_inputs=False)
    activations: dict[int, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda _m, _i, output, k=k: activations.__setitem__(k, output.detach()))
               for k, module in enumerate(modules)]
    try:
        gradients = attributor.attribute(inputs, target=indices)
    finally:
        for handle in handles:
            handle.remove()
    gradients = list(gradients) if len(modules) > 1 else [gradients]
    maps = {}
    for k, gradient in enumerate(gradients):
        gradient, activation = gradient.detach().float(), activations[k].float()
        for method in methods:
            maps[method, k] = _upsampled(_CAM_COMBINERS[method](gradient, activation), inputs)
    return maps


def _gradcam(gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    return (gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1)


def _gradcampp(gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    squared, cubed = gradients ** 2, gradients ** 3
    denominator = 2 * squared + activations.sum(dim=(2, 3), keepdim=True) * cubed
    alpha = torch.where(gradients != 0, squared / torch.where(denominator != 0, denominator,
                                                              torch.ones_like(denominator)), 0.0)
    weights = (alpha * F.relu(gradients)).sum(dim=(2, 3), keepdim=True)
    return (weights * activations).sum(dim=1)


def _hirescam(gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    return (gradients * activations).sum(dim=1)


def _layercam(gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    return (F.relu(gradients) * activations).sum(dim=1)


_CAM_COMBINERS = {"gradcam": _gradcam, "gradcampp": _gradcampp, "hirescam": _hirescam, "layercam": _layercam}


def _occlusion(model, inputs, indices):
    side = inputs.shape[-1]
    window = max(1, round(side * OCCLUSION_WINDOW))
    stride = max(1, window // 2)
    with torch.no_grad():
        attributions = Occlusion(model).attribute(inputs, sliding_window_shapes=(inputs.shape[1], window, window),
                                                  strides=(inputs.shape[1], stride, stride), baselines=_black(inputs),
                                                  target=indices, perturbations_per_eval=8)
    return attributions.sum(dim=1)


def _integrated_gradients(model, inputs, indices):
    attributions = IntegratedGradients(model).attribute(inputs, baselines=_black(inputs), target=indices,
                                                        n_steps=IG_STEPS, internal_batch_size=4 * IG_STEPS)
    positive = F.relu(attributions.detach().sum(dim=1, keepdim=True))
    sigma = max(0.5, inputs.shape[-1] * IG_SMOOTHING)
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(positive, [kernel, kernel], [sigma, sigma])[:, 0]


_ATTRIBUTORS = {"occlusion": _occlusion, "integrated-gradients": _integrated_gradients}


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min–max scaling to [0, 1]; a constant map (no evidence anywhere) becomes zeros."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    span = high - low
    scaled = (maps - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(maps))


def write_explanations(classifier, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                       target: str | None = None, batch_size: int = 16, **options) -> list[Path]:
    """Write one explanation panel PNG per image (folders are expanded) and return the written paths.

    Each panel is the slice beside its overlay with a colour bar and a caption (``figures.gradcam_panel``, always
    the same size). Files are named ``<stem>_<method>_<class>.png`` after the method and the explained class, so a
    rerun replaces its own files instead of leaving stale ones beside them. ``options`` (``method=``, ``layer=``,
    ``mirror=``) go to ``classifier.explain`` when given.
    """
    from braintumor.visualize.figures import gradcam_panel

    files = expand_inputs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        explanations = classifier.explain([str(f) for f in chunk], target=target, batch_size=batch_size, **options)
        for file, explanation in zip(chunk, explanations):
            name = _unique_name(f"{_safe(file.stem)}_{_safe(explanation.method)}_{_safe(explanation.target)}", taken)
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
