"""Classification metrics (scikit-learn), confidence intervals and calibration error.

Accuracy gets an exact Clopper–Pearson binomial interval (scipy), which never collapses to zero width (76 of 76
correct gives 95.3–100 %); macro-F1, which is not a binomial proportion, keeps the percentile bootstrap.

Metric dicts hold only plain Python types, so they go to JSON as they are; None marks a value undefined for
the data (e.g. the ROC-AUC of a class without positives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)

from braintumor.errors import UserError


def _macro_f1_batch(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    # One confusion matrix per row via a single bincount; macro over the labels present in the row's
    # y_true or y_pred, with F1 = 2TP / (2TP + FP + FN) and 0 where undefined: sklearn's f1_score(average="macro").
    rows, num_classes = y_true.shape[0], int(max(y_true.max(), y_pred.max())) + 1
    flat = (np.arange(rows)[:, None] * num_classes + y_true) * num_classes + y_pred
    cm = np.bincount(flat.ravel(), minlength=rows * num_classes**2).reshape(rows, num_classes, num_classes)
    denominator = cm.sum(axis=2) + cm.sum(axis=1)  # 2TP + FP + FN = true count + predicted count
    f1 = np.divide(2 * np.diagonal(cm, axis1=1, axis2=2), denominator, out=np.zeros(denominator.shape),
                   where=denominator > 0)
    return f1.sum(axis=1) / (denominator > 0).sum(axis=1)


def accuracy(y_true, y_pred) -> float:
    """Fraction of samples predicted correctly (sklearn accuracy_score)."""
    return float(accuracy_score(y_true, y_pred))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the classes present in y_true or y_pred (sklearn f1_score, average="macro")."""
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


# bootstrap_ci uses these vectorized twins, one row per resample (tested against the sklearn functions).
accuracy.batch = lambda y_true, y_pred: (y_true == y_pred).mean(axis=1)
macro_f1.batch = _macro_f1_batch


