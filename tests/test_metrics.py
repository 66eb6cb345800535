"""Metrics against hand-computed values and the bootstrap against a plain loop."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from braintumor.evaluation import metrics
from braintumor.evaluation.report import format_table
from braintumor.errors import UserError

# 3 present classes + 1 absent, 10 samples. Confusion matrix (rows true, columns predicted):
#   [[2, 1, 1, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
NAMES = ["glioma", "meningioma", "pituitary", "notumor"]


def one_hot_probs(y_pred, num_classes, confidence=0.7):
    """Probabilities whose argmax is y_pred; the rest spread evenly."""
    probs = np.full((len(y_pred), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(y_pred)), y_pred] = confidence
    return probs


def test_metrics_match_hand_computed_values():
    m = metrics.compute_metrics(Y_TRUE, Y_PRED, one_hot_probs(Y_PRED, 4), NAMES, bootstrap=0)
    assert m["n"] == 10 and m["classes"] == NAMES
    assert m["accuracy"] == pytest.approx(6 / 10)
    # glioma: TP 2, FP 1, FN 2; meningioma: TP 2, FP 2, FN 1; pituitary: TP 2, FP 1, FN 1.
    expected = {"glioma": (2 / 3, 2 / 4, 4 / 7, 4), "meningioma": (2 / 4, 2 / 3, 4 / 7, 3),
                "pituitary": (2 / 3, 2 / 3, 2 / 3, 3), "notumor": (None, None, None, 0)}
    for name, (precision, recall, f1, support) in expected.items():
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["accuracy"] == pytest.approx(recall)  # fraction of the class's images classified correctly
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support
    # notumor is neither present nor predicted: its ratios are undefined (None, "n/a"), not 0 (a class the
    # model got all wrong); the terminal table says so.
    notumor_line = next(line for line in format_table(m).splitlines() if line.startswith("notumor"))
    assert notumor_line.split()[1:] == ["n/a", "n/a", "n/a", "n/a", "0", "n/a"]
    # Present but never predicted: recall 0, precision undefined; predicted but absent: precision 0, recall undefined.
    edge = metrics.compute_metrics([0, 1, 0], [0, 0, 2], None, ["a", "b", "c"], bootstrap=0)["per_class"]
    assert (edge["b"]["precision"], edge["b"]["recall"], edge["b"]["f1"]) == (None, 0.0, 0.0)
    c = edge["c"]
    assert (c["precision"], c["recall"], c["f1"], c["sensitivity"]) == (0.0, None, 0.0, None)
    # Macro over the classes present in y_true or y_pred (the absent "notumor" is left out, as sklearn does).
    assert m["macro_avg"]["precision"] == pytest.approx(11 / 18)
    assert m["macro_avg"]["recall"] == pytest.approx(11 / 18)
    assert m["macro_avg"]["f1"] == pytest.approx(38 / 63) == m["macro_f1"]
    assert m["weighted_avg"]["precision"] == pytest.approx(37 / 60)
    assert m["weighted_avg"]["recall"] == pytest.approx(0.6)
    assert m["weighted_avg"]["f1"] == pytest.approx(0.6)
    assert m["confusion_matrix"] == [[2, 1, 1, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(m["confusion_matrix_normalized"],
                               [[0.5, 0.25, 0.25, 0], [1 / 3, 2 / 3, 0, 0], [0, 1 / 3, 2 / 3, 0], [0, 0, 0, 0]])
    assert m["accuracy_ci95"] == pytest.approx(list(metrics.clopper_pearson(6, 10))) and m["macro_f1_ci95"] is None
    # Specificity: images of the other classes not predicted as this one; sensitivity is recall.
    assert m["per_class"]["glioma"]["specificity"] == pytest.approx(5 / 6)
    assert m["per_class"]["meningioma"]["specificity"] == pytest.approx(5 / 7)
    assert m["per_class"]["glioma"]["sensitivity"] == pytest.approx(2 / 4)
    assert m["per_class"]["notumor"]["sensitivity"] is None and m["per_class"]["notumor"]["specificity"] == 1.0
    assert m["roc_auc"]["notumor"] is None and m["per_class"]["notumor"]["roc_auc"] is None
    json.dumps(m, allow_nan=False)  # plain Python types only


def test_roc_auc_matches_sklearn_one_vs_rest_and_is_none_without_positives_or_negatives():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], 60)
    probs[np.arange(60), y_true] += 0.3  # some signal
    probs /= probs.sum(axis=1, keepdims=True)
    m = metrics.compute_metrics(y_true, probs.argmax(1), probs, ["a", "b", "c"], bootstrap=0)
    for k, name in enumerate("abc"):
        assert m["roc_auc"][name] == pytest.approx(roc_auc_score(y_true == k, probs[:, k]))
    assert m["roc_auc"]["macro"] == pytest.approx(roc_auc_score(y_true, probs, multi_class="ovr"))
    assert m["roc_auc_macro"] == m["roc_auc"]["macro"]
    # Only class 0 in y_true: class 0 has no negatives, classes 1 and 2 no positives -> all undefined.
    single = metrics.compute_metrics([0, 0, 0], [0, 1, 0], probs[:3], ["a", "b", "c"], bootstrap=0)
    assert single["roc_auc"] == {"a": None, "b": None, "c": None, "macro": None}


def test_expected_calibration_error_hand_computed():
    # 5 bins: (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]; confidences .9 .8 .7 .5 .4 .37 (.8 and .4 sit on edges).
    probs = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2],
             [0.5, 0.25, 0.25], [0.4, 0.3, 0.3], [0.3, 0.33, 0.37]]
    y_true = [0, 1, 1, 2, 0, 2]  # correct: yes, no, yes, no, yes, yes
    # bin (.2,.4]: acc 1, conf .385, n 2 | (.4,.6]: acc 0, conf .5, n 1 | (.6,.8]: acc .5, conf .75, n 2
    # | (.8,1]: acc 1, conf .9, n 1
    expected = (2 * 0.615 + 1 * 0.5 + 2 * 0.25 + 1 * 0.1) / 6
    assert metrics.expected_calibration_error(probs, y_true, n_bins=5) == pytest.approx(expected)
    bins = metrics.compute_metrics(y_true, np.argmax(probs, 1), probs, ["a", "b", "c"], bootstrap=0,
                                    n_bins=5)["reliability"]
    assert bins["count"] == [0, 2, 1, 2, 1]
    assert bins["accuracy"] == [None, 1.0, 0.0, 0.5, 1.0]
    assert bins["confidence"] == pytest.approx([None, 0.385, 0.5, 0.75, 0.9])
    # Confidence 0 falls in the first bin, 1 in the last; a perfectly calibrated set has ECE 0.
    assert metrics.expected_calibration_error([[1.0, 0.0], [1.0, 0.0]], [0, 0], n_bins=4) == 0.0
    with pytest.raises(ValueError, match="softmax"):
        metrics.expected_calibration_error([[3.0, -1.0]], [0])


def reference_bootstrap(y_true, y_pred, metric, n_resamples, seed):
    """Plain loop with the documented resampling scheme."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y_true), size=len(y_true))
        stats.append(metric(y_true[idx], y_pred[idx]))
    return tuple(np.percentile(stats, [2.5, 97.5]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["accuracy", "macro_f1"])
def test_bootstrap_ci_matches_plain_loop(name):
    rng = np.random.default_rng(3)
    y_true = np.append(rng.integers(0, 4, 99), [4, 4])  # a rare class, absent from many resamples
    y_pred = np.where(rng.random(101) < 0.7, y_true, rng.integers(0, 4, 101))
    sklearn_fn = {"accuracy": accuracy_score,
                  "macro_f1": lambda t, p: f1_score(t, p, average="macro", zero_division=0)}[name]
    expected = reference_bootstrap(y_true, y_pred, sklearn_fn, 300, seed=7)
    vectorized = metrics.bootstrap_ci(y_true, y_pred, getattr(metrics, name), 300, seed=7)
    looped = metrics.bootstrap_ci(y_true, y_pred, lambda t, p: sklearn_fn(t, p), 300, seed=7)
    np.testing.assert_allclose(vectorized, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(looped, expected, rtol=0, atol=1e-12)
    assert metrics.bootstrap_ci(y_true, y_pred, getattr(metrics, name), 300, seed=8) != vectorized


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0] * 5)
    y_pred = np.array([0, 1, 2, 1, 1, 2, 0, 0, 2, 0] * 5)  # 80 % correct
    widths = []
    for reps in (1, 20):
        t, p = np.tile(y_true, reps), np.tile(y_pred, reps)
        for fn in (metrics.accuracy, metrics.macro_f1):
            low, high = metrics.bootstrap_ci(t, p, fn, 500, seed=0)
            assert low <= fn(t, p) <= high
        widths.append(np.subtract(*metrics.bootstrap_ci(t, p, metrics.accuracy, 500, seed=0)[::-1]))
    assert widths[1] < widths[0] / 3  # ~1/sqrt(20) as wide
    m = metrics.compute_metrics(y_true, y_pred, None, ["a", "b", "c"], bootstrap=200, seed=1)
    assert m["macro_f1_ci95"] == list(metrics.bootstrap_ci(y_true, y_pred, metrics.macro_f1, 200, 1))
    assert "Clopper-Pearson" in m["intervals"]["accuracy_ci95"] and "bootstrap" in m["intervals"]["macro_f1_ci95"]
    assert m["ece"] is None and m["reliability"] is None and m["roc_auc_macro"] is None


def test_input_errors():
    with pytest.raises(UserError, match="0 images"):
        metrics.compute_metrics([], [], None, ["a", "b"])
    with pytest.raises(ValueError, match="labels in 0..1"):
        metrics.compute_metrics([0, 2], [0, 1], None, ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        metrics.compute_metrics([0, 1], [0, 1], np.ones((2, 3)) / 3, ["a", "b"])


def test_accuracy_interval_is_exact_and_never_zero_width():
    # 76 of 76 correct: the bootstrap gives 100-100 %; Clopper-Pearson gives (0.05/2)^(1/76) = 95.3 % to 100 %.
    m = metrics.compute_metrics([0] * 40 + [1] * 36, [0] * 40 + [1] * 36, None, ["a", "b"], bootstrap=0)
    low, high = m["accuracy_ci95"]
    assert low == pytest.approx(0.025 ** (1 / 76), abs=1e-9) and low == pytest.approx(0.9526, abs=1e-4)
    assert high == 1.0
    # Against the textbook beta-quantile form (an independent reference).
    from scipy.stats import beta

    low, high = metrics.clopper_pearson(7, 20)
    assert low == pytest.approx(beta.ppf(0.025, 7, 14)) and high == pytest.approx(beta.ppf(0.975, 8, 13))
