"""Out-of-distribution detection: Mahalanobis distance of a slice's pooled features to the training classes.

Lee et al. (2018, "A simple unified framework for detecting out-of-distribution samples and adversarial
attacks"): fit one mean per class and one shared covariance to the penultimate features of the training images;
an image's score is its smallest Mahalanobis distance to a class mean. Differences from the paper: only the
pooled output of the last block (the head's input) is used, with no input pre-processing (no gradient step), and
the covariance is Ledoit–Wolf shrunk (scikit-learn) because a 2048-d covariance from a few thousand images is
singular otherwise. The distance is divided by a threshold chosen on the validation split (by default the value
that accepts 95 % of validation slices), so ``ood_score`` > 1 means "out of distribution" for any model.

The detector is a small ``nn.Module`` (a whitening matrix and whitened class centres), so the same arithmetic
runs in PyTorch and inside the exported ONNX graph. Energy and maximum-softmax scores are here for comparison
(``benchmarks/ood.py`` measures all three); why Mahalanobis was chosen is in the README.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_ACCEPT_RATE = 0.95


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The torchvision ResNet's pooled last-block activations (B, D): the input of its ``fc`` head."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


class MahalanobisDetector(nn.Module):
    """Smallest Mahalanobis distance of features to a class mean, divided by the acceptance threshold."""

    def __init__(self, whitening: torch.Tensor, centers: torch.Tensor, threshold: float):
        super().__init__()
        self.register_buffer("whitening", whitening.float())  # (D, K): W W^T = inverse shared covariance
        self.register_buffer("centers", centers.float())  # (C, K): class means, whitened
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Smallest Mahalanobis distance (not squared) to a class mean, (B,)."""
        z = features.float() @ self.whitening
        squared = ((z[:, None, :] - self.centers[None, :, :]) ** 2).sum(dim=2)
        return squared.min(dim=1).values.clamp_min(0).sqrt()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.distance(features) / self.threshold

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores (tensors and numbers only, so ``weights_only`` loading works)."""
        return {"method": "mahalanobis", "whitening": self.whitening.cpu(), "centers": self.centers.cpu(),
                "threshold": float(self.threshold)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "MahalanobisDetector":
        if state.get("method") != "mahalanobis":
            raise ValueError(f"unknown OOD method {state.get('method')!r}")
        return cls(state["whitening"], state["centers"], state["threshold"])


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisDetector:
    """Class means and a Ledoit–Wolf shared covariance of training features; threshold 1 until calibrated."""
    from sklearn.covariance import LedoitWolf

    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    classes = np.unique(labels)
    means = np.zeros((int(labels.max()) + 1, features.shape[1]))
    for label in classes:
        means[label] = features[labels == label].mean(axis=0)
    centered = features - means[labels]
    covariance = LedoitWolf(assume_centered=True).fit(centered).covariance_
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-10)
    whitening = eigenvectors / np.sqrt(eigenvalues)  # x W: coordinates in which the covariance is the identity
    centers = means[classes] @ whitening  # classes absent from the data get no centre
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


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Negative free energy -logsumexp(logits) (Liu et al., 2020); higher = less like the training data."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (-torch.logsumexp(logits, dim=1)).numpy()


def max_softmax_score(logits: np.ndarray) -> np.ndarray:
    """1 - largest softmax probability (Hendrycks & Gimpel, 2017); higher = less like the training data."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (1.0 - torch.softmax(logits, dim=1).max(dim=1).values).numpy()


class ScoringNet(nn.Module):
    """A classifier network that also returns each image's ``ood_score`` (for PyTorch inference and ONNX export)."""

    def __init__(self, model: nn.Module, detector: MahalanobisDetector):
        super().__init__()
        self.model, self.detector = model, detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = pooled_features(self.model, images)
        return self.model.fc(features), self.detector(features)
