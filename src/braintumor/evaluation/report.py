"""Evaluation reports: report.md / report.json with their figures (drawn by ``figures``), the terminal table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from braintumor import RESEARCH_NOTE
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import json_safe, write_json
from braintumor.visualize.figures import plot_confusion_matrix
from braintumor.visualize.figures import plot_reliability as plot_reliability_bins
from braintumor.evaluation.metrics import reliability_bins


def plot_reliability(probabilities, y_true, path, n_bins: int = 15) -> Path:
    """Reliability diagram PNG: accuracy per confidence bin against the diagonal, counts below, ECE in the title."""
    bins = reliability_bins(probabilities, y_true, n_bins)
    return plot_reliability_bins(bins, bins["ece"], path)


def _snake(key) -> str:
    """A report key as snake_case ("leak-free subset" -> "leak_free_subset")."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", str(key)).strip("_").lower() or "value"


def _snake_keys(mapping: dict) -> dict:
    return {_snake(key): value for key, value in mapping.items()}


def _fmt(value) -> str:
    """A number with 4 decimals, a (low, high) interval, or n/a for None."""
    if isinstance(value, (list, tuple)):
        return f"{value[0]:.4f} – {value[1]:.4f}"
    return "n/a" if value is None else f"{value:.4f}"


def _table(header: Sequence, rows: Sequence[Sequence]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


_SUBSET_ROWS = (("Images (n)", lambda m: m["n"]), ("Accuracy", lambda m: _fmt(m["accuracy"])),
                ("Accuracy 95 % CI", lambda m: _fmt(m["accuracy_ci95"])),
                ("Macro-F1", lambda m: _fmt(m["macro_f1"])),
                ("Macro-F1 95 % CI", lambda m: _fmt(m["macro_f1_ci95"])),
                ("Weighted F1", lambda m: _fmt(m["weighted_avg"]["f1"])), ("ECE", lambda m: _fmt(m["ece"])),
                ("ECE before temperature scaling", lambda m: _fmt(m.get("ece_uncalibrated"))),
                ("Macro ROC-AUC", lambda m: _fmt(m["roc_auc_macro"])))


def _status_counts(m: dict) -> str | None:
    """"ok 94 (94.0%), atypical 6 (6.0%), ..." from the trust metrics, or None for a model without trust tiers."""
    trust = m.get("trust") or {}
    if not trust.get("tiers"):
        return None
    n = max(m["n"], 1)
    return ", ".join(f"{status} {count} ({count / n:.1%})" for status, count in trust["statuses"].items())


def _trust_lines(m: dict) -> list[str]:
    if "trust" not in m:
        return []
    counts = _status_counts(m)
    if counts is None:
        return ["- Trust tiers: none (the model has no fitted trust scores; see `braintumor calibrate`)"]
    accuracy = m["trust"]["accuracy_by_status"]
    shown = [f"{status} {_fmt(value)}" for status, value in accuracy.items() if value is not None]
    return [f"- Status of the slices: {counts}; accuracy by status: {', '.join(shown)} (rates per class below, "
            "under Notes)"]


def _markdown(metrics: dict, title: str, extra: dict, subsets: dict, has_reliability: bool,
              figures: Sequence[str] = ()) -> str:
    boot, names, m = metrics.get("bootstrap") or {}, metrics["classes"], metrics
    calibration = ""
    if m.get("ece_uncalibrated") is not None:
        calibration = f" (before temperature scaling: {_fmt(m['ece_uncalibrated'])})"
    lines = [f"# {title}", "", f"> **{RESEARCH_NOTE}**", "", "## Summary", "", f"- Images evaluated: {m['n']}",
             f"- Accuracy: {_fmt(m['accuracy'])} (95 % CI {_fmt(m['accuracy_ci95'])}, exact Clopper–Pearson)",
             f"- Macro-F1: {_fmt(m['macro_f1'])} (95 % CI {_fmt(m['macro_f1_ci95'])}, bootstrap)",
             f"- Expected calibration error: {_fmt(m['ece'])}{calibration}",
             f"- Macro ROC-AUC (one-vs-rest): {_fmt(m['roc_auc_macro'])}", *_trust_lines(m), "",
             "Confidence intervals: accuracy, an exact Clopper–Pearson binomial interval; macro-F1, a percentile "
             f"bootstrap over images ({boot.get('n_resamples', 0)} resamples, seed {boot.get('seed')}). "
             "ECE: top-label, equal-width confidence bins.", ""]
    if subsets:
        rows = [(label, *map(get, subsets.values())) for label, get in _SUBSET_ROWS]
        lines += ["## Side by side", "", *_table(["Metric", *subsets], rows), ""]
    rows = [(name, _fmt(c["accuracy"]), _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c.get("specificity")),
             _fmt(c["f1"]), c["support"], _fmt(c["roc_auc"])) for name, c in m["per_class"].items()]
    rows += [(f"**{label} avg**", "", _fmt(m[f"{label}_avg"]["precision"]), _fmt(m[f"{label}_avg"]["recall"]), "",
              _fmt(m[f"{label}_avg"]["f1"]), m["n"], auc)
             for label, auc in (("macro", _fmt(m["roc_auc_macro"])), ("weighted", ""))]
    lines += ["## Per class", "", *_table(["Class", "Accuracy", "Precision", "Sensitivity (recall)", "Specificity",
                                           "F1", "Support", "ROC-AUC"], rows), "",
              "Per-class accuracy is the fraction of that class's images classified correctly (equal to its "
              "recall, the sensitivity); specificity is the fraction of the other classes' images not predicted "
              "as this class. ROC-AUC is one-vs-rest on the predicted probabilities. n/a: a ratio with nothing "
              "to count (accuracy and sensitivity of a class the set holds no images of, precision of a class "
              "never predicted, ROC-AUC of a class absent or alone in the set). Macro averages weigh the classes "
              "present or predicted equally, weighted averages by support.", "", "## Confusion matrix", "",
              "Counts; rows are the true class, columns the predicted class.", "",
              *_table(["true \\ predicted", *names], [(n, *r) for n, r in zip(names, m["confusion_matrix"])]),
              "", "![Confusion matrix (counts and row %)](confusion_matrix.png)", ""]
    if has_reliability:
        lines += ["## Calibration", "", "![Reliability diagram](reliability.png)", ""]
    for figure, heading, text in (("roc_curves.png", "ROC curves", "One-vs-rest, per class."),
                                  ("worst_mistakes.png", "Worst mistakes",
                                   "The misclassified slices with the highest loss, each beside its Grad-CAM for "
                                   "the predicted class; every image's result is in predictions.csv.")):
        if figure in figures:
            lines += [f"## {heading}", "", text, "", f"![{heading}]({figure})", ""]
    if extra:
        lines += ["## Notes", ""]
        for key, value in json_safe(extra).items():
            key = key.replace("_", " ")
            if isinstance(value, list) and value:  # long lists (e.g. skipped files) stay complete in report.json
                lines += [f"- **{key}** ({len(value)}):", *[f"  - {v}" for v in value[:50]]]
                lines += [f"  - … and {len(value) - 50} more (see report.json)"] if len(value) > 50 else []
            else:
                lines.append(f"- **{key}**: {value}")
    return "\n".join(lines) + "\n"