def bootstrap_ci(y_true, y_pred, metric_fn: Callable, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of metric_fn(y_true, y_pred) over resampled samples.

    Resample r draws ``rng.integers(0, n, size=n)`` from ``numpy.random.default_rng(seed)`` in order r = 0, 1, ...;
    the bounds are numpy's linear-interpolated percentiles at (1 - level) / 2 and (1 + level) / 2. A metric_fn
    with a ``.batch`` attribute (``accuracy``, ``macro_f1``) is evaluated for many resamples at once.
    """
    y_true, y_pred, n = np.asarray(y_true), np.asarray(y_pred), len(y_true)
    if n == 0 or len(y_pred) != n or not 0 < level < 1 or n_resamples < 1:
        raise ValueError(f"bootstrap_ci needs equal non-empty inputs, 0 < level < 1, n_resamples >= 1 "
                         f"(got {n}, {len(y_pred)}, {level}, {n_resamples})")
    rng, batch_fn, stats = np.random.default_rng(seed), getattr(metric_fn, "batch", None), np.empty(n_resamples)
    chunk = max(1, min(n_resamples, 2_000_000 // n))  # bounds the index matrix's memory for large sets
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = np.stack([rng.integers(0, n, size=n) for _ in range(stop - start)])
        stats[start:stop] = batch_fn(y_true[idx], y_pred[idx]) if batch_fn else [
            metric_fn(y_true[row], y_pred[row]) for row in idx]
    low, high = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) confidence interval of a binomial proportion (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def reliability_bins(probabilities, y_true, n_bins: int) -> dict:
    """Top-label calibration per equal-width confidence bin: edges, count, accuracy, mean confidence."""
    probabilities, y_true = np.asarray(probabilities, dtype=float), np.asarray(y_true)
    if probabilities.ndim != 2 or len(probabilities) != len(y_true) or len(y_true) == 0 or n_bins < 1:
        raise ValueError("need probabilities (n, C) matching non-empty y_true (n,) and n_bins >= 1")
    confidence = probabilities.max(axis=1)
    if confidence.min() < -1e-6 or confidence.max() > 1 + 1e-6:
        raise ValueError("probabilities must lie in [0, 1] (apply softmax to logits first)")
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i is (edges[i], edges[i+1]]; confidence 0 joins the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    bin_accuracy, bin_confidence = (np.bincount(which, weights=w, minlength=n_bins) / np.maximum(count, 1)
                                    for w in (correct, confidence))
    return {"bin_edges": edges.tolist(), "count": count.tolist(),
            "accuracy": [float(a) if c else None for c, a in zip(count, bin_accuracy)],
            "confidence": [float(a) if c else None for c, a in zip(count, bin_confidence)],
            "ece": float(np.sum(count / len(y_true) * np.abs(bin_accuracy - bin_confidence)))}


def expected_calibration_error(probabilities, y_true, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (bin fraction) * |bin accuracy - bin confidence|.

    Confidence = largest probability, prediction = its argmax; bin i is (i/n_bins, (i+1)/n_bins], 0 in bin 0.
    """
    return reliability_bins(probabilities, y_true, n_bins)["ece"]


def compute_metrics(y_true, y_pred, probabilities, class_names: Sequence[str], *, bootstrap: int = 1000,
                    seed: int = 0, n_bins: int = 15, uncalibrated_probabilities=None) -> dict:
    """All evaluation metrics as a JSON-safe dict (see module docstring); probabilities may be None.

    Per-class accuracy is the fraction of that class's images classified correctly (= its recall). Per-class
    rows cover every class, present or not; a ratio with nothing to count is None (n/a), not 0: accuracy, recall
    and sensitivity of a class with no images, precision of a class never predicted, F1 of a class neither present
    nor predicted (a class present but never predicted has F1 0, one predicted but absent F1 0); macro averages
    run over the classes present in y_true or y_pred (scikit-learn's convention), and the macro ROC-AUC over the
    classes where one-vs-rest AUC is defined. bootstrap=0 skips the macro-F1 interval (None); the accuracy interval is exact (Clopper–Pearson) and always
    there. Sensitivity is a class's recall, specificity the fraction of the other classes' images not predicted
    as it. ``uncalibrated_probabilities`` (before temperature scaling) adds ``ece_uncalibrated``.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    names, labels = list(class_names), list(range(len(class_names)))
    if len(y_true) == 0:
        raise UserError("nothing to evaluate: the set holds 0 images")
    if len(y_pred) != len(y_true) or min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) \
            >= len(names):
        raise ValueError(f"y_true/y_pred must have equal length and labels in 0..{len(names) - 1}")
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=0)
    averages = {}
    for average in ("macro", "weighted"):
        values = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)[:3]
        averages[average] = dict(zip(("precision", "recall", "f1"), map(float, values)))
    class_auc: dict[str, float | None] = {name: None for name in names}
    reliability = None
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=float)
        if probabilities.shape != (len(y_true), len(names)):
            raise ValueError(f"probabilities shape {probabilities.shape} != {(len(y_true), len(names))}")
        reliability = reliability_bins(probabilities, y_true, n_bins)
        for k, name in enumerate(names):
            positives = y_true == k
            defined = 0 < positives.sum() < len(y_true)  # AUC needs both positives and negatives
            class_auc[name] = float(roc_auc_score(positives, probabilities[:, k])) if defined else None
    defined_auc = [v for v in class_auc.values() if v is not None]
    roc_auc = {**class_auc, "macro": float(np.mean(defined_auc)) if defined_auc else None}
    macro_f1_ci = list(bootstrap_ci(y_true, y_pred, macro_f1, bootstrap, seed)) if bootstrap else None
    cis = {"accuracy_ci95": list(clopper_pearson(int((y_true == y_pred).sum()), len(y_true))),
           "macro_f1_ci95": macro_f1_ci}
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    predicted = matrix.sum(axis=0)  # images predicted as each class

    def defined(value: float, count: int) -> float | None:
        return float(value) if count else None  # a ratio over nothing: undefined

    negatives = len(y_true) - matrix.sum(axis=1)
    false_positives = matrix.sum(axis=0) - np.diagonal(matrix)
    specificity = [float((negatives[k] - false_positives[k]) / negatives[k]) if negatives[k] else None
                   for k in labels]
    ece_uncalibrated = None
    if uncalibrated_probabilities is not None:
        ece_uncalibrated = reliability_bins(uncalibrated_probabilities, y_true, n_bins)["ece"]
    return {
        "n": int(len(y_true)), "classes": names,
        "accuracy": accuracy(y_true, y_pred), "accuracy_ci95": cis["accuracy_ci95"],
        "macro_f1": averages["macro"]["f1"], "macro_f1_ci95": cis["macro_f1_ci95"],
        "per_class": {name: {"accuracy": defined(recall[k], support[k]),
                             "precision": defined(precision[k], predicted[k]),
                             "recall": defined(recall[k], support[k]),
                             "f1": defined(f1[k], support[k] + predicted[k]), "support": int(support[k]),
                             "roc_auc": class_auc[name], "sensitivity": defined(recall[k], support[k]),
                             "specificity": specificity[k]} for k, name in enumerate(names)},
        "macro_avg": averages["macro"], "weighted_avg": averages["weighted"],
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_normalized": confusion_matrix(y_true, y_pred, labels=labels,
                                                        normalize="true").tolist(),
        "roc_auc": roc_auc, "roc_auc_macro": roc_auc["macro"],
        "ece": None if reliability is None else reliability.pop("ece"), "ece_uncalibrated": ece_uncalibrated,
        "reliability": reliability,
        "bootstrap": {"n_resamples": int(bootstrap), "seed": int(seed), "level": 0.95},
        "intervals": {"accuracy_ci95": "exact Clopper-Pearson binomial interval",
                      "macro_f1_ci95": f"percentile bootstrap over images ({int(bootstrap)} resamples, seed {seed})"
                      if bootstrap else None},
    }
