"""Two trust tiers computed inside the network: ``not_mri`` (not a brain MR slice at all) and ``atypical`` (a brain
slice unlike the training data).

:class:`ScoringNet` wraps a classifier; its forward returns ``(logits (B, C), scores (B, 2))`` with
``scores[:, 0]`` the not-MRI score and ``scores[:, 1]`` the atypical score, each already divided by its threshold so
that a score above :data:`braintumor.trust.status.FLAG_AT` (1) flags its tier. Everything is plain tensor
arithmetic (matrix products, gathers, ``where``), so the same graph runs in PyTorch, exports to ONNX (opset 17) and
is kept by a TorchScript trace. Anything non-finite (input pixels, features, logits, scores) gives +inf scores.

- ``not_mri`` — class-agnostic: the Mahalanobis distance of the slice's *feature statistics* (per-channel mean and
  standard deviation of the activations after each ResNet stage, ``layer1`` … ``layer4``, log-transformed) to one
  Gaussian fitted on the training slices (Ledoit–Wolf shrunk covariance), divided by a threshold set far out in
  the tail of real MRI (validation slices and generated MRI-like variants of them: windowings, flips, rotations,
  crops). Low-level statistics tell a photo, a page of text, noise or a blank apart from an MR slice whatever
  class the head would give it. An optional logistic direction (trained on generated non-MRI images vs training
  MRI) adds a second, supervised check; the score is the larger of the two ratios.
- ``atypical`` — class-conditional (Mondrian) conformal: the Mahalanobis distance of the pooled last-block
  features (the head's input) to the centre of the *predicted* class (Lee et al., 2018: class means, one shared
  Ledoit–Wolf covariance, no input pre-processing), divided by that class's own threshold: the conformal order
  statistic of the validation slices predicted as that class, so each class is flagged at about the same rate
  (2 % by default) instead of one class carrying most of the warnings.

Legacy checkpoints (one tier: ``trust["ood"]`` with method ``"mahalanobis"``, the smallest distance to any class
centre over one threshold) load as atypical-only; their not-MRI score is 0 (never flags) and
:func:`missing_tiers_note` says what they lack. The fitting lives in :mod:`braintumor.trust.fitting`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

NOT_MRI, ATYPICAL = "not_mri", "atypical"
TIERS = (NOT_MRI, ATYPICAL)
LAYERS = ("layer1", "layer2", "layer3", "layer4")
DEFAULT_ACCEPT_RATE = 0.95  # the legacy one-tier detector's acceptance (kept for old callers)
ATYPICAL_RATE = 0.02  # target share of each class's validation slices flagged atypical
NOT_MRI_RATE = 0.001  # conformal level of the not-MRI threshold on real MRI, before the margin
STATS_EPS = 1e-3  # log(x + eps) of the per-channel means and standard deviations
MISSING_NOT_MRI = "no not-MRI tier: refit with braintumor calibrate"


# --------------------------------------------------------------------------------------------- features


def backbone_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, D), statistics (B, 2 * sum of stage widths)) of a torchvision ResNet.

    ``pooled`` is the head's input (the last stage averaged over space). ``statistics`` are, for every stage
    ``layer1`` … ``layer4``, the per-channel spatial mean and standard deviation, as ``log(value + STATS_EPS)``.
    """
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    statistics = []
    for name in LAYERS:
        x = getattr(model, name)(x)
        flat = x.float().flatten(2)
        mean = flat.mean(dim=2)
        std = (flat - mean[:, :, None]).pow(2).mean(dim=2).clamp_min(0).sqrt()
        statistics += [mean, std]
    pooled = torch.flatten(model.avgpool(x), 1)
    return pooled, torch.log(torch.cat(statistics, dim=1).clamp_min(0) + STATS_EPS)


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The torchvision ResNet's pooled last-block activations (B, D): the input of its ``fc`` head."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def _tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"trust entry {name} must be a tensor, got {type(value).__name__}")
    if not torch.isfinite(value).all():
        raise ValueError(f"trust entry {name} holds non-finite values")
    return value.float()


