"""The one inference path: every surface (CLI predict/explain/evaluate, volumes, the server, the Python API) turns
inputs into results here, and nowhere else.

- :func:`tta_views` is the one test-time augmentation (the batch and its mirror in one forward pass).
- :func:`run_batch` is the one call of a model on a preprocessed batch: TTA, the runtime (logits and the two trust
  tiers' scores), the temperature (calibrated probabilities). :func:`infer_batches` is the one loop over
  batches of preprocessed images (evaluation and training's validation).
- :func:`predictions_from` is the one place a slice's status is decided (through
  :func:`braintumor.trust.status.status_of`; a non-finite input, weight, temperature or output is never ``ok``).
- :func:`iter_predictions` is the one batching loop over image inputs (paths, bytes, PIL images, numpy arrays,
  torch tensors); :func:`predict_volume` classifies a volume's slices through it and decides the verdict.
- :func:`discover_inputs` / :func:`predict_paths` / :func:`predict_items` are the one slice/volume dispatch.
- :func:`explain_items` adds the explanation (``visualize.explain``) to the same calibrated prediction and status.

Results follow :mod:`braintumor.inference.results` (documented in docs/schema.md). The functions take a
:class:`~braintumor.inference.classifier.Classifier` (duck-typed: ``classes``, ``tta``, ``temperature``,
``min_confidence``, ``trust_tiers``, ``infer``, ``preprocess``, ``model``, ``lock``, ``device``).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image

from braintumor.data.inputs import ImageInput, describe_source, to_image, unique_paths
from braintumor.data.pixels import ImageReadError
from braintumor.data.volumes import Volume, partition_inputs, read_volume
from braintumor.errors import UserError
from braintumor.inference.results import Prediction, VolumePrediction
from braintumor.inference.volume_verdict import VerdictRule, VolumeResult, summarize_volume
from braintumor.trust.status import NOT_MRI, status_of

if TYPE_CHECKING:
    from braintumor.inference.classifier import Classifier
    from braintumor.visualize.explain import Explanation

__all__ = ["BatchOutputs", "Discovered", "Prediction", "VerdictRule", "VolumePrediction", "VolumeResult",
           "calibrate", "discover_inputs", "explain_items", "infer_batches", "iter_predictions", "predict_batch",
           "predict_items", "predict_paths", "predict_volume", "predictions_from", "run_batch", "run_batches",
           "tta_views"]

Skip = Callable[[str, str], None]  # on_skip(source, reason)


# ------------------------------------------------------------------ the model on a batch: TTA, calibration, scores

def tta_views(forward: Callable[[torch.Tensor], Any], images: torch.Tensor, tta: bool
              ) -> tuple[list[Any], Any | None]:
    """The one test-time augmentation: ``forward`` over the batch and, with ``tta``, its horizontal mirror, in one
    pass (on a CPU one batch of 2B costs far less than two of B). ``forward`` returns logits or (logits,
    scores); the result is the logits of each view and the scores of the un-mirrored batch (or None)."""
    batch = torch.cat([images, images.flip(-1)]) if tta else images
    output = forward(batch)
    logits, scores = output if isinstance(output, tuple) else (output, None)
    n = len(images)
    views = [logits[:n], logits[n:]] if tta else [logits]
    return views, None if scores is None else scores[:n]


def calibrate(views: Sequence[np.ndarray], temperature: float) -> np.ndarray:
    """Calibrated probabilities (B, C): the mean over the views of softmax(logits / temperature). A temperature
    that is not a positive finite number gives NaN rows (never a confident answer)."""
    logits = [torch.as_tensor(np.asarray(view, dtype=np.float32)) for view in views]
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        return np.full(tuple(logits[0].shape), np.nan, dtype=np.float32)
    return torch.stack([torch.softmax(view / float(temperature), dim=1) for view in logits]).mean(0).numpy()


@dataclass
class BatchOutputs:
    """What a model says about N preprocessed slices: the logits of each TTA view, calibrated probabilities and
    the trust tiers' normalized scores (None: the model has no such tier)."""

    views: list[np.ndarray]
    probabilities: np.ndarray  # (N, C) calibrated
    not_mri_scores: np.ndarray | None  # (N,)
    atypical_scores: np.ndarray | None  # (N,)

    def __len__(self) -> int:
        return len(self.probabilities)

    @classmethod
    def concat(cls, parts: Sequence["BatchOutputs"], n_classes: int) -> "BatchOutputs":
        if not parts:
            empty = np.zeros((0, n_classes), dtype=np.float32)
            return cls([empty], empty, None, None)

        def joined(name):
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else np.concatenate(values)

        return cls([np.concatenate([part.views[v] for part in parts]) for v in range(len(parts[0].views))],
                   np.concatenate([part.probabilities for part in parts]), joined("not_mri_scores"),
                   joined("atypical_scores"))