def write_report(metrics: dict, out_dir, *, title: str, extra: dict | None = None,
                 subsets: dict[str, dict] | None = None, figures: Sequence[str] = ()) -> dict[str, Path]:
    """Write report.json, report.md, confusion_matrix.png and reliability.png into out_dir, each atomically.

    report.json holds the metrics at top level plus "title", "disclaimer", "extra" and "subsets", every key
    snake_case. The reliability diagram is skipped when the metrics have no probabilities. ``figures`` names
    further PNGs already in out_dir that report.md should show (roc_curves.png, worst_mistakes.png).
    Returns {name: path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"confusion_matrix": plot_confusion_matrix(metrics["confusion_matrix"], metrics["classes"],
                                                       out / "confusion_matrix.png")}
    if metrics.get("reliability"):
        paths["reliability"] = plot_reliability_bins(metrics["reliability"], metrics["ece"],
                                                     out / "reliability.png")
    markdown = _markdown(metrics, title, extra or {}, subsets or {}, "reliability" in paths, figures)
    paths["markdown"], paths["json"] = out / "report.md", out / "report.json"
    atomic_write(paths["markdown"], lambda fh: fh.write(markdown), "w")
    write_json(paths["json"], {"title": title, "disclaimer": RESEARCH_NOTE, **metrics,
                               "extra": _snake_keys(extra or {}), "subsets": _snake_keys(subsets or {})})
    return paths


def format_table(metrics: dict) -> str:
    """Fixed-width per-class table for the terminal, with accuracy, macro and weighted average lines."""
    m, w = metrics, max(12, *(len(name) for name in metrics["classes"]))
    lines = [f"{'':<{w}}" + "".join(f"{h:>10}" for h in ("accuracy", "precision", "recall", "f1", "support",
                                                          "roc_auc"))]
    lines += [f"{name:<{w}}" + "".join(f"{_fmt(c[key]):>10}" for key in ("accuracy", "precision", "recall", "f1"))
              + f"{c['support']:>10d}{_fmt(c['roc_auc']):>10}" for name, c in m["per_class"].items()]
    ci = (f"  95% CI {m['accuracy_ci95'][0]:.4f}-{m['accuracy_ci95'][1]:.4f} (Clopper-Pearson)"
          if m["accuracy_ci95"] else "")
    lines += ["", f"{'accuracy':<{w}}{m['accuracy']:>10.4f}{'':>30}{m['n']:>10d}{ci}"]
    lines += [f"{label + ' avg':<{w}}{'':>10}{m[label + '_avg']['precision']:>10.4f}"
              f"{m[label + '_avg']['recall']:>10.4f}{m[label + '_avg']['f1']:>10.4f}{m['n']:>10d}"
              for label in ("macro", "weighted")]
    before = f" (before temperature scaling {_fmt(m['ece_uncalibrated'])})" if m.get("ece_uncalibrated") else ""
    lines.append(f"ECE {_fmt(m['ece'])}{before}   macro ROC-AUC {_fmt(m['roc_auc_macro'])}")
    return "\n".join(lines)


def plot_roc_curves(y_true, probabilities, class_names: Sequence[str], path) -> Path | None:
    """One-vs-rest ROC curve per class (scikit-learn's roc_curve) with its AUC, drawn by figures.plot_roc_curves;
    None if no class has both positives and negatives."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from braintumor.visualize.figures import plot_roc_curves as draw_roc_curves

    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities, dtype=float)
    curves = {}
    for k, name in enumerate(class_names):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(positives, probabilities[:, k])
            curves[name] = (fpr, tpr, float(roc_auc_score(positives, probabilities[:, k])))
    return draw_roc_curves(curves, path) if curves else None