def _number(value: Any, name: str, positive: bool = True) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"trust entry {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"trust entry {name} must be positive, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------- tiers


class MahalanobisDetector(nn.Module):
    """Mahalanobis distances of features to class centres in whitened coordinates (shared covariance).

    ``whitening`` (D, K) with W W^T = inverse covariance; ``centers`` (C, K) the class means, whitened. The
    legacy one-tier detector is this module with one threshold (``forward``: smallest distance / threshold).
    """

    def __init__(self, whitening: torch.Tensor, centers: torch.Tensor, threshold: float = 1.0):
        super().__init__()
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("centers", centers.float())
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def class_distances(self, features: torch.Tensor) -> torch.Tensor:
        """Distance (not squared) to every class centre, (B, C)."""
        z = features.float() @ self.whitening
        squared = ((z[:, None, :] - self.centers[None, :, :]) ** 2).sum(dim=2)
        return squared.clamp_min(0).sqrt()

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Smallest Mahalanobis distance to a class centre, (B,)."""
        return self.class_distances(features).min(dim=1).values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.distance(features) / self.threshold

    def state(self) -> dict[str, Any]:
        """The legacy one-tier entry (tensors and numbers only, so ``weights_only`` loading works)."""
        return {"method": "mahalanobis", "whitening": self.whitening.cpu(), "centers": self.centers.cpu(),
                "threshold": float(self.threshold)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "MahalanobisDetector":
        if not isinstance(state, dict) or state.get("method") != "mahalanobis":
            raise ValueError(f"unknown OOD method {state.get('method') if isinstance(state, dict) else state!r}")
        whitening, centers = _tensor(state.get("whitening"), "ood.whitening"), _tensor(state.get("centers"), "ood.centers")
        if whitening.ndim != 2 or centers.ndim != 2 or centers.shape[1] != whitening.shape[1]:
            raise ValueError("trust entry ood has mismatched whitening and centre shapes")
        return cls(whitening, centers, _number(state.get("threshold"), "ood.threshold"))


class AtypicalTier(nn.Module):
    """Mahalanobis distance of the pooled features to the predicted class's centre over that class's threshold
    (Mondrian conformal); ``nearest=True`` is the legacy rule (nearest centre, one threshold)."""

    def __init__(self, detector: MahalanobisDetector, thresholds: torch.Tensor, nearest: bool = False):
        super().__init__()
        self.detector = detector
        self.register_buffer("thresholds", thresholds.float().reshape(-1))
        self.nearest = bool(nearest)

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        distances = self.detector.class_distances(pooled)
        if self.nearest:
            return distances.min(dim=1).values / self.thresholds[0]
        predicted = logits.argmax(dim=1, keepdim=True)
        own = torch.gather(distances, 1, predicted).squeeze(1)
        return own / self.thresholds[predicted.squeeze(1)]

    def state(self) -> dict[str, Any]:
        if self.nearest:
            return self.detector.state() | {"threshold": float(self.thresholds[0])}
        return {"method": "mahalanobis-mondrian", "whitening": self.detector.whitening.cpu(),
                "centers": self.detector.centers.cpu(), "thresholds": self.thresholds.cpu()}


class GaussianBlock(nn.Module):
    """Mahalanobis distance of ``statistics[:, start:stop]`` to one Gaussian, divided by its threshold."""

    def __init__(self, start: int, stop: int, center: torch.Tensor, whitening: torch.Tensor, threshold: float):
        super().__init__()
        self.start, self.stop = int(start), int(stop)
        self.register_buffer("center", center.float().reshape(-1))
        self.register_buffer("whitening", whitening.float())
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def distance(self, statistics: torch.Tensor) -> torch.Tensor:
        z = (statistics[:, self.start:self.stop].float() - self.center) @ self.whitening
        return (z * z).sum(dim=1).clamp_min(0).sqrt()

    def forward(self, statistics: torch.Tensor) -> torch.Tensor:
        return self.distance(statistics) / self.threshold

    def state(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "center": self.center.cpu(),
                "whitening": self.whitening.cpu(), "threshold": float(self.threshold)}


# An input whose pixel values span fewer 8-bit levels than this is blank, not a slice: no brain MR slice is one
# flat value (its 8-bit conversion stretches the content over the levels). Fixed, not fitted.
BLANK_LEVELS = 4.0


def pixel_checks(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(colourfulness, blankness), each (B,), of a preprocessed batch, from its un-normalized pixels:

    - colourfulness: the mean absolute difference between the colour channels in 8-bit levels; 0 for a gray image
      (every MR slice is one: on the training data at most 2.6 levels, JPEG chroma noise);
    - blankness: BLANK_LEVELS over the range of the pixel values in 8-bit levels; above 1 for an image that spans
      fewer than BLANK_LEVELS levels (black, white, any flat colour), about 0.016 for a full-range slice."""
    pixels = images.float() * std.reshape(1, 3, 1, 1) + mean.reshape(1, 3, 1, 1)
    red, green, blue = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    difference = (red - green).abs() + (green - blue).abs() + (red - blue).abs()
    colour = difference.flatten(1).mean(dim=1) * (255.0 / 3.0)
    levels = (pixels.flatten(1).amax(dim=1) - pixels.flatten(1).amin(dim=1)) * 255.0
    return colour, BLANK_LEVELS / levels.clamp(min=1e-3)


