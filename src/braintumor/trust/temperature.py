"""Temperature scaling (Guo et al., 2017): one scalar T > 0 that divides the logits, fitted on validation data.

Dividing every logit by the same positive T never changes which class is largest, so accuracy is untouched; only
the confidence moves (T > 1 softens an over-confident model). T minimizes the validation negative log-likelihood,
found by scipy's bounded scalar search over log T (T between 0.05 and 20).
"""

from __future__ import annotations

import numpy as np
import torch

LOG_T_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))


def negative_log_likelihood(logits, labels, temperature: float) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against integer labels."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels))


def fit_temperature(logits, labels) -> float:
    """The temperature that minimizes the negative log-likelihood of ``labels`` under softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError("need logits (n, C) and n labels, n >= 1")
    def objective(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, float(np.exp(log_t)))

    result = minimize_scalar(objective, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    # Brent's bounded search never evaluates the bounds themselves: when the optimum lies beyond one (perfectly
    # separated logits), it stops short of it. Return the bound then, so callers can tell (temperature_at_bound).
    best = min((result.x, *LOG_T_BOUNDS), key=objective)
    return float(np.exp(best))


def temperature_at_bound(temperature: float) -> bool:
    """Whether a fitted temperature sits on a bound of the search (the validation set cannot calibrate it)."""
    return min(abs(float(np.log(temperature)) - bound) for bound in LOG_T_BOUNDS) < 1e-6


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, float32."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    return torch.softmax(logits / float(temperature), dim=1).numpy()
