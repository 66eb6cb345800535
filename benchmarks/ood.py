"""Trust-tier benchmark: which scores tell real brain MRI from what is not, and how evenly they flag each class.

Data, all from the checkpoint's own run (its stored configuration rebuilds the grouped split with
``data.index.prepare_split``, as ``braintumor calibrate`` does):

- real MRI: the validation split (per class), and MRI-like variants of it generated here with other seeds than the
  fit's (:func:`braintumor.trust.negatives.mri_variants`: windowings, a 16-bit PNG and a DICOM round trip through
  braintumor's reader, flips, rotations, crops, JPEG, resizing) — the 16-bit and DICOM kinds are never used by the
  fit;
- not MRI: :func:`braintumor.trust.negatives.eval_negatives` — photos inside dependencies (matplotlib's
  ``get_sample_data``, scikit-learn's ``load_sample_images``), documents, screenshots, charts, fractals, colour
  images (kinds the fit never sees) and the fit's procedural kinds drawn from other seeds;
- near MRI ("mri-wrong", for the atypical tier): validation slices inverted, 30 % centre crops, and matplotlib's
  sagittal head MRI ``s1045.ima`` — flagging them is welcome, not required.

Candidates for ``not_mri`` (class-agnostic): the checkpoint's stored tier, each stage's Gaussian alone, one joint
Gaussian over all stages, a logistic regression on the statistics (the fit's negatives vs training MRI), energy,
1 - max softmax. Candidates for ``atypical``: Mahalanobis to the predicted class (stored), to the nearest class
(the 0.1 detector), energy, 1 - max softmax, feature norm, each with Mondrian thresholds at 2 % per class.
Reported: AUROC (validation vs all non-MRI), false alarms on real MRI per class and per variant kind, detection
per non-MRI kind; not_mri candidates other than the stored tier are cut at the largest score of the validation
slices and variants (no false alarm in-sample), atypical candidates at their own per-class 98 % thresholds, so
the comparison is at equal cost. Features are cached in ``--cache`` (the slow part on a CPU).

    python benchmarks/ood.py --checkpoint reference [--cache /tmp/ood-cache] [--markdown table.md] [--json r.json]
    python benchmarks/ood.py --smoke        # a tiny phantom model and sets: checks that the script runs
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from braintumor.data.index import prepare_split
from braintumor.errors import UserError
from braintumor.data.io import read_image
from braintumor.models.checkpoint import load_checkpoint, resolve_checkpoint
from braintumor.trust import fitting, negatives
from braintumor.trust.ood import (ATYPICAL_RATE, energy_score, max_softmax_score, mondrian_thresholds,
                                  trust_head_from_state, whiten)
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import write_json
from braintumor.utils.outputs import refuse_overwrites

VARIANT_SEED = 5  # the fit's variants use seed 0 (trust.fitting.mri_variant_images)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="reference", help="a two-tier .pt checkpoint (default: reference)")
    parser.add_argument("--data", help="the run's training folder when it has moved")
    parser.add_argument("--variant-slices", type=int, default=0,
                        help="validation slices turned into variants (0: all)")
    parser.add_argument("--per-kind", type=int, default=30, help="generated images per non-MRI kind")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", help="folder for cached features (reused when present)")
    parser.add_argument("--markdown", help="also write the tables here")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    parser.add_argument("--smoke", action="store_true", help="tiny phantom model and sets (for the test suite)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ data and features


def mri_wrong(images: list[Image.Image]) -> list[Image.Image]:
    """Real slices made wrong (inverted, 30 % centre crop) plus matplotlib's sagittal head MRI."""
    from matplotlib import cbook

    out = []
    for image in images:
        width, height = image.size
        out += [Image.fromarray(255 - np.asarray(image)),
                image.crop((int(width * 0.35), int(height * 0.35), int(width * 0.65), int(height * 0.65)))]
    with cbook.get_sample_data("s1045.ima.gz") as handle:
        raw = handle.read()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    sagittal = np.frombuffer(raw, np.uint16).reshape(256, 256).astype(np.float64)
    out.append(Image.fromarray((255 * sagittal / sagittal.max()).astype(np.uint8)).convert("RGB"))
    return out


def cached(cache: Path | None, name: str, compute) -> dict[str, np.ndarray]:
    path = cache / f"{name}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return dict(data)
    result = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **result)
    return result


def as_arrays(features: fitting.Features, **extra) -> dict[str, np.ndarray]:
    return {"pooled": features.pooled, "statistics": features.statistics, "logits": features.logits,
            "colour": features.colour, "blank": features.blank, **extra}


