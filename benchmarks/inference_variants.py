"""Which inference settings help a trained model: evaluation size × test-time augmentation, on the run's own
validation split (the same files training validated on, rebuilt from the run's config.yaml).

    python benchmarks/inference_variants.py RUN_DIR --sizes 128 144 160

Prints accuracy and mean negative log-likelihood per variant. The split is the one best.pt was selected on, so
small differences (a few slices) are within noise; see MODEL_CARD.md for how the shipped setting was chosen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from braintumor.training.config import TrainConfig, field_names
from braintumor.evaluation.evaluate import evaluate_classifier, file_batches
from braintumor.inference.service import run_batches
from braintumor.data.index import prepare_split
from braintumor.errors import UserError
from braintumor.inference.classifier import Classifier
from braintumor.utils.outputs import staged_output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", help="model to evaluate (default: RUN_DIR, i.e. its best.pt)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 144, 160])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", metavar="DIR",
                        help="also write the full evaluation report of the model's own setting to DIR (a new or "
                             "empty folder, written all or nothing)")
    parser.add_argument("--overwrite", action="store_true", help="write --report into a folder that holds files")
    args = parser.parse_args(argv)
    try:
        return measure(args)
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def measure(args) -> int:
    """The table (and --report) for parsed arguments."""
    values = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in field_names()})
    split = prepare_split(cfg, progress=False)
    labels = np.asarray(split.val_labels)
    classifier = Classifier.from_checkpoint(args.checkpoint or args.run_dir)  # a run folder: its best.pt
    if args.report:
        with staged_output_dir(args.report, args.report, overwrite=args.overwrite, option="--report") as staged:
            report = evaluate_classifier(classifier, split.val_paths, split.val_labels, staged.path,
                                         title=f"Validation report ({Path(classifier.source_path).name})",
                                         extra={"validation data": split.val_source,
                                                "test-time augmentation": "mirror" if classifier.tta else "off"},
                                         workers=args.workers)
        print(f"report of the stored setting (size {classifier.image_size}, TTA {classifier.tta}): "
              f"accuracy {report['metrics']['accuracy']:.4f}, written to {args.report}\n")
    print(f"{len(labels)} validation slices ({split.val_source})\n")
    print("| size | TTA | accuracy % | errors | mean NLL |")
    print("|---:|---|---:|---:|---:|")
    for size in args.sizes:
        classifier.set_image_size(size)
        for tta in (False, True):
            classifier.tta = tta
            probabilities = run_batches(classifier, file_batches(classifier, split.val_paths,
                                                                 workers=args.workers))[0].probabilities
            predicted = probabilities.argmax(1)
            nll = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).mean()
            print(f"| {size} | {'mirror' if tta else 'off'} | {100 * (predicted == labels).mean():.2f} | "
                  f"{int((predicted != labels).sum())} | {nll:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
