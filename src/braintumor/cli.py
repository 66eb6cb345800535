"""The ``braintumor`` command: parse flags, call the Python API, print, exit with a clear code."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from . import RESEARCH_NOTE, __version__
from .dedup import DEFAULT_THRESHOLD
from .errors import UserError

log = logging.getLogger("braintumor")


def probability(text: str) -> float:
    """An argparse type: a number between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag on one line (exit 2) instead of usage plus message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def bounded(kind: type, low: float, high: float):
    """An argparse type: a finite ``kind`` value in [low, high], else a one-line flag error before any work."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (low <= value <= high):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def one_line(message: str) -> str:
    """A message on one line whatever it quotes: newlines and other control characters in names are escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


GROUPS_HELP = ("CSV with columns path,group (patient or series id): a group never straddles the split "
               "(default: per-patient sub-folders of the class folders, when there are any)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    # Every default is None so a YAML file (--config) can set it; TrainConfig holds the real defaults.
    p.add_argument("data", nargs="?", help="training folder with one sub-folder per class")
    p.add_argument("--recipe", help="a shipped recipe (see `braintumor recipes`); --config and flags override it")
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--val", help="separate validation folder (default: split the training folder)")
    p.add_argument("--val-split", type=float, help="validation fraction of the training folder (default 0.15)")
    p.add_argument("--no-group-split", dest="group_split", action="store_false", default=None,
                   help="allow exact/near duplicates on both sides of the split (default: kept together)")
    p.add_argument("--groups", metavar="FILE.csv", help=GROUPS_HELP)
    p.add_argument("--arch", help="resnet18|resnet34|resnet50|resnet101|resnet152 (default resnet152)")
    p.add_argument("--weights", help="imagenet (default), none, or a torchvision state-dict file")
    p.add_argument("--image-size", type=int, help="square input size in pixels (default 224)")
    p.add_argument("--rotation", type=float, help="random rotation range in degrees, +/- (default 10)")
    p.add_argument("--scale", type=float, help="random scale U(1-s, 1+s) (default 0: off)")
    p.add_argument("--translate", type=float, help="random shift up to this fraction of the size (default 0)")
    p.add_argument("--brightness", type=float, help="random brightness factor U(1-b, 1+b) (default 0)")
    p.add_argument("--contrast", type=float, help="random contrast factor U(1-c, 1+c) (default 0)")
    p.add_argument("--gamma", type=float, help="random gamma exp(U(-g, g)) (default 0)")
    p.add_argument("--progressive-resize", type=int, metavar="START_SIZE",
                   help="train at START_SIZE first, growing to --image-size (default 0: off)")
    p.add_argument("--progressive-until", type=float,
                   help="fraction of the epochs after which training is at full size (default 0.5)")
    p.add_argument("--eval-image-size", type=int,
                   help="size for validation and the saved model (default: --image-size)")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights (e.g. 0.999; default 0: off)")
    p.add_argument("--tta", action="store_true", default=None,
                   help="test-time augmentation: average each slice with its mirror (stored in the model)")
    p.add_argument("--teacher", metavar="CKPT", help="distil from this trained checkpoint (same classes)")
    p.add_argument("--distill-weight", type=float, help="weight of the teacher's soft targets (default 0.5)")
    p.add_argument("--distill-temperature", type=float, help="softening temperature (default 4)")
    p.add_argument("--epochs", type=int, help="number of epochs (default 10)")
    p.add_argument("--batch-size", type=int, help="global batch size over all processes (default 32)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-5)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (default 0)")
    p.add_argument("--optimizer", help="ranger (default), radam, adam, adamw or sgd")
    p.add_argument("--gc", help="gradient centralization for Ranger: all (default), conv or none")
    p.add_argument("--lookahead-k", type=int, help="Ranger LookAhead sync period (default 6)")
    p.add_argument("--lookahead-alpha", type=float, help="Ranger LookAhead step (default 0.5)")
    p.add_argument("--scheduler", help="none (default), cosine or onecycle")
    p.add_argument("--warmup-epochs", type=float, help="linear LR warm-up length in epochs (default 0)")
    p.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default 0)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default min(8, cores))")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--split-seed", type=int,
                   help="seed of the validation split (default: --seed); fix it to compare seeds on one split")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--data-cache", help="auto (default), none, memory or gpu: decode images once and "
                                        "augment batches on the device")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (short for --train-step compile)")
    p.add_argument("--train-step", help="auto (default), eager, compile, compile-step (model and Ranger update) "
                                        "or cuda-graphs; a mode that cannot run falls back with a notice")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable images (listed in the report) instead of stopping")
    p.add_argument("--out", help="run folder (default runs/<date-time>-<name>)")
    p.add_argument("--name", help="run name used in the default run folder")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap on steps per epoch (smoke tests)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")