class ColourCheck(nn.Module):
    """The pixel checks of the not-MRI tier (:func:`pixel_checks`): colourfulness over a threshold (brain MR
    slices are gray) and blankness (no slice is one flat value); the larger of the two."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, threshold: float):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).float().reshape(3))
        self.register_buffer("std", torch.as_tensor(std).float().reshape(3))
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colour, blank = pixel_checks(images, self.mean, self.std)
        return torch.maximum(colour / self.threshold, blank)

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean.cpu(), "std": self.std.cpu(), "threshold": float(self.threshold)}


class NotMriTier(nn.Module):
    """Class-agnostic: the largest, over blocks of the feature statistics (one per ResNet stage, or one for all),
    of the block's Mahalanobis distance to the training Gaussian over the block's threshold; with a logistic
    direction also sigmoid(logit) / sigmoid(logit threshold)."""

    def __init__(self, blocks: list[GaussianBlock], weight: torch.Tensor | None = None, bias: float = 0.0,
                 logit_threshold: float = 0.0, colour: ColourCheck | None = None):
        super().__init__()
        if not blocks:
            raise ValueError("the not-MRI tier needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.colour = colour
        self.logistic = weight is not None
        size = max(block.stop for block in blocks)
        self.register_buffer("weight", (weight if weight is not None else torch.zeros(size)).float().reshape(-1))
        self.register_buffer("bias", torch.tensor(float(bias)))
        self.register_buffer("logit_threshold", torch.tensor(float(logit_threshold)))

    def logit(self, statistics: torch.Tensor) -> torch.Tensor:
        return statistics.float() @ self.weight + self.bias

    def forward(self, statistics: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        score = torch.stack([block(statistics) for block in self.blocks], dim=1).amax(dim=1)
        if self.colour is not None and images is not None:
            score = torch.maximum(score, self.colour(images))
        if self.logistic:
            supervised = torch.sigmoid(self.logit(statistics)) / torch.sigmoid(self.logit_threshold)
            score = torch.maximum(score, supervised)
        return score

    def state(self) -> dict[str, Any]:
        state = {"method": "gaussian-statistics", "blocks": [block.state() for block in self.blocks]}
        if self.colour is not None:
            state["colour"] = self.colour.state()
        if self.logistic:
            state.update(weight=self.weight.cpu(), bias=float(self.bias), logit_threshold=float(self.logit_threshold))
        return state


class TrustHead(nn.Module):
    """Both tiers; a missing tier scores 0 (never flags). forward -> (B, 2) [not_mri, atypical]."""

    def __init__(self, not_mri: NotMriTier | None = None, atypical: AtypicalTier | None = None):
        super().__init__()
        self.not_mri, self.atypical = not_mri, atypical

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(name for name in TIERS if getattr(self, name) is not None)

    def forward(self, pooled: torch.Tensor, statistics: torch.Tensor, logits: torch.Tensor,
                images: torch.Tensor | None = None) -> torch.Tensor:
        zeros = logits[:, 0].float() * 0
        not_mri = self.not_mri(statistics, images) if self.not_mri is not None else zeros
        atypical = self.atypical(pooled, logits) if self.atypical is not None else zeros
        return torch.stack([not_mri, atypical], dim=1).float()


def _finite_rows(tensor: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(tensor.float().flatten(1)).all(dim=1)


class ScoringNet(nn.Module):
    """A classifier network with its trust head: forward(images) -> (logits (B, C), scores (B, 2) float32).

    scores[:, 0] = not_mri_score, scores[:, 1] = atypical_score, normalized (> FLAG_AT flags); non-finite input
    pixels, features or logits give +inf scores. What runs in PyTorch, what ONNX exports ("logits",
    "trust_scores") and what a TorchScript trace keeps.
    """

    def __init__(self, model: nn.Module, head: TrustHead):
        super().__init__()
        if isinstance(head, MahalanobisDetector):  # the 0.1 signature ScoringNet(model, detector): legacy tier
            head = TrustHead(None, AtypicalTier(head, head.threshold.reshape(1), nearest=True))
        self.model, self.head = model, head

    @property
    def tiers(self) -> tuple[str, ...]:
        return self.head.tiers

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, statistics = backbone_features(self.model, images)
        logits = self.model.fc(pooled)
        scores = self.head(pooled, statistics, logits, images)
        finite = _finite_rows(images) & _finite_rows(pooled) & _finite_rows(logits) & _finite_rows(scores)
        scores = torch.where(finite[:, None], scores, torch.full_like(scores, float("inf")))
        return logits, scores


# --------------------------------------------------------------------------------------------- state


def _not_mri_from_state(state: dict[str, Any]) -> NotMriTier:
    if not isinstance(state, dict) or state.get("method") != "gaussian-statistics":
        raise ValueError(f"unknown not_mri method {state.get('method') if isinstance(state, dict) else state!r}")
    blocks = state.get("blocks")
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError("trust entry not_mri.blocks must be a non-empty list")
    built = []
    for k, block in enumerate(blocks):
        name = f"not_mri.blocks[{k}]"
        if not isinstance(block, dict):
            raise ValueError(f"trust entry {name} must be a dict")
        start, stop = block.get("start"), block.get("stop")
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
            raise ValueError(f"trust entry {name} has a bad range {start!r}..{stop!r}")
        center, whitening = _tensor(block.get("center"), name + ".center"), _tensor(block.get("whitening"), name + ".whitening")
        if center.ndim != 1 or center.shape[0] != stop - start or whitening.ndim != 2 or whitening.shape[0] != stop - start:
            raise ValueError(f"trust entry {name} has mismatched shapes")
        built.append(GaussianBlock(start, stop, center, whitening, _number(block.get("threshold"), name + ".threshold")))
    weight = state.get("weight")
    if weight is not None:
        weight = _tensor(weight, "not_mri.weight").reshape(-1)
        if weight.shape[0] < max(block.stop for block in built):
            raise ValueError("trust entry not_mri.weight does not match the statistics' size")
    colour = state.get("colour")
    if colour is not None:
        if not isinstance(colour, dict):
            raise ValueError("trust entry not_mri.colour must be a dict")
        mean, std = _tensor(colour.get("mean"), "not_mri.colour.mean"), _tensor(colour.get("std"), "not_mri.colour.std")
        if mean.numel() != 3 or std.numel() != 3 or not (std > 0).all():
            raise ValueError("trust entry not_mri.colour needs 3 means and 3 positive standard deviations")
        colour = ColourCheck(mean, std, _number(colour.get("threshold"), "not_mri.colour.threshold"))
    return NotMriTier(built, weight, _number(state.get("bias", 0.0), "not_mri.bias", positive=False),
                      _number(state.get("logit_threshold", 0.0), "not_mri.logit_threshold", positive=False), colour)


def _atypical_from_state(state: dict[str, Any]) -> AtypicalTier:
    if not isinstance(state, dict) or state.get("method") != "mahalanobis-mondrian":
        raise ValueError(f"unknown atypical method {state.get('method') if isinstance(state, dict) else state!r}")
    detector = MahalanobisDetector.from_state({"method": "mahalanobis", "whitening": state.get("whitening"),
                                               "centers": state.get("centers"), "threshold": 1.0})
    thresholds = _tensor(state.get("thresholds"), "atypical.thresholds").reshape(-1)
    if thresholds.shape[0] != detector.centers.shape[0] or not (thresholds > 0).all():
        raise ValueError("trust entry atypical.thresholds must hold one positive threshold per class")
    return AtypicalTier(detector, thresholds)


def trust_tiers(state: dict[str, Any] | None) -> tuple[str, ...]:
    """Which tiers a checkpoint's ``trust`` entry holds: ("not_mri", "atypical") for a two-tier model,
    ("atypical",) for a legacy one-tier one, () when nothing was fitted."""
    if not isinstance(state, dict):
        return ()
    tiers = [name for name in TIERS if isinstance(state.get(name), dict)]
    if ATYPICAL not in tiers and isinstance(state.get("ood"), dict):
        tiers.append(ATYPICAL)
    return tuple(name for name in TIERS if name in tiers)


def trust_head_from_state(state: dict[str, Any] | None) -> TrustHead | None:
    """The :class:`TrustHead` of a checkpoint's ``trust`` entry (None when it has no tier). Raises ValueError
    for a malformed entry (callers turn it into one line naming the file)."""
    if state is not None and not isinstance(state, dict):
        raise ValueError(f"trust must be a dict, got {type(state).__name__}")
    for key in (NOT_MRI, ATYPICAL, "ood"):
        if state is not None and key in state and not isinstance(state[key], dict):
            raise ValueError(f"trust entry {key} must be a dict of fitted statistics, got {type(state[key]).__name__}")
    tiers = trust_tiers(state)
    if not tiers:
        return None
    not_mri = _not_mri_from_state(state[NOT_MRI]) if NOT_MRI in state else None
    if isinstance(state.get(ATYPICAL), dict):
        atypical = _atypical_from_state(state[ATYPICAL])
    elif ATYPICAL in tiers:  # legacy: trust["ood"]
        detector = MahalanobisDetector.from_state(state["ood"])
        atypical = AtypicalTier(detector, detector.threshold.reshape(1), nearest=True)
    else:
        atypical = None
    return TrustHead(not_mri, atypical).eval()


def missing_tiers_note(state: dict[str, Any] | None) -> str | None:
    """What a model's trust entry lacks, in one phrase for users (None when both tiers are there)."""
    tiers = trust_tiers(state)
    if not tiers:
        return "no trust tiers fitted: refit with braintumor calibrate"
    if NOT_MRI not in tiers:
        return MISSING_NOT_MRI
    if ATYPICAL not in tiers:
        return "no atypical tier: refit with braintumor calibrate"
    return None


