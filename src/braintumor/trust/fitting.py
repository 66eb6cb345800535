"""Fit what makes a model's predictions trustworthy, after training: the temperature and both trust tiers.

``fit_trust`` takes a trained network with its evaluation preprocessing (a checkpoint path, a ``(model,
preprocess)`` pair, or anything with ``.model`` and ``.preprocess`` such as an inference Classifier) and the
training and validation images; it returns the ``"trust"`` entry ``store_trust`` writes into a checkpoint:

- ``temperature``: validation negative log-likelihood (:mod:`braintumor.trust.temperature`);
- ``atypical``: class means and a shared covariance of the training slices' pooled features; one threshold per
  *predicted* class at the conformal order statistic of that class's validation slices (Mondrian), so each class
  is flagged at about ``atypical_rate``;
- ``not_mri``: one Gaussian per ResNet stage of the training slices' feature statistics; the score is the largest
  stage distance over its scale, and the threshold sits at the conformal (1 - ``NOT_MRI_RATE``) order statistic of
  real MRI — the validation slices and MRI-like variants of them (:mod:`braintumor.trust.negatives`) — times
  ``NOT_MRI_MARGIN``. Generated non-MRI images (the fitting family only) are scored to report how many are caught.

The trust layer never imports inference/: it runs the network itself. Training calls ``fit_trust`` at the end;
for a checkpoint trained earlier ``fit_trust_for_checkpoint`` (``braintumor calibrate``) rebuilds the run's own
split from the configuration stored in the checkpoint and does the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from braintumor.data.pipeline import ImageFolderDataset
from braintumor.errors import UserError
from braintumor.evaluation.metrics import expected_calibration_error
from braintumor.models.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from braintumor.trust import negatives
from braintumor.trust.ood import (ATYPICAL, ATYPICAL_RATE, LAYERS, NOT_MRI, NOT_MRI_RATE, AtypicalTier,
                                  ColourCheck, GaussianBlock, NotMriTier, backbone_features, pixel_checks,
                                  fit_mahalanobis,
                                  acceptance_threshold, mondrian_thresholds, trust_tiers, whiten)
from braintumor.trust.temperature import fit_temperature, softmax, temperature_at_bound

log = logging.getLogger("braintumor.trust")

TRUST_VERSION = 2
MIN_PER_CLASS = 20  # fewer validation slices of a class than this calibrate nothing: warn
NOT_MRI_MARGIN = 1.0  # the not-MRI threshold: this many times the conformal tail of real MRI (measured: docs/ood.md)
VARIANT_SLICES = 300  # validation slices turned into MRI-like variants for the not-MRI threshold
FIT_VARIANTS = ("window", "flip", "rotate 90/180/270", "rotate small", "crop", "jpeg", "resize")
FIT_NEGATIVES_PER_KIND = 20
COLOUR_FLOOR, COLOUR_MARGIN = 8.0, 3.0  # colourfulness threshold (8-bit levels): at least 8, 3x real MRI's tail


@dataclass
class Features:
    """What the trust tiers read from a batch of slices: pooled features, feature statistics, logits."""

    pooled: np.ndarray
    statistics: np.ndarray
    logits: np.ndarray
    colour: np.ndarray | None = None  # colourfulness of the input (8-bit levels)
    blank: np.ndarray | None = None  # blankness of the input (trust.ood.pixel_checks: above 1 when blank)

    def __len__(self) -> int:
        return len(self.logits)


def network_and_preprocess(source: Any, preprocess: Callable | None = None, device: str | torch.device = "cpu",
                           ) -> tuple[nn.Module, Callable, tuple[float, ...], tuple[float, ...]]:
    """(network in eval mode, evaluation preprocessing, its mean, its std) of a checkpoint path, a network plus
    ``preprocess`` (an EvalTransform), or an object with ``.model``, ``.preprocess``, ``.mean``, ``.std`` (an
    inference Classifier)."""
    from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

    if isinstance(source, nn.Module):
        if preprocess is None:
            raise ValueError("fitting trust on a bare network needs its preprocess")
        model = source
    elif hasattr(source, "preprocess") and hasattr(source, "model"):
        if source.model is None:
            raise UserError("fitting the trust tiers needs the PyTorch checkpoint (.pt), not an export")
        model, preprocess = source.model, preprocess or source.preprocess
        return (model.eval(), preprocess, tuple(getattr(source, "mean", IMAGENET_MEAN)),
                tuple(getattr(source, "std", IMAGENET_STD)))
    else:
        from braintumor.models.checkpoint import model_from_checkpoint, spec_of

        path = resolve_checkpoint(source)
        ckpt = load_checkpoint(path)
        spec = spec_of(ckpt, path)
        from braintumor.utils.devices import resolve_device

        model = model_from_checkpoint(ckpt, path).float().to(resolve_device(device))
        preprocess = preprocess or EvalTransform(spec.image_size, spec.mean, spec.std)
    return (model.eval(), preprocess, tuple(getattr(preprocess, "mean", IMAGENET_MEAN)),
            tuple(getattr(preprocess, "std", IMAGENET_STD)))


@torch.inference_mode()
def extract_features(model: nn.Module, preprocess: Callable, images: Sequence, *, batch_size: int = 64,
                     workers: int = 0, mean=None, std=None) -> Features:
    """Features of image files (read with the project's reader) or of PIL images, evaluation preprocessing;
    with the preprocessing's ``mean`` and ``std`` also each input's colourfulness and blankness."""
    device = next(model.parameters()).device
    if images and not isinstance(images[0], Image.Image):
        batches = DataLoader(ImageFolderDataset(list(images), [0] * len(images), preprocess), batch_size=batch_size,
                             num_workers=workers, shuffle=False)
        batches = (batch for batch, _ in batches)
    else:
        batches = (torch.stack([preprocess(image) for image in images[start:start + batch_size]])
                   for start in range(0, len(images), batch_size))
    pooled, statistics, logits, colour, blank = [], [], [], [], []
    for batch in batches:
        batch = batch.to(device)
        batch_pooled, batch_statistics = backbone_features(model, batch)
        pooled.append(batch_pooled.float().cpu().numpy())
        statistics.append(batch_statistics.float().cpu().numpy())
        logits.append(model.fc(batch_pooled).float().cpu().numpy())
        if mean is not None and std is not None:
            batch_colour, batch_blank = pixel_checks(batch, torch.tensor(mean, device=device),
                                                     torch.tensor(std, device=device))
            colour.append(batch_colour.cpu().numpy())
            blank.append(batch_blank.cpu().numpy())
    if not logits:
        raise ValueError("no images to extract features from")
    return Features(np.concatenate(pooled), np.concatenate(statistics), np.concatenate(logits),
                    np.concatenate(colour) if colour else None, np.concatenate(blank) if blank else None)


def logits_and_features(classifier, paths, batch_size: int = 64, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (N, C) and pooled features (N, D) of image files (kept for 0.1 callers)."""
    model, preprocess, _, _ = network_and_preprocess(classifier)
    features = extract_features(model, preprocess, paths, batch_size=batch_size, workers=workers)
    return features.logits, features.pooled


@torch.inference_mode()
def stage_widths(model: nn.Module) -> list[int]:
    """Channels of each ResNet stage (layer1 … layer4): the blocks of the feature statistics (mean, std each)."""
    widths = []
    for name in LAYERS:
        stage = getattr(model, name)
        last = stage[-1]
        conv = getattr(last, "conv3", None) or last.conv2
        widths.append(int(conv.out_channels))
    return widths


def statistic_blocks(widths: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) of each stage's mean and std in the statistics vector."""
    blocks, start = [], 0
    for width in widths:
        blocks.append((start, start + 2 * width))
        start += 2 * width
    return blocks


# ------------------------------------------------------------------------------------------ the tiers


def fit_atypical(train_pooled: np.ndarray, train_labels: Sequence[int], val_pooled: np.ndarray,
                 val_logits: np.ndarray, val_labels: Sequence[int], classes: Sequence[str],
                 rate: float = ATYPICAL_RATE) -> tuple[AtypicalTier, dict[str, Any]]:
    """Mahalanobis to the predicted class's centre, Mondrian-conformal thresholds per predicted class; the
    summary holds each class's validation rate (by predicted and by true class) and count."""
    n_classes = len(classes)
    detector = fit_mahalanobis(train_pooled, np.asarray(train_labels))
    if detector.centers.shape[0] < n_classes:  # the last classes had no training slice
        pad = torch.zeros(n_classes - detector.centers.shape[0], detector.centers.shape[1])
        detector.centers = torch.cat([detector.centers, pad])
    predicted = np.asarray(val_logits).argmax(axis=1)
    distances = detector.class_distances(torch.from_numpy(np.asarray(val_pooled, dtype=np.float32))).numpy()
    own = distances[np.arange(len(predicted)), predicted]
    thresholds, counts = mondrian_thresholds(own, predicted, n_classes, rate)
    tier = AtypicalTier(detector, torch.from_numpy(thresholds))
    with torch.no_grad():
        scores = tier(torch.from_numpy(np.asarray(val_pooled, dtype=np.float32)),
                      torch.from_numpy(np.asarray(val_logits, dtype=np.float32))).numpy()
    flagged, labels = scores > 1.0, np.asarray(val_labels)
    summary = {
        "rate": float(rate),
        "val_rate": float(flagged.mean()),
        "val_rate_by_predicted": {name: float(flagged[predicted == k].mean()) if counts[k] else float("nan")
                                  for k, name in enumerate(classes)},
        "val_rate_by_class": {name: float(flagged[labels == k].mean()) if (labels == k).any() else float("nan")
                              for k, name in enumerate(classes)},
        "val_count_by_predicted": {name: int(counts[k]) for k, name in enumerate(classes)},
    }
    return tier, summary


def fit_not_mri(train_statistics: np.ndarray, mri_statistics: np.ndarray, widths: Sequence[int], *,
                negative_statistics: np.ndarray | None = None, rate: float = NOT_MRI_RATE,
                margin: float = NOT_MRI_MARGIN, mri_colour: np.ndarray | None = None,
                negative_colour: np.ndarray | None = None, negative_blank: np.ndarray | None = None, mean=None,
                std=None) -> tuple[NotMriTier, dict[str, Any]]:
    """One Gaussian per stage's statistics (training slices); each stage's distance divided by its scale (the
    conformal (1 - rate) order statistic on ``mri_statistics``, real MRI not used for the Gaussians), the
    score the largest of them; the threshold ``margin`` times the conformal (1 - rate) order statistic of that
    score on ``mri_statistics``."""
    blocks = []
    for start, stop in statistic_blocks(widths):
        center, whitening = whiten(train_statistics[:, start:stop])
        block = GaussianBlock(start, stop, torch.from_numpy(center), torch.from_numpy(whitening), 1.0)
        with torch.no_grad():
            distance = block.distance(torch.from_numpy(np.asarray(mri_statistics, dtype=np.float32))).numpy()
        block.threshold.fill_(max(acceptance_threshold(distance, 1.0 - rate), 1e-12))
        blocks.append(block)
    tier = NotMriTier(blocks)
    mri_scores = score_not_mri(tier, mri_statistics)
    scale = max(acceptance_threshold(mri_scores, 1.0 - rate), 1e-12) * margin
    for block in tier.blocks:
        block.threshold.mul_(scale)
    if mri_colour is not None and mean is not None and std is not None:
        # Gray inputs only: the threshold sits well above the JPEG chroma noise of real slices, never below a floor.
        colour_threshold = max(COLOUR_FLOOR, COLOUR_MARGIN * acceptance_threshold(mri_colour, 1.0 - rate))
        tier.colour = ColourCheck(torch.tensor(mean), torch.tensor(std), colour_threshold)
    summary = {"rate": float(rate), "margin": float(margin), "mri_rate": float(np.mean(mri_scores / scale > 1.0)),
               "n_mri": int(len(mri_scores))}
    if negative_statistics is not None and len(negative_statistics):
        summary["fit_negatives_flagged"] = float(np.mean(score_not_mri(tier, negative_statistics, negative_colour,
                                                                        negative_blank) > 1.0))
    return tier, summary


def score_not_mri(tier: NotMriTier, statistics: np.ndarray, colour: np.ndarray | None = None,
                  blank: np.ndarray | None = None) -> np.ndarray:
    """The tier's score from extracted statistics (and the pixel checks: colourfulness, blankness): what the graph
    computes from the images."""
    with torch.no_grad():
        score = tier(torch.from_numpy(np.asarray(statistics, dtype=np.float32))).numpy()
    if tier.colour is not None and colour is not None:
        score = np.maximum(score, np.asarray(colour, dtype=np.float32) / float(tier.colour.threshold))
    if tier.colour is not None and blank is not None:
        score = np.maximum(score, np.asarray(blank, dtype=np.float32))
    return score


# ------------------------------------------------------------------------------------------ fit_trust


def _warn_small(val_labels: np.ndarray, classes: Sequence[str]) -> str | None:
    counts = np.bincount(val_labels, minlength=len(classes))
    if counts.min() >= MIN_PER_CLASS:
        return None
    few = ", ".join(f"{name} {int(count)}" for name, count in zip(classes, counts) if count < MIN_PER_CLASS)
    return (f"only {len(val_labels)} validation slices ({few}): fewer than {MIN_PER_CLASS} per class calibrate "
            "nothing; the temperature and trust thresholds are placeholders")


def fit_trust_from_features(train: Features, train_labels: Sequence[int], val: Features, val_labels: Sequence[int],
                            classes: Sequence[str], widths: Sequence[int], *, variants: Features | None = None,
                            fit_negatives: Features | None = None, atypical_rate: float = ATYPICAL_RATE,
                            not_mri_rate: float = NOT_MRI_RATE, margin: float = NOT_MRI_MARGIN,
                            mean=None, std=None) -> dict[str, Any]:
    """The trust entry from extracted features (see :func:`fit_trust`); ``mean``/``std`` (the preprocessing's)
    add the colour check to the not-MRI tier."""
    val_labels, classes = np.asarray(val_labels), list(classes)
    notes = [note for note in (_warn_small(val_labels, classes),) if note]
    temperature = fit_temperature(val.logits, val_labels)
    if temperature_at_bound(temperature):
        notes.append(f"the temperature sits on its bound ({temperature:.3g}): the validation set cannot calibrate "
                     "this model")
    atypical, atypical_summary = fit_atypical(train.pooled, train_labels, val.pooled, val.logits, val_labels,
                                              classes, atypical_rate)
    parts = [val] + ([variants] if variants is not None else [])
    mri = np.concatenate([part.statistics for part in parts])
    mri_colour = None if any(part.colour is None for part in parts) else np.concatenate([part.colour for part in parts])
    not_mri, not_mri_summary = fit_not_mri(
        train.statistics, mri, widths, negative_statistics=None if fit_negatives is None else fit_negatives.statistics,
        negative_colour=None if fit_negatives is None else fit_negatives.colour,
        negative_blank=None if fit_negatives is None else fit_negatives.blank, rate=not_mri_rate, margin=margin,
        mri_colour=mri_colour, mean=mean, std=std)
    val_not_mri = score_not_mri(not_mri, val.statistics, val.colour, val.blank) > 1.0
    not_mri_summary["val_rate"] = float(val_not_mri.mean())
    not_mri_summary["val_rate_by_class"] = {name: float(val_not_mri[val_labels == k].mean())
                                            if (val_labels == k).any() else float("nan")
                                            for k, name in enumerate(classes)}
    if variants is not None:
        not_mri_summary["variant_rate"] = float(np.mean(score_not_mri(not_mri, variants.statistics, variants.colour,
                                                                    variants.blank) > 1.0))
    for note in notes:
        log.warning("warning: %s", note)
    return {
        "version": TRUST_VERSION,
        "temperature": float(temperature),
        NOT_MRI: {**not_mri.state(), **not_mri_summary},
        ATYPICAL: {**atypical.state(), **atypical_summary},
        "classes": classes,
        "val_ece_before": expected_calibration_error(softmax(val.logits), val_labels),
        "val_ece_after": expected_calibration_error(softmax(val.logits, temperature), val_labels),
        "n_train": int(len(train)), "n_val": int(len(val)),
        "n_variants": int(len(variants)) if variants is not None else 0,
        "n_fit_negatives": int(len(fit_negatives)) if fit_negatives is not None else 0,
        "warnings": notes,
    }


def mri_variant_images(val_paths: Sequence, val_labels: Sequence[int], n_slices: int = VARIANT_SLICES,
                       seed: int = 0) -> list[Image.Image]:
    """MRI-like variants (:data:`FIT_VARIANTS`) of up to ``n_slices`` validation slices, spread over the classes."""
    from braintumor.data.io import read_image

    rng = np.random.default_rng(seed)
    labels = np.asarray(val_labels)
    order = np.argsort(rng.random(len(labels)) + labels * 0)  # a random sample; classes come in proportion
    chosen = sorted(order[:n_slices])
    images = []
    for index in chosen:
        images += [image for _, image in negatives.mri_variants(read_image(val_paths[index]), rng, FIT_VARIANTS)]
    return images


def fit_trust(source, train_paths, train_labels, val_paths, val_labels, *, classes: Sequence[str] | None = None,
              preprocess: Callable | None = None, atypical_rate: float = ATYPICAL_RATE,
              not_mri_rate: float = NOT_MRI_RATE, margin: float = NOT_MRI_MARGIN,
              variant_slices: int = VARIANT_SLICES, negatives_per_kind: int = FIT_NEGATIVES_PER_KIND,
              batch_size: int = 64, workers: int = 0, device: str = "cpu", accept_rate: float | None = None,
              ) -> dict[str, Any]:
    """Fit the temperature and both trust tiers of a trained network; returns the ``"trust"`` entry.

    ``source``: a checkpoint path, a network (with ``preprocess``), or an object with ``.model`` and
    ``.preprocess``. ``accept_rate`` is accepted for 0.1 callers and ignored (the tiers have their own rates).
    """
    del accept_rate
    if not 0.0 < atypical_rate < 1.0 or not 0.0 < not_mri_rate < 1.0:
        raise UserError("the trust rates must be between 0 and 1 (exclusive)")
    if len(train_paths) == 0 or len(val_paths) == 0:
        raise UserError("fitting the trust tiers and temperature needs training and validation images")
    model, preprocess, mean, std = network_and_preprocess(source, preprocess, device)
    options = dict(batch_size=batch_size, mean=mean, std=std)
    train = extract_features(model, preprocess, train_paths, workers=workers, **options)
    val = extract_features(model, preprocess, val_paths, workers=workers, **options)
    classes = list(classes) if classes is not None else _classes_of(source, val.logits.shape[1])
    variants = None
    if variant_slices:
        variants = extract_features(model, preprocess, mri_variant_images(val_paths, val_labels, variant_slices),
                                    **options)
    fit_negative = None
    if negatives_per_kind:
        images = [image for _, image in negatives.fit_negatives(negatives_per_kind)]
        fit_negative = extract_features(model, preprocess, images, **options)
    return fit_trust_from_features(train, train_labels, val, val_labels, classes, stage_widths(model),
                                   variants=variants, fit_negatives=fit_negative, atypical_rate=atypical_rate,
                                   not_mri_rate=not_mri_rate, margin=margin, mean=mean, std=std)


def _classes_of(source, n_classes: int) -> list[str]:
    names = getattr(source, "classes", None)
    if names is None and isinstance(source, (str, os.PathLike)):
        names = load_checkpoint(source).get("classes")
    return list(names) if names is not None and len(names) == n_classes else [str(k) for k in range(n_classes)]


# ------------------------------------------------------------------------------------------ storing, describing


def store_trust(checkpoint_path: str | os.PathLike, trust: dict[str, Any], out: str | os.PathLike | None = None) -> Path:
    """Write ``trust`` into a checkpoint (atomically; its other contents kept as they are), into ``out`` when
    given (a new file; the source is left alone), else in place."""
    path = Path(checkpoint_path)
    ckpt = load_checkpoint(path)
    ckpt["trust"] = trust
    ckpt.pop("format_version", None)
    return save_checkpoint(ckpt, Path(out) if out is not None else path)


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {rate:.1%}" if np.isfinite(rate) else f"{name} - (no slices)" for name, rate in rates.items())


def describe_trust(trust: dict[str, Any]) -> str:
    """A few lines for the terminal: temperature and ECE, each tier's validation rates (per class)."""
    lines = [f"temperature {trust['temperature']:.3f} (validation ECE {trust['val_ece_before']:.4f} -> "
             f"{trust['val_ece_after']:.4f}) on {trust['n_val']} validation slices"]
    tiers = trust_tiers(trust)
    if NOT_MRI in tiers and "val_rate" in trust[NOT_MRI]:
        tier = trust[NOT_MRI]
        line = f"not_mri: flags {tier['val_rate']:.2%} of validation slices"
        if "variant_rate" in tier:
            line += f", {tier['variant_rate']:.2%} of {trust.get('n_variants', 0)} MRI-like variants"
        if "fit_negatives_flagged" in tier:
            line += f", {tier['fit_negatives_flagged']:.1%} of {trust.get('n_fit_negatives', 0)} generated non-MRI images"
        lines.append(line)
    elif NOT_MRI not in tiers:
        lines.append("not_mri: none (a one-tier model: refit with braintumor calibrate)")
    if isinstance(trust.get(ATYPICAL), dict) and "val_rate_by_predicted" in trust[ATYPICAL]:
        tier = trust[ATYPICAL]
        lines.append(f"atypical (target {tier['rate']:.0%} per class): by predicted class "
                     f"{_rates(tier['val_rate_by_predicted'])}; by true class {_rates(tier['val_rate_by_class'])}")
    elif "val_accepted" in trust:  # legacy one-tier entry
        lines.append(f"atypical (legacy, one threshold): accepts {trust['val_accepted']:.1%} of validation slices")
    return "\n".join(lines)


def fit_trust_for_checkpoint(checkpoint: str | os.PathLike, split_settings: Any, *,
                             out: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64,
                             workers: int = 0, write: bool = True, **options: Any) -> dict[str, Any]:
    """Fit onto a finished checkpoint (old one-tier checkpoints included) using its own run's training/validation
    split: ``split_settings`` is what :func:`braintumor.data.index.prepare_split` takes (the caller builds it from
    the configuration stored in the checkpoint: the trust layer does not read training configurations).
    Writes into ``out`` (in place when None) unless ``write`` is False; returns the trust entry. Whether writing
    in place is allowed is the caller's decision (``braintumor calibrate`` never writes a shipped file)."""
    from braintumor.data.index import prepare_split

    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    split = prepare_split(split_settings, progress=False)
    if split.classes != list(ckpt["classes"]):
        raise UserError(f"the data's classes {split.classes} differ from the checkpoint's {ckpt['classes']}")
    options.pop("accept_rate", None)
    trust = fit_trust(path, split.train_paths, split.train_labels, split.val_paths, split.val_labels,
                      classes=split.classes, device=device, batch_size=batch_size, workers=workers, **options)
    if write:
        store_trust(path, trust, out)
    return trust