TRAIN_KEYS = ("data", "val", "val_split", "group_split", "groups", "arch", "weights", "image_size", "rotation",
              "scale", "translate", "brightness", "contrast", "gamma", "progressive_resize", "progressive_until",
              "eval_image_size", "ema", "tta", "teacher", "distill_weight", "distill_temperature", "epochs",
              "batch_size", "lr", "weight_decay", "optimizer", "gc", "lookahead_k", "lookahead_alpha",
              "scheduler", "warmup_epochs", "label_smoothing", "workers", "seed", "split_seed", "device", "data_cache",
              "compile", "train_step", "skip_bad", "out", "name", "max_steps_per_epoch", "progress")


def cmd_train(args) -> int:
    from .config import read_config_file, read_recipe, resolve_config
    from .train import resume, train

    flags = {key: getattr(args, key) for key in TRAIN_KEYS}
    if args.resume:
        result = resume(args.resume, {k: v for k, v in flags.items() if k not in ("data", "out")})
    else:
        file_values = read_recipe(args.recipe) if args.recipe else {}
        file_values.update(read_config_file(args.config) if args.config else {})
        if not flags["data"] and not file_values.get("data"):
            raise UserError("no training data folder given: braintumor train DATA_DIR (or data: in --config)")
        result = train(resolve_config(file_values, flags))
    if result.report is not None:
        print(f"best validation accuracy {result.best_val_accuracy:.2%}; run folder: {result.run_dir}")
        print(f"report: {result.run_dir / 'report.md'}")
    return 0


def cmd_recipes(args) -> int:
    from .config import list_recipes

    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    print("use: braintumor train DATA --recipe NAME (flags override the recipe's options)")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_checkpoint
    from .outputs import prepare_output_dir
    from .report import format_table

    out = prepare_output_dir(args.out, "evaluation", overwrite=args.overwrite)
    report = evaluate_checkpoint(args.checkpoint, args.data, out, device=args.device,
                                 batch_size=args.batch_size, exclude_duplicates_of=args.exclude_duplicates_of,
                                 skip_bad=args.skip_bad, workers=args.workers, tta=args.tta, groups=args.groups,
                                 backend=args.backend)
    print(format_table(report["metrics"]))
    for name, subset in report.get("subsets", {}).items():
        print(f"{name}: accuracy {subset['accuracy']:.2%} on {subset['n']} images")
    print(f"per-image results: {out / 'predictions.csv'}")
    print(f"report: {out / 'report.md'}")
    return 0


def _volume_rule(args):
    from .volume_verdict import VerdictRule

    return VerdictRule(threshold=args.slice_threshold, min_slices=args.min_slices)


def cmd_predict(args) -> int:
    from .predict import Classifier
    from .streaming import PredictionWriter, stream_predictions
    from .volume_verdict import classify_volume
    from .volumes import partition_inputs, read_volume

    rule = _volume_rule(args)
    classifier = Classifier.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend,
                                            tta=args.tta)
    classifier.min_confidence = args.min_confidence
    image_paths, volume_paths = partition_inputs(args.paths)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    writer = PredictionWriter(sys.stdout, classifier, fmt, width=max(len(str(p)) for p in image_paths or ["image"]))
    skipped = []
    if image_paths:  # slices stream out as they are made
        skipped = stream_predictions(classifier, image_paths, writer, batch_size=args.batch_size,
                                     skip_bad=args.skip_bad)
    volumes = []
    for path in volume_paths:
        log.debug("reading volume %s", path)
        volume = classify_volume(classifier, read_volume(path), rule, batch_size=args.batch_size)
        volumes.append(volume)
        if fmt == "json":
            writer.write_record(volume.to_dict())
        elif fmt == "csv":
            for prediction in volume.slice_predictions():
                writer.write(prediction)
            log.info("%s: volume verdict %s (%s)", volume.source, volume.verdict, volume.evidence)
    writer.close()
    if fmt == "table":
        for v in volumes:
            print(f"{v.source}: volume verdict {v.verdict} ({v.evidence}; {len(v.probabilities)} axial slices)")
        if volumes:
            print(f"volume rule: {volumes[0].rule}. Per-slice results: --csv or --json; montage: braintumor explain")
    if skipped:
        print(one_line(f"skipped {len(skipped)} unreadable file(s): "
                       + "; ".join(f"{path} ({reason})" for path, reason in skipped)), file=sys.stderr)
    return 0