def trust_summary(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON-able part of a trust entry (numbers, strings, lists: no tensors), e.g. for export metadata."""
    if not isinstance(state, dict):
        return None

    def plain(value):
        if isinstance(value, torch.Tensor):
            return None
        if isinstance(value, dict):
            kept = {key: plain(item) for key, item in value.items()}
            return {key: item for key, item in kept.items() if item is not None}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    summary = plain({key: value for key, value in state.items() if key != "ood"})
    summary["tiers"] = list(trust_tiers(state))
    return summary


# --------------------------------------------------------------------------------------------- fitting helpers


def _shrunk_whitening(centered: np.ndarray) -> np.ndarray:
    """W with W W^T = inverse of the Ledoit–Wolf shrunk covariance of already centred rows (float64)."""
    from sklearn.covariance import ledoit_wolf
    from threadpoolctl import threadpool_limits

    # One BLAS thread: on a busy 2-core machine a threaded eigh of a 1000-d matrix is ten times slower.
    with threadpool_limits(1):
        covariance, _ = ledoit_wolf(centered, assume_centered=True)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-10)
    return eigenvectors / np.sqrt(eigenvalues)  # x W: coordinates in which the covariance is the identity


def whiten(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), whitening (D, D)) of a Ledoit–Wolf shrunk covariance: (x - mean) W has identity covariance."""
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(axis=0)
    return mean, _shrunk_whitening(features - mean)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisDetector:
    """Class means and a Ledoit–Wolf shared covariance of training features; threshold 1 until calibrated."""
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    means = np.zeros((int(labels.max()) + 1, features.shape[1]))
    for label in np.unique(labels):
        means[label] = features[labels == label].mean(axis=0)
    whitening = _shrunk_whitening(features - means[labels])
    centers = means @ whitening  # a class absent from the data keeps a centre at the origin (never nearest in practice)
    return MahalanobisDetector(torch.from_numpy(whitening), torch.from_numpy(centers), 1.0)


def acceptance_threshold(scores: np.ndarray, accept_rate: float = DEFAULT_ACCEPT_RATE) -> float:
    """The score below or at which ``accept_rate`` of in-distribution ``scores`` fall (conformal order statistic).

    The ceil((n + 1) * rate)-th smallest score: on new in-distribution data at least ``accept_rate`` is accepted on
    average (split-conformal guarantee), rather than slightly less as with the plain quantile.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    if len(scores) == 0 or not 0 < accept_rate < 1:
        raise ValueError("need validation scores and 0 < accept_rate < 1")
    rank = min(len(scores), int(np.ceil((len(scores) + 1) * accept_rate)))
    return float(scores[rank - 1])


def mondrian_thresholds(scores: np.ndarray, groups: np.ndarray, n_groups: int,
                        rate: float = ATYPICAL_RATE) -> tuple[np.ndarray, np.ndarray]:
    """Per-group conformal thresholds (Mondrian conformal prediction: one calibration per group).

    For each group g, the conformal order statistic of the scores in g at acceptance 1 - ``rate``: a new score
    of group g exceeds it with probability at most ``rate`` (exchangeability within the group). A group without
    scores takes the threshold of all scores pooled. Returns (thresholds (n_groups,), counts (n_groups,)).
    """
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(groups)
    pooled = acceptance_threshold(scores, 1.0 - rate)
    thresholds, counts = np.full(n_groups, pooled), np.zeros(n_groups, dtype=int)
    for group in range(n_groups):
        mine = scores[groups == group]
        counts[group] = len(mine)
        if len(mine):
            thresholds[group] = acceptance_threshold(mine, 1.0 - rate)
    return np.maximum(thresholds, 1e-12), counts


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Negative free energy -logsumexp(logits) (Liu et al., 2020); higher = less like the training data."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (-torch.logsumexp(logits, dim=1)).numpy()


def max_softmax_score(logits: np.ndarray) -> np.ndarray:
    """1 - largest softmax probability (Hendrycks & Gimpel, 2017); higher = less like the training data."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (1.0 - torch.softmax(logits, dim=1).max(dim=1).values).numpy()
