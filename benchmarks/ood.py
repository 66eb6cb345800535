"""Out-of-distribution benchmark: how well a checkpoint's detector tells real slices from things that are not.

In distribution (ID): the labelled slices of ``--data`` (use a folder the detector was not fitted on, e.g. the
test set, so the ID rejection rate is an honest estimate). Out of distribution, all built offline here:

  photos      natural photos that installed packages ship (matplotlib's grace_hopper, scikit-learn's china and
              flower, scikit-image's astronaut, camera, coffee, chelsea, rocket, ... when scikit-image is
              installed), each as is, in grayscale, as two crops and resized to 64 px
  noise       uniform RGB noise, Gaussian gray noise, salt and pepper
  blanks      single-colour images (black, white, grays, colours)
  gradients   linear and radial gray-level ramps
  text        rendered lines of text, black on white and white on black
  mri-wrong   ID slices that are MRI-like but wrong: inverted intensities, rotated 90°, a 30 % centre crop, and
              matplotlib's sagittal head MRI (s1045.ima) -- "near" OOD: flagging them is welcome, not required

For every set and three scores (the checkpoint's Mahalanobis ``ood_score``, the energy score, 1 - max softmax):
AUROC of ID vs the set, and the false-accept rate (FAR) at the score's own 95 %-ID-acceptance threshold; for the
stored detector also the FAR at its stored threshold (ood_score <= 1) and the rejected share of the ID slices.

    python benchmarks/ood.py --checkpoint runs/…/best.pt --data Testing [--max-id 400] [--json ood.json]
    python benchmarks/ood.py --smoke        # tiny phantom model and sets, checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from braintumor.data.index import discover
from braintumor.trust.ood import energy_score, max_softmax_score
from braintumor.inference.classifier import Classifier

ACCEPT = 0.95


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a .pt checkpoint with a fitted detector (braintumor calibrate)")
    parser.add_argument("--data", help="in-distribution folder, one sub-folder per class (not used for fitting)")
    parser.add_argument("--max-id", type=int, default=0, help="use at most this many ID slices (0: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny phantom model and sets (for the test suite)")
    return parser.parse_args(argv)


def sample_photos(with_skimage: bool = True) -> dict[str, Image.Image]:
    """Natural photos shipped by installed packages (no download)."""
    import matplotlib
    from sklearn.datasets import load_sample_image

    photos = {"grace_hopper": Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")}
    for name in ("china.jpg", "flower.jpg"):
        photos[name.split(".")[0]] = Image.fromarray(load_sample_image(name))
    try:
        if not with_skimage:
            raise ImportError
        import skimage.data

        for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text",
                     "horse", "hubble_deep_field", "immunohistochemistry", "retina", "cell"):
            try:
                array = getattr(skimage.data, name)()
            except Exception:  # some need a download (pooch): skipped offline
                continue
            if array.dtype == bool:
                array = array.astype(np.uint8) * 255
            photos[name] = Image.fromarray(np.asarray(array).astype(np.uint8))
    except ImportError:
        pass
    return {name: image.convert("RGB") for name, image in photos.items()}


def photo_variants(photos: dict[str, Image.Image], rng) -> list[Image.Image]:
    out = []
    for image in photos.values():
        width, height = image.size
        side = min(width, height)
        x, y = int(rng.integers(0, width - side // 2 + 1)), int(rng.integers(0, height - side // 2 + 1))
        out += [image, image.convert("L").convert("RGB"),
                image.crop(((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)),
                image.crop((x, y, x + side // 2, y + side // 2)), image.resize((64, 64))]
    return out


def synthetic_sets(rng, n: int, size: int = 224) -> dict[str, list[Image.Image]]:
    """Noise, blanks, gradients and text renderings."""
    noise = []
    for k in range(n):
        kind = k % 3
        if kind == 0:
            array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif kind == 1:
            array = np.clip(rng.normal(128, 50, (size, size)), 0, 255).astype(np.uint8)
        else:
            array = np.where(rng.random((size, size)) < 0.5, 0, 255).astype(np.uint8)
        noise.append(Image.fromarray(array).convert("RGB"))
    colours = ["black", "white", (128, 128, 128), (40, 40, 40), (200, 200, 200), (255, 0, 0), (0, 0, 255),
               (0, 128, 0), (90, 90, 90), (10, 10, 10)]
    blanks = [Image.new("RGB", (size, size), colours[k % len(colours)]) for k in range(n)]
    ramp = np.linspace(0, 255, size)
    yy, xx = np.mgrid[0:size, 0:size]
    radial = np.hypot(yy - size / 2, xx - size / 2)
    gradient_arrays = [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), 255 * radial / radial.max(),
                       255 - 255 * radial / radial.max(), (np.tile(ramp, (size, 1)) + np.tile(ramp[:, None], (1, size))) / 2]
    gradients = [Image.fromarray(gradient_arrays[k % len(gradient_arrays)].astype(np.uint8)).convert("RGB")
                 .rotate(90 * (k // len(gradient_arrays))) for k in range(n)]
    try:
        from matplotlib import font_manager

        font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 18)
    except Exception:
        font = ImageFont.load_default()
    lines = ["Patient report: no findings", "The quick brown fox jumps over", "braintumor 0.1.0 research use",
             "Lorem ipsum dolor sit amet", "MRI T1 axial slice 12 of 24", "0123456789 ABCDEFGHIJ"]
    text = []
    for k in range(n):
        dark = k % 2 == 1
        image = Image.new("RGB", (size, size), "black" if dark else "white")
        draw = ImageDraw.Draw(image)
        for row in range(6):
            draw.text((8, 10 + row * 34), lines[(k + row) % len(lines)], fill="white" if dark else "black", font=font)
        text.append(image)
    return {"noise": noise, "blanks": blanks, "gradients": gradients, "text": text}


def mri_wrong(id_images: list[Image.Image]) -> list[Image.Image]:
    """Real slices made wrong (inverted, rotated 90°, 30 % centre crop), plus matplotlib's sagittal head MRI."""
    import gzip

    import matplotlib

    out = []
    for image in id_images:
        array = np.asarray(image)
        width, height = image.size
        out += [Image.fromarray(255 - array), image.rotate(90, expand=True),
                image.crop((int(width * 0.35), int(height * 0.35), int(width * 0.65), int(height * 0.65)))]
    raw = gzip.open(Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz").read()
    sagittal = np.frombuffer(raw, np.uint16).reshape(256, 256).astype(np.float64)
    out.append(Image.fromarray((255 * sagittal / sagittal.max()).astype(np.uint8)).convert("RGB"))
    return out


def scores_of(classifier: Classifier, images: list[Image.Image], batch_size: int) -> dict[str, np.ndarray]:
    import torch

    logits, ood = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([classifier.preprocess(image) for image in images[start:start + batch_size]])
        chunk_logits, chunk_ood = classifier.infer(batch)
        logits.append(chunk_logits)
        ood.append(chunk_ood)
    logits = np.concatenate(logits)
    return {"mahalanobis": np.concatenate(ood), "energy": energy_score(logits),
            "max_softmax": max_softmax_score(logits / classifier.temperature)}


def evaluate_sets(id_scores: dict, sets: dict[str, dict]) -> dict:
    from sklearn.metrics import roc_auc_score

    results = {"id": {"n": len(id_scores["mahalanobis"]),
                      "rejected_at_stored_threshold": float(np.mean(id_scores["mahalanobis"] > 1.0))}, "sets": {}}
    for name, scores in sets.items():
        row = {"n": len(scores["mahalanobis"])}
        for method, ood in scores.items():
            inside = id_scores[method]
            labels = np.r_[np.zeros(len(inside)), np.ones(len(ood))]
            threshold = np.quantile(inside, ACCEPT)
            row[method] = {"auroc": float(roc_auc_score(labels, np.r_[inside, ood])),
                           "far_at_95_tpr": float(np.mean(ood <= threshold))}
        row["mahalanobis"]["far_at_stored_threshold"] = float(np.mean(scores["mahalanobis"] <= 1.0))
        results["sets"][name] = row
    return results


def print_table(results: dict, checkpoint: str) -> None:
    print(f"OOD benchmark of {checkpoint}: {results['id']['n']} in-distribution slices, "
          f"{results['id']['rejected_at_stored_threshold']:.1%} of them rejected at the stored threshold\n")
    print("| OOD set | n | Mahalanobis AUROC | FAR@95 | FAR (stored threshold) | energy AUROC | FAR@95 | "
          "max-softmax AUROC | FAR@95 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in results["sets"].items():
        m, e, s = row["mahalanobis"], row["energy"], row["max_softmax"]
        print(f"| {name} | {row['n']} | {m['auroc']:.4f} | {m['far_at_95_tpr']:.1%} | "
              f"{m['far_at_stored_threshold']:.1%} | {e['auroc']:.4f} | {e['far_at_95_tpr']:.1%} | "
              f"{s['auroc']:.4f} | {s['far_at_95_tpr']:.1%} |")
    print("\nFAR@95: share of the set accepted at the threshold that accepts 95 % of these ID slices.")


def smoke_checkpoint(folder: Path) -> tuple[Path, Path]:
    """An untrained resnet18 (32 px) with a detector fitted on phantoms, and an ID phantom folder."""
    from braintumor.models.checkpoint import ModelSpec, inference_payload, save_checkpoint
    from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from braintumor.models.network import build_model
    from braintumor.synthetic.phantom import write_phantom_set
    from braintumor.trust.fitting import fit_trust, store_trust
    import torch

    torch.manual_seed(0)
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    checkpoint = folder / "smoke.pt"
    spec = ModelSpec(arch="resnet18", classes=classes, image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    save_checkpoint(inference_payload(build_model("resnet18", 4).state_dict(), spec, config={}), checkpoint)
    train = discover(write_phantom_set(folder / "train", per_class=4, size=48, seed=1))
    val = discover(write_phantom_set(folder / "val", per_class=3, size=48, seed=2))
    store_trust(checkpoint, fit_trust(checkpoint, train.paths, train.labels, val.paths, val.labels))
    return checkpoint, write_phantom_set(folder / "id", per_class=3, size=48, seed=3)


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.checkpoint, args.data = smoke_checkpoint(Path(tmp))
            args.max_id, args.device = args.max_id or 12, "cpu"
        if not args.checkpoint or not args.data:
            print("error: give --checkpoint and --data (or --smoke)", file=sys.stderr)
            return 2
        classifier = Classifier.from_checkpoint(args.checkpoint, device=args.device)
        if classifier.detector is None:
            print(f"error: {args.checkpoint} has no fitted OOD detector: run `braintumor calibrate` on it first",
                  file=sys.stderr)
            return 2
        paths = discover(args.data, classes=classifier.classes).paths
        if args.max_id and len(paths) > args.max_id:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), args.max_id, replace=False))]
        id_images = [classifier.load(path) for path in paths]
        n = 4 if args.smoke else 30
        photos = photo_variants(sample_photos(with_skimage=not args.smoke), rng)
        sets = {"photos": photos[:n * 2] if args.smoke else photos, **synthetic_sets(rng, n),
                "mri-wrong": mri_wrong(id_images[:n])}
        id_scores = scores_of(classifier, id_images, args.batch_size)
        results = evaluate_sets(id_scores, {name: scores_of(classifier, images, args.batch_size)
                                            for name, images in sets.items()})
        results.update(checkpoint=str(args.checkpoint), data=str(args.data), temperature=classifier.temperature)
        print_table(results, str(args.checkpoint))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