def _print_table(predictions: list, classes: list[str]) -> None:
    width = max(len(p.source) for p in predictions)
    print(f"{'image':<{width}}  {'prediction':<12} " + " ".join(f"{c[:10]:>10}" for c in classes))
    for p in predictions:
        print(f"{p.source:<{width}}  {p.label:<12} " + " ".join(f"{p.probabilities[c]:>10.4f}" for c in classes))


def cmd_make_phantoms(args) -> int:
    if args.volumes:
        from .phantom_volumes import write_phantom_volumes

        written = write_phantom_volumes(args.out, per_class=args.per_class or 1, size=args.size, slices=args.slices,
                                        seed=args.seed)
        print(f"wrote {len(written) // 3} phantom volumes, each as NIfTI, DICOM series folder and multi-frame "
              f"DICOM ({args.slices} axial slices of {args.size} px), to {args.out}")
        return 0
    from .phantom import write_phantom_set

    per_class = 100 if args.per_class is None else args.per_class
    out = write_phantom_set(args.out, per_class=per_class, size=args.size, seed=args.seed)
    print(f"wrote {per_class} phantom slices per class to {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, per_class=args.per_class, epochs=args.epochs, seed=args.seed)
    return 0


def cmd_audit(args) -> int:
    from .audit import audit, write_audit
    from .outputs import prepare_output_dir

    out = prepare_output_dir(args.out, "audit", overwrite=args.overwrite)
    report = audit(args.data, against=args.against, threshold=args.threshold, progress=sys.stderr.isatty(),
                   groups=args.groups)
    json_path, md_path = write_audit(report, out)
    summary = report["summary"]
    if report.get("leak_headline"):
        print(report["leak_headline"])
    print(" ".join(f"{key.replace('_', ' ')}: {value}" for key, value in summary.items()))
    print(f"report: {md_path}")
    if args.fail_on_leak and summary.get("leaked_images", 0) > 0:
        print(f"error: {summary['leaked_images']} image(s) of {args.against} duplicate training images",
              file=sys.stderr)
        return 1
    return 0


def cmd_calibrate(args) -> int:
    from .trust import describe_trust, fit_trust_for_checkpoint

    trust = fit_trust_for_checkpoint(args.checkpoint, data=args.data, val=args.val, accept_rate=args.accept_rate,
                                     device=args.device, batch_size=args.batch_size, workers=args.workers)
    print(f"fitted into {args.checkpoint}: {describe_trust(trust)}")
    return 0


def cmd_explain(args) -> int:
    from .explain import write_explanations
    from .outputs import prepare_output_dir
    from .predict import Classifier
    from .volume_verdict import classify_volume, write_volume_outputs
    from .volumes import partition_inputs, read_volume

    rule = _volume_rule(args)
    classifier = Classifier.from_checkpoint(args.checkpoint, device=args.device)
    image_paths, volume_paths = partition_inputs(args.images)
    out = prepare_output_dir(args.out, "gradcam", overwrite=args.overwrite)
    written = write_explanations(classifier, image_paths, out, target=args.target) if image_paths else []
    for path in volume_paths:
        volume = read_volume(path)
        result = classify_volume(classifier, volume, rule)
        log.info("%s: volume verdict %s (%s)", result.source, result.verdict, result.evidence)
        written.extend(write_volume_outputs(classifier, volume, result, out))
    for path in written:
        print(path)
    return 0


def cmd_export(args) -> int:
    from .export import default_export_path, export, quantize_onnx
    from .predict import expand_inputs

    if args.int8_calibration is None:
        print(f"wrote {export(args.checkpoint, args.format, args.out)}")
        return 0
    if args.format != "onnx":
        raise UserError("--int8-calibration needs --format onnx")
    out = Path(args.out) if args.out else default_export_path(args.checkpoint, "onnx")
    fp32 = export(args.checkpoint, "onnx", out.with_name(out.stem + ".fp32.onnx"))
    int8 = quantize_onnx(fp32, out, expand_inputs([args.int8_calibration]))
    print(f"wrote {fp32} (float32) and {int8} (int8, not exact: check it with `braintumor evaluate {int8} DATA`)")
    return 0


def cmd_serve(args) -> int:
    from .serve import run_server

    run_server(args.checkpoint, host=args.host, port=args.port, max_file_bytes=args.max_file_mb * 2**20,
               max_files=args.max_files, device=args.device, backend=args.backend, tta=args.tta,
               min_confidence=args.min_confidence)
    return 0


CHECKPOINT_HELP = ("a .pt checkpoint, a run folder, an exported .onnx file, or 'reference' "
                   "(the model shipped with braintumor; see MODEL_CARD.md)")


def _tta_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each slice's prediction with its mirror's (default: as stored in the model)")


def _common_flags() -> argparse.ArgumentParser:
    """-q/-v for every subcommand (SUPPRESS: a flag given before the subcommand is not reset after it)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress messages: only warnings and errors (on stderr)")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also debug messages (progress on stdout, warnings and errors on stderr)")
    return common


def _volume_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slice-threshold", type=float, default=0.5, metavar="P",
                   help="volumes: a slice votes for a tumour class predicted with probability >= P (default 0.5)")
    p.add_argument("--min-slices", type=int, default=2, metavar="N",
                   help="volumes: a tumour verdict needs at least N voting slices (default 2)")


def _out_flags(p: argparse.ArgumentParser, default_parent: str) -> None:
    p.add_argument("--out", help=f"output folder (default: a new {default_parent}/<date-time>/); "
                                 "an existing folder with files needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")


def build_parser() -> Parser:
    common = _common_flags()
    parser = Parser(prog="braintumor", description=f"Brain MRI slice classification. {RESEARCH_NOTE}",
                    parents=[common])
    parser.add_argument("--version", action="version", version=f"braintumor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", parents=[common], help="fine-tune a ResNet on a folder-per-class data set")
    _train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", parents=[common], help="list the shipped training recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("evaluate", parents=[common],
                       help="metrics, confusion matrix and calibration of a checkpoint on a folder")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("data")
    _out_flags(p, "evaluation")
    _tta_flag(p)
    p.add_argument("--exclude-duplicates-of", metavar="TRAIN_DIR",
                   help="also report on the subset with no exact/near duplicate in TRAIN_DIR")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=bounded(int, 1, 65536), default=64)
    p.add_argument("--workers", type=bounded(int, 0, 256), default=0,
                   help="DataLoader processes decoding images (default 0)")
    p.add_argument("--groups", metavar="FILE.csv", help="patient/series groups (columns path,group; default: "
                   "per-patient sub-folders): with --exclude-duplicates-of, a group seen in training is not leak-free")
    p.add_argument("--backend", default="torch", help="torch (default) or onnx (no Grad-CAM in the gallery)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", parents=[common],
                       help="classify image files, folders and volumes (NIfTI, DICOM series)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="images, folders, NIfTI volumes (.nii, .nii.gz), multi-frame DICOMs, DICOM series folders")
    _tta_flag(p)
    _volume_flags(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output")
    p.add_argument("--backend", default="auto",
                   help="auto (default: a checked CPU export beside the checkpoint when one passed, else torch), "
                        "torch, onnx or openvino")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=bounded(int, 1, 65536), default=32)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable files (listed on stderr at the end) instead of stopping at the first")
    p.add_argument("--min-confidence", type=probability, default=0.0, metavar="P",
                   help="abstain (status low_confidence, no class in the table) below this probability")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", parents=[common],
                       help="Grad-CAM panels for images; per-slice results and a montage for volumes")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="PATH", help="images, folders or volumes, as for predict")
    p.add_argument("--class", dest="target", help="class to explain (default: the predicted class)")
    _out_flags(p, "gradcam")
    _volume_flags(p)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", parents=[common], help="export a checkpoint to ONNX or TorchScript")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", help="output file (default: beside the checkpoint; ./braintumor-reference.onnx "
                                 "for the reference model)")
    p.add_argument("--int8-calibration", metavar="DIR",
                   help="also quantize to int8 (ONNX), calibrated on images from DIR; faster on CPUs, not exact")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("audit", parents=[common],
                       help="find unreadable files, duplicates and train/test leakage")
    p.add_argument("data")
    p.add_argument("--against", metavar="OTHER_DATA", help="a second folder (e.g. the test set) to check for leaks")
    _out_flags(p, "audit")
    p.add_argument("--fail-on-leak", action="store_true", help="exit 1 when OTHER_DATA duplicates DATA")
    p.add_argument("--threshold", type=bounded(int, 0, 64), default=DEFAULT_THRESHOLD,
                   help=f"near duplicates: at most this many of the 256 perceptual-hash bits differ "
                        f"(default {DEFAULT_THRESHOLD}; 0: identical hashes only)")
    p.add_argument("--groups", metavar="FILE.csv", help="patient/series groups (columns path,group; default: "
                   "per-patient sub-folders): reports groups found on both sides of --against")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("calibrate", help="fit the OOD detector and temperature into a trained checkpoint")
    p.add_argument("checkpoint", help="a .pt checkpoint or run folder (its best.pt is rewritten in place)")
    p.add_argument("--data", help="training folder (default: the one stored in the checkpoint's config)")
    p.add_argument("--val", help="separate validation folder (default: the run's own split of --data)")
    p.add_argument("--accept-rate", type=probability, default=0.95,
                   help="fraction of validation slices the OOD threshold accepts (default 0.95)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("make-phantoms", parents=[common],
                       help="write a synthetic phantom data set (PNG folders) or volumes")
    p.add_argument("out")
    p.add_argument("--per-class", type=bounded(int, 1, 100_000), default=None,
                   help="slices (default 100) or volumes (default 1) per class")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--volumes", action="store_true",
                   help="write phantom volumes: NIfTI (.nii.gz), a DICOM series folder and a multi-frame DICOM each")
    p.add_argument("--slices", type=bounded(int, 1, 1024), default=24, help="axial slices per phantom volume (default 24)")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0)
    p.set_defaults(func=cmd_make_phantoms)

    p = sub.add_parser("demo", parents=[common], help="phantom data → train a small model on the CPU → report")
    p.add_argument("--out", default="demo-run", help="demo folder (default ./demo-run)")
    p.add_argument("--per-class", type=bounded(int, 2, 100_000), default=None, help="training phantoms per class")
    p.add_argument("--epochs", type=bounded(int, 1, 100_000), default=None)
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", parents=[common], help="web page and JSON API for predictions")
    p.add_argument("checkpoint", nargs="?", default="reference",
                   help=CHECKPOINT_HELP + " (default: reference)")
    _tta_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000)
    p.add_argument("--max-file-mb", type=bounded(int, 1, 1024), default=20)
    p.add_argument("--max-files", type=bounded(int, 1, 1024), default=16)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--backend", default="torch", help="torch (default; needed for Grad-CAM) or onnx")
    p.add_argument("--min-confidence", type=probability, default=0.0, metavar="P",
                   help="abstain (shown as uncertain) below this probability")
    p.set_defaults(func=cmd_serve)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(one_line(f"warning: {message}"), file=sys.stderr)


class _TqdmHandler(logging.Handler):
    """Log lines through tqdm.write, so they land above any progress bar: information (the run's progress) on
    stdout, warnings and errors on stderr, which a failing command keeps to its one error line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout if record.levelno < logging.WARNING else sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """stdlib logging for the ``braintumor`` loggers: INFO by default, WARNING with -q, DEBUG with -v."""
    logger = logging.getLogger("braintumor")
    for handler in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    configure_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except UserError as err:
        print(one_line(f"error: {err}"), file=sys.stderr)
        return err.exit_code
    except OSError as err:  # an output folder that cannot be written, a full disk, ...: the user's to fix
        print(one_line(f"error: {err.strerror or err}" + (f": {err.filename}" if err.filename else "")),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