def trust_scores(scores: np.ndarray | None, tiers: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(not_mri_scores, atypical_scores) from a runtime's scores: (B, 2) columns not_mri, atypical; a one-tier
    (B,) output is the atypical tier; a tier the model does not have is None."""
    if scores is None:
        return None, None
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim == 1:
        return None, scores
    return (scores[:, 0] if "not_mri" in tiers else None), (scores[:, 1] if "atypical" in tiers else None)


def run_batch(classifier: "Classifier", batch: torch.Tensor, forward: Callable | None = None) -> BatchOutputs:
    """The model on a preprocessed batch (B, 3, S, S): TTA as the classifier is set, the runtime's logits and trust
    scores, the temperature. ``forward`` replaces ``classifier.infer`` (e.g. the runtime itself, by a caller
    that already holds the classifier's lock)."""
    views, scores = tta_views(forward or classifier.infer, batch, classifier.tta)
    views = [np.asarray(view, dtype=np.float32) for view in views]
    not_mri, atypical = trust_scores(scores, classifier.trust_tiers)
    return BatchOutputs(views, calibrate(views, classifier.temperature), not_mri, atypical)


@torch.inference_mode()
def infer_batches(infer_views: Callable[[torch.Tensor], tuple[list[Any], Any | None]],
                  batches: Iterable[tuple[torch.Tensor, Any]], n_classes: int,
                  progress: Callable[[int], None] | None = None,
                  ) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray]:
    """The one loop over preprocessed (images, labels) batches: each TTA view's logits (N, C), the scores (N, ...)
    (None when ``infer_views`` gives none) and the labels (N,). ``infer_views`` maps a batch to (views, scores)
    (:func:`tta_views` over a classifier or a training network); ``progress(n)`` is told each batch's size."""
    outputs, labels = [], []
    for images, batch_labels in batches:
        views, scores = infer_views(images)
        outputs.append(([np.asarray(v.float().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
                         for v in views], scores))
        labels.append(np.asarray(batch_labels, dtype=np.int64).reshape(-1))
        if progress is not None:
            progress(len(images))
    if not outputs:
        return [np.zeros((0, n_classes), dtype=np.float32)], None, np.zeros(0, dtype=np.int64)
    views = [np.concatenate([batch_views[v] for batch_views, _ in outputs]) for v in range(len(outputs[0][0]))]
    scores = None if outputs[0][1] is None else np.concatenate([np.asarray(s) for _, s in outputs])
    return views, scores, np.concatenate(labels)


def run_batches(classifier: "Classifier", batches: Iterable[tuple[torch.Tensor, Any]],
                progress: Callable[[int], None] | None = None) -> tuple[BatchOutputs, np.ndarray]:
    """:func:`run_batch` over many (images, labels) batches (a DataLoader, cached batches): outputs and labels."""
    views, scores, labels = infer_batches(lambda images: tta_views(classifier.infer, images, classifier.tta),
                                          batches, len(classifier.classes), progress)
    not_mri, atypical = trust_scores(scores, classifier.trust_tiers)
    return BatchOutputs(views, calibrate(views, classifier.temperature), not_mri, atypical), labels


# ------------------------------------------------------------------ outputs -> predictions (the one status)

def predictions_from(classifier: "Classifier", outputs: BatchOutputs, sources: Sequence[str], *,
                     finite_inputs: Sequence[bool] | None = None, volume: str | None = None,
                     slice_indices: Sequence[int] | None = None, cls: type = Prediction,
                     extra: Sequence[dict[str, Any]] | None = None) -> list[Prediction]:
    """One :class:`Prediction` (or ``cls``, e.g. EvaluatedPrediction, with ``extra`` fields) per row of
    ``outputs``. The status comes from :func:`status_of`; a slice whose input had non-finite values is
    ``not_mri``."""
    classes = list(classifier.classes)
    results = []
    for k, source in enumerate(sources):
        row = outputs.probabilities[k]
        not_mri = None if outputs.not_mri_scores is None else float(outputs.not_mri_scores[k])
        atypical = None if outputs.atypical_scores is None else float(outputs.atypical_scores[k])
        if np.isfinite(row).all():
            index = int(np.argmax(row))
            predicted, confidence = classes[index], float(row[index])
        else:
            predicted, confidence = None, float("nan")
        status = status_of(confidence, not_mri, atypical, classifier.min_confidence)
        if finite_inputs is not None and not finite_inputs[k]:
            status = NOT_MRI
        results.append(cls(source=source, predicted_class=predicted, confidence=confidence,
                           probabilities={c: float(p) for c, p in zip(classes, row)}, status=status,
                           not_mri_score=not_mri, atypical_score=atypical, volume=volume,
                           slice_index=None if slice_indices is None else int(slice_indices[k]),
                           **(extra[k] if extra is not None else {})))
    return results


def predict_batch(classifier: "Classifier", batch: torch.Tensor, sources: Sequence[str], **options: Any
                  ) -> list[Prediction]:
    """Predictions for a preprocessed batch (B, 3, S, S); ``options`` as for :func:`predictions_from`."""
    return predictions_from(classifier, run_batch(classifier, batch), sources, **options)


# ------------------------------------------------------------------ the one batching loop over image inputs

def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def load_items(classifier: "Classifier", items: Sequence[ImageInput], sources: Sequence[str], *,
               skip_bad: bool = False, on_skip: Skip | None = None):
    """Decode and preprocess ``items``: (batch tensor or None, kept indices, images, finite flags). An unreadable
    item raises its ImageReadError, or with ``skip_bad`` is reported to ``on_skip(source, reason)``."""
    tensors, kept, images, finite = [], [], [], []
    for k, (item, source) in enumerate(zip(items, sources)):
        try:
            image, is_finite = to_image(item, name=source if not isinstance(item, (str, os.PathLike)) else None)
        except ImageReadError as err:
            if not skip_bad:
                raise
            if on_skip is not None:
                on_skip(source, err.reason)
            continue
        tensors.append(classifier.preprocess(image))
        kept.append(k)
        images.append(image)
        finite.append(is_finite)
    return (torch.stack(tensors) if tensors else None), kept, images, finite


def iter_predictions(classifier: "Classifier", items: Sequence[ImageInput], *,
                     sources: Sequence[str] | None = None, batch_size: int = 32, skip_bad: bool = False,
                     on_skip: Skip | None = None, progress: Callable[[int], None] | None = None,
                     volume: str | None = None, slice_indices: Sequence[int] | None = None,
                     finite_inputs: Sequence[bool] | None = None) -> Iterator[Prediction]:
    """Predictions of image inputs (paths, bytes, PIL images, numpy arrays, torch tensors), in order, a batch at
    a time (so callers can stream them). ``sources`` names each item (default: its path or a description).

    Without ``skip_bad`` the first unreadable item raises its ImageReadError (a UserError); with it, unreadable
    items are skipped and reported to ``on_skip(source, reason)``. ``progress(n)`` is told each batch's size.
    ``finite_inputs``: False for an item known to have held NaN/inf before it became pixels (a volume's slice).
    """
    if not isinstance(items, Sequence):
        items = list(items)  # a lazy Sequence (a volume's SliceImages) stays lazy: one batch decoded at a time
    sources = [describe_source(items[i]) for i in range(len(items))] if sources is None else list(sources)
    positions = list(range(len(items)))
    for chunk in _chunks(positions, batch_size):
        batch, kept, _, finite = load_items(classifier, [items[i] for i in chunk], [sources[i] for i in chunk],
                                            skip_bad=skip_bad, on_skip=on_skip)
        if finite_inputs is not None:
            finite = [flag and bool(finite_inputs[chunk[k]]) for k, flag in zip(kept, finite)]
        if batch is not None:
            yield from predict_batch(classifier, batch, [sources[chunk[k]] for k in kept], finite_inputs=finite,
                                     volume=volume, slice_indices=None if slice_indices is None
                                     else [slice_indices[chunk[k]] for k in kept])
        if progress is not None:
            progress(len(chunk))


# ------------------------------------------------------------------ volumes

def predict_volume(classifier: "Classifier", volume: Volume, rule: VerdictRule | None = None, *,
                   batch_size: int = 32) -> VolumeResult:
    """Every axial slice of ``volume`` through :func:`iter_predictions` (sources ``<volume>#slice<index>``; a
    slice with NaN/inf voxels is ``not_mri``), then the volume's verdict and status
    (:mod:`braintumor.inference.volume_verdict`)."""
    images = volume.images()
    nonfinite = getattr(volume, "nonfinite", None)  # NaN/inf voxels per slice: such a slice is never ok
    predictions = list(iter_predictions(
        classifier, images, sources=[f"{volume.source}#slice{z:03d}" for z in range(len(images))],
        batch_size=batch_size, volume=volume.source, slice_indices=list(range(len(images))),
        finite_inputs=None if nonfinite is None else [not bad for bad in nonfinite]))
    return summarize_volume(volume, list(classifier.classes), predictions, rule or VerdictRule())


# ------------------------------------------------------------------ the one slice/volume dispatch

@dataclass
class Discovered:
    """Command-line paths sorted into 2-D image files and volumes (each file once, in input order)."""

    images: list[Path] = field(default_factory=list)
    volumes: list[Path] = field(default_factory=list)


def discover_inputs(paths: Iterable[str | os.PathLike]) -> Discovered:
    """Files and folders (walked by :func:`braintumor.data.inputs.find_files`) as image files and volumes (NIfTI,
    multi-frame DICOM, DICOM series folders); the same file named twice (e.g. also through its folder) once."""
    images, volumes = partition_inputs(list(paths))
    return Discovered(unique_paths(images), unique_paths(volumes))


def predict_paths(classifier: "Classifier", paths: Iterable[str | os.PathLike] | Discovered, *,
                  rule: VerdictRule | None = None, batch_size: int = 32, skip_bad: bool = False,
                  on_skip: Skip | None = None, progress: Callable[[int], None] | None = None,
                  ) -> Iterator[Prediction | VolumeResult]:
    """Predictions of the image files, then one :class:`VolumeResult` per volume, streamed as they are made.
    Unreadable files as in :func:`iter_predictions` (a volume that cannot be read raises its UserError, or is
    skipped with ``skip_bad``)."""
    found = paths if isinstance(paths, Discovered) else discover_inputs(paths)
    yield from iter_predictions(classifier, found.images, sources=[os.fspath(p) for p in found.images],
                                batch_size=batch_size, skip_bad=skip_bad, on_skip=on_skip, progress=progress)
    for path in found.volumes:
        try:
            volume = read_volume(path)
        except UserError as err:
            if not skip_bad:
                raise
            if on_skip is not None:
                on_skip(os.fspath(path), str(err))
            continue
        yield predict_volume(classifier, volume, rule, batch_size=batch_size)
        if progress is not None:
            progress(1)


def predict_items(classifier: "Classifier", items: Sequence[ImageInput | Volume], *,
                  sources: Sequence[str] | None = None, rule: VerdictRule | None = None, batch_size: int = 32,
                  ) -> list[Prediction | VolumeResult]:
    """Decoded inputs (the server's uploads, the Python API's list): each slice input a Prediction, each
    :class:`~braintumor.data.volumes.Volume` a VolumeResult, in input order; slices are batched together."""
    items = list(items)
    sources = [describe_source(item) if not isinstance(item, Volume) else item.source for item in items] \
        if sources is None else list(sources)
    plain = [k for k, item in enumerate(items) if not isinstance(item, Volume)]
    slices = iter(iter_predictions(classifier, [items[k] for k in plain], sources=[sources[k] for k in plain],
                                   batch_size=batch_size))
    return [predict_volume(classifier, item, rule, batch_size=batch_size) if isinstance(item, Volume)
            else next(slices) for item in items]


# ------------------------------------------------------------------ explanations

def _explain_maps(model: torch.nn.Module, batch: torch.Tensor, method: str, layer: str | None,
                  targets: list[int], mirror: bool) -> np.ndarray:
    """Heat maps (B, S, S) in [0, 1] from ``visualize.explain.explain_batch`` (an unknown method or layer is a
    UserError)."""
    from braintumor.visualize.explain import explain_batch

    try:
        return explain_batch(model, batch, method=method, layer=layer, targets=targets, mirror=mirror)[1]
    except ValueError as err:
        raise UserError(str(err)) from None


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, every module's own mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def explain_methods() -> tuple[str, ...]:
    """The explanation methods ``explain_items`` accepts (``visualize.explain.METHODS``)."""
    from braintumor.visualize.explain import METHODS

    return tuple(METHODS)


def explain_items(classifier: "Classifier", items: Sequence[ImageInput], *, target: str | None = None,
                  method: str | None = None, layer: str | None = None, mirror: bool | None = None,
                  batch_size: int = 16, sources: Sequence[str] | None = None) -> list["Explanation"]:
    """Explanations of image inputs: each the calibrated :class:`Prediction` (``explanation.prediction``, with
    its status), and a heat map of ``target`` (a class name; None: the predicted class) by ``method`` (None:
    ``visualize.explain.DEFAULT_METHOD``), averaged with the mirror view's or not (``mirror``; None:
    ``DEFAULT_MIRROR``). Needs a PyTorch model: exports have no gradients (UserError)."""
    from braintumor.visualize.explain import DEFAULT_METHOD, DEFAULT_MIRROR, Explanation, layer_of

    method = method or DEFAULT_METHOD
    mirror = DEFAULT_MIRROR if mirror is None else bool(mirror)
    block = layer_of(method, layer)  # the CAM block the maps read (None: a method without layers)
    if classifier.model is None:
        raise UserError(f"explanations need gradients: load the PyTorch checkpoint (.pt), not the "
                        f"{classifier.backend} export")
    classes = list(classifier.classes)
    if target is not None and target not in classes:
        raise UserError(f"unknown class {target!r} for --class; this model's classes are: {', '.join(classes)}")
    items = list(items)
    sources = [describe_source(item) for item in items] if sources is None else list(sources)
    size = (classifier.image_size, classifier.image_size)
    results: list[Explanation] = []
    for chunk in _chunks(list(range(len(items))), batch_size):
        batch, kept, images, finite = load_items(classifier, [items[i] for i in chunk], [sources[i] for i in chunk])
        # Explaining hooks the shared network: alone (the write lock), in eval mode like any prediction.
        with classifier.lock.write(), _eval_mode(classifier.model):
            outputs = run_batch(classifier, batch, forward=classifier.runtime.run)
            predictions = predictions_from(classifier, outputs, [sources[chunk[k]] for k in kept],
                                           finite_inputs=finite)
            targets = [classes.index(target if target is not None else (p.predicted_class or classes[0]))
                       for p in predictions]
            maps = _explain_maps(classifier.model, batch.to(classifier.device), method, layer, targets, mirror)
        for prediction, image, heatmap, explained in zip(predictions, images, maps, targets):
            explanation = Explanation.of(prediction.source, classes, np.array(list(prediction.probabilities.values())),
                                         np.asarray(heatmap, dtype=np.float32), image.resize(size, Image.BILINEAR),
                                         explained, method=method, mirror=mirror, layer=block)
            explanation.prediction = prediction  # calibrated probabilities and the status
            explanation.status = prediction.status
            results.append(explanation)
    return results


ItemResult = Union[Prediction, VolumeResult]