def collect(args, checkpoint: Path, split, cache: Path | None) -> dict[str, dict[str, np.ndarray]]:
    model, preprocess, mean, std = fitting.network_and_preprocess(checkpoint)
    options = dict(batch_size=args.batch_size, mean=mean, std=std)

    def extract(images):
        return fitting.extract_features(model, preprocess, images, **options)

    def variants():
        rng = np.random.default_rng(VARIANT_SEED)
        chosen = range(len(split.val_paths))
        if 0 < args.variant_slices < len(split.val_paths):
            chosen = sorted(rng.choice(len(split.val_paths), args.variant_slices, replace=False))
        images, kinds, labels = [], [], []
        with tempfile.TemporaryDirectory() as folder:
            for index in chosen:
                for kind, image in negatives.mri_variants(read_image(split.val_paths[index]), rng,
                                                          dicom_folder=Path(folder)):
                    images.append(image), kinds.append(kind), labels.append(split.val_labels[index])
        return as_arrays(extract(images), kinds=np.array(kinds), labels=np.array(labels))

    def eval_negatives():
        sets = negatives.eval_negatives(args.per_kind)
        kinds = [kind for kind, images in sets.items() for _ in images]
        return as_arrays(extract([image for images in sets.values() for image in images]), kinds=np.array(kinds))

    def fit_negatives():
        kinds, images = zip(*negatives.fit_negatives(2 * fitting.FIT_NEGATIVES_PER_KIND))
        return as_arrays(extract(list(images)), kinds=np.array(kinds))

    def wrong():
        rng = np.random.default_rng(VARIANT_SEED + 100)
        chosen = sorted(rng.choice(len(split.val_paths), min(30, len(split.val_paths)), replace=False))
        return as_arrays(extract(mri_wrong([read_image(split.val_paths[i]) for i in chosen])))

    return {
        "train": cached(cache, "train", lambda: as_arrays(extract(split.train_paths), labels=np.array(split.train_labels))),
        "val": cached(cache, "val", lambda: as_arrays(extract(split.val_paths), labels=np.array(split.val_labels))),
        "variants": cached(cache, "variants", variants),
        "negatives": cached(cache, "eval_negatives", eval_negatives),
        "fit_negatives": cached(cache, "fit_negatives", fit_negatives),
        "mri_wrong": cached(cache, "mri_wrong", wrong),
    }


# ------------------------------------------------------------------------------------------ candidate scores


def gaussian_distance(train: np.ndarray, start: int, stop: int):
    mean, whitening = whiten(train[:, start:stop])
    return lambda d: np.sqrt((((d["statistics"][:, start:stop] - mean) @ whitening) ** 2).sum(axis=1))


def stored_not_mri(state):
    tier = trust_head_from_state(state).not_mri
    return lambda d: fitting.score_not_mri(tier, d["statistics"], d["colour"], d.get("blank"))


def stored_atypical(state):
    tier = trust_head_from_state(state).atypical
    return lambda d: tier(torch.from_numpy(d["pooled"]), torch.from_numpy(d["logits"])).detach().numpy()


def not_mri_candidates(sets, state, widths) -> dict:
    train = sets["train"]["statistics"]
    candidates = {}
    if state is not None and "not_mri" in state:
        candidates["stored: per-stage Gaussians (max) + colour"] = stored_not_mri(state)
    for k, (start, stop) in enumerate(fitting.statistic_blocks(widths)):
        candidates[f"Gaussian layer{k + 1} statistics"] = gaussian_distance(train, start, stop)
    candidates["Gaussian all stages (joint)"] = gaussian_distance(train, 0, train.shape[1])
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(train)
    x = np.concatenate([train, sets["fit_negatives"]["statistics"]])
    y = np.r_[np.zeros(len(train)), np.ones(len(sets["fit_negatives"]["statistics"]))]
    with threadpool_limits(1):
        logistic = LogisticRegression(C=0.01, max_iter=3000, class_weight="balanced").fit(scaler.transform(x), y)
    candidates["logistic on statistics (fit negatives)"] = lambda d: logistic.decision_function(scaler.transform(d["statistics"]))
    candidates["energy"] = lambda d: energy_score(d["logits"])
    candidates["1 - max softmax"] = lambda d: max_softmax_score(d["logits"])
    return candidates


def atypical_candidates(sets, state) -> dict:
    train = sets["train"]
    detector = fitting.fit_mahalanobis(train["pooled"], train["labels"])
    candidates = {}
    if state is not None and "atypical" in state:
        candidates["stored: Mahalanobis to predicted class"] = stored_atypical(state)

    def distances(d):
        with torch.no_grad():
            return detector.class_distances(torch.from_numpy(d["pooled"])).numpy()

    candidates["Mahalanobis to nearest class (0.1)"] = lambda d: distances(d).min(axis=1)
    candidates["energy"] = lambda d: energy_score(d["logits"])
    candidates["1 - max softmax"] = lambda d: max_softmax_score(d["logits"])
    candidates["feature norm (low = unusual)"] = lambda d: -np.linalg.norm(d["pooled"], axis=1)
    return candidates


# ------------------------------------------------------------------------------------------ measuring


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def measure_not_mri(sets, candidates, classes) -> dict:
    val, variants, negative = sets["val"], sets["variants"], sets["negatives"]
    results = {}
    for name, score in candidates.items():
        v, w, n = score(val), score(variants), score(negative)
        cut = 1.0 if name.startswith("stored") else float(max(v.max(), w.max()))
        results[name] = {
            "auroc": auroc(v, n),
            "val_false_alarms": float(np.mean(v > cut)),
            "val_false_alarms_by_class": {c: float(np.mean(v[val["labels"] == k] > cut)) for k, c in enumerate(classes)},
            "variant_false_alarms": float(np.mean(w > cut)),
            "variant_false_alarms_by_kind": {kind: float(np.mean(w[variants["kinds"] == kind] > cut))
                                             for kind in np.unique(variants["kinds"])},
            "detected": float(np.mean(n > cut)),
            "detected_by_kind": {kind: float(np.mean(n[negative["kinds"] == kind] > cut))
                                 for kind in np.unique(negative["kinds"])},
        }
    return results


def measure_atypical(sets, candidates, classes) -> dict:
    val, wrong, negative = sets["val"], sets["mri_wrong"], sets["negatives"]
    predicted = val["logits"].argmax(axis=1)
    results = {}
    for name, raw in candidates.items():
        # Mondrian thresholds are positive numbers: shift each score (ranks unchanged) so real slices score >= 1.
        offset = 1.0 - float(raw(val).min())
        score = raw if name.startswith("stored") else (lambda d, raw=raw, offset=offset: raw(d) + offset)
        v = score(val)
        if name.startswith("stored"):
            thresholds, flagged_of = np.ones(len(classes)), lambda d, s: s > 1.0
        else:
            thresholds, _ = mondrian_thresholds(v, predicted, len(classes), ATYPICAL_RATE)
            flagged_of = lambda d, s, t=thresholds: s > t[d["logits"].argmax(axis=1)]  # noqa: E731
        flagged = flagged_of(val, v)
        results[name] = {
            "auroc_mri_wrong": auroc(v, score(wrong)),
            "val_rate_by_class": {c: float(np.mean(flagged[val["labels"] == k])) for k, c in enumerate(classes)},
            "val_rate_by_predicted": {c: float(np.mean(flagged[predicted == k])) for k, c in enumerate(classes)},
            "mri_wrong_flagged": float(np.mean(flagged_of(wrong, score(wrong)))),
            "negatives_flagged": float(np.mean(flagged_of(negative, score(negative)))),
        }
    return results


def cross_fitted_atypical(sets, classes, seed: int = 0) -> dict[str, float]:
    """Out-of-sample per-class rates of the stored rule: thresholds from one random half of the validation split,
    rates measured on the other half (and the other way round); mean of the two."""
    val = sets["val"]
    detector = fitting.fit_mahalanobis(sets["train"]["pooled"], sets["train"]["labels"])
    with torch.no_grad():
        distances = detector.class_distances(torch.from_numpy(val["pooled"])).numpy()
    predicted = val["logits"].argmax(axis=1)
    own = distances[np.arange(len(predicted)), predicted]
    half = np.random.default_rng(seed).random(len(own)) < 0.5
    rates = np.zeros(len(classes))
    for fit_on in (half, ~half):
        thresholds, _ = mondrian_thresholds(own[fit_on], predicted[fit_on], len(classes), ATYPICAL_RATE)
        flagged = own[~fit_on] > thresholds[predicted[~fit_on]]
        labels = val["labels"][~fit_on]
        rates += [np.mean(flagged[labels == k]) for k in range(len(classes))]
    return {c: float(rate / 2) for c, rate in zip(classes, rates)}


def markdown(results: dict, classes) -> str:
    lines = [f"Checkpoint {results['checkpoint']}: {results['n_val']} validation slices, {results['n_variants']} "
             f"MRI-like variants, {results['n_negatives']} generated non-MRI images.", "",
             "**not_mri** (false alarms on real MRI; detection of non-MRI)", "",
             "| score | AUROC | val false alarms | " + " | ".join(classes) + " | variants | non-MRI detected |",
             "|---|---:|---:|" + "---:|" * len(classes) + "---:|---:|"]
    for name, row in results["not_mri"].items():
        per_class = " | ".join(f"{row['val_false_alarms_by_class'][c]:.2%}" for c in classes)
        lines.append(f"| {name} | {row['auroc']:.4f} | {row['val_false_alarms']:.2%} | {per_class} | "
                     f"{row['variant_false_alarms']:.2%} | {row['detected']:.2%} |")
    stored = next((row for name, row in results["not_mri"].items() if name.startswith("stored")), None)
    if stored is not None:
        lines += ["", "Stored not_mri tier, per kind: non-MRI detected — " +
                  ", ".join(f"{kind} {rate:.1%}" for kind, rate in stored["detected_by_kind"].items()),
                  "", "MRI-like variants flagged — " +
                  ", ".join(f"{kind} {rate:.2%}" for kind, rate in stored["variant_false_alarms_by_kind"].items())]
    lines += ["", "**atypical** (Mondrian thresholds, 2 % per predicted class; rates on the validation split by true "
              "class)", "",
              "| score | " + " | ".join(classes) + " | AUROC vs mri-wrong | mri-wrong flagged | non-MRI flagged |",
              "|---|" + "---:|" * len(classes) + "---:|---:|---:|"]
    for name, row in results["atypical"].items():
        per_class = " | ".join(f"{row['val_rate_by_class'][c]:.2%}" for c in classes)
        lines.append(f"| {name} | {per_class} | {row['auroc_mri_wrong']:.4f} | {row['mri_wrong_flagged']:.1%} | "
                     f"{row['negatives_flagged']:.1%} |")
    lines += ["", "Stored atypical rule, out of sample (thresholds from one half of the validation split, rates on "
              "the other, averaged): " + ", ".join(f"{c} {r:.2%}" if np.isfinite(r) else f"{c} -"
                                              for c, r in results["atypical_cross_fitted"].items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def smoke_setup(folder: Path) -> tuple[Path, object]:
    """An untrained resnet18 (32 px) with both tiers fitted on phantoms, and its split settings."""
    from braintumor.models.checkpoint import random_checkpoint
    from braintumor.synthetic.phantom import write_phantom_set
    from braintumor.training.config import from_saved

    checkpoint = random_checkpoint(folder / "smoke.pt", image_size=32)
    data = write_phantom_set(folder / "data", per_class=8, size=48, seed=1)
    settings = from_saved({"data": str(data), "val_split": 0.5, "group_split": False, "image_size": 32}, "smoke",
                          progress=False).validate()
    split = prepare_split(settings, progress=False)
    trust = fitting.fit_trust(checkpoint, split.train_paths, split.train_labels, split.val_paths, split.val_labels,
                              variant_slices=4, negatives_per_kind=2)
    fitting.store_trust(checkpoint, trust)
    return checkpoint, settings


def main(argv=None) -> int:
    import warnings

    args = parse_args(argv)
    try:
        refuse_overwrites({"--markdown": args.markdown, "--json": args.json}, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", "Mean of empty slice")  # a class without slices: its rate is nan
    warnings.filterwarnings("ignore", "invalid value encountered")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            checkpoint, settings = smoke_setup(Path(tmp))
            args.checkpoint, args.variant_slices, args.per_kind, cache = "smoke", 4, 2, None
        else:
            from braintumor.training.config import from_saved

            checkpoint = resolve_checkpoint(args.checkpoint)
            values = dict(load_checkpoint(checkpoint).get("config") or {})
            if args.data:
                values["data"] = args.data
            if not values.get("data"):
                print(f"error: {checkpoint} does not name its training data; pass --data", file=sys.stderr)
                return 2
            settings = from_saved(values, str(checkpoint), progress=False, skip_bad=True).validate()
            cache = Path(args.cache) if args.cache else None
        ckpt = load_checkpoint(checkpoint)
        state, classes = ckpt.get("trust"), list(ckpt["classes"])
        split = prepare_split(settings, progress=False)
        sets = collect(args, checkpoint, split, cache)
        model, *_ = fitting.network_and_preprocess(checkpoint)
        results = {"checkpoint": str(args.checkpoint), "n_val": len(sets["val"]["labels"]),
                   "n_variants": len(sets["variants"]["kinds"]), "n_negatives": len(sets["negatives"]["kinds"]),
                   "not_mri": measure_not_mri(sets, not_mri_candidates(sets, state, fitting.stage_widths(model)), classes),
                   "atypical": measure_atypical(sets, atypical_candidates(sets, state), classes),
                   "atypical_cross_fitted": cross_fitted_atypical(sets, classes)}
    table = markdown(results, classes)
    print(table)
    if args.markdown:
        atomic_write(args.markdown, lambda handle: handle.write(table), "w")
    if args.json:
        write_json(args.json, results)  # nan: null
    return 0


if __name__ == "__main__":
    sys.exit(main())
