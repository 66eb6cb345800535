"""The ``braintumor`` command: parse flags, call the Python API, print, exit with a clear code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from braintumor import RESEARCH_NOTE, __version__
from braintumor.data.dedup import DEFAULT_THRESHOLD
from braintumor.errors import UserError

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


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default: appended here unless the help already words it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return text if action.default is None else f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag on one line (exit 2) instead of usage plus message, and shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Replaced(argparse.Action):
    """A flag that was replaced: a one-line error naming the replacement (hidden from --help)."""

    def __init__(self, option_strings, dest, replacement: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was replaced by {self.replacement}")


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


_TYPES = {"int": int, "int | None": int, "float": float, "str": str, "str | None": str}
_METAVARS = {"int": "N", "int | None": "N", "float": "X"}


def config_flag(p: argparse.ArgumentParser, key: str, default=None) -> None:
    """Add the flag of TrainConfig option ``key``, generated from its field: type, choices, help and shown
    default. ``default`` None (train): a flag not given leaves the recipe's or --config's value in place."""
    from braintumor.training.config import FIELDS, flag_name, shown_default

    f = FIELDS[key]
    meta, kind = f.metadata, str(f.type)
    choices = meta["choices"]
    text = f"{meta['help']} (default: {shown_default(key)})".replace("%", "%%")
    if kind == "bool":
        p.add_argument(f"--{flag_name(key)}", dest=key, action=argparse.BooleanOptionalAction, default=default,
                       help=text)
        return
    metavar = meta["metavar"] or ("{" + ",".join(choices) + "}" if choices else
                                  _METAVARS.get(kind, flag_name(key).upper().replace("-", "_")))
    p.add_argument(f"--{flag_name(key)}", dest=key, type=_TYPES[kind], default=default, metavar=metavar, help=text)


def _train_parser(p: argparse.ArgumentParser) -> None:
    """``train``: DATA, the sources of options (--recipe, --config, --resume), then one flag per config option."""
    from braintumor.training.config import FIELDS

    p.add_argument("data", nargs="?", help="training folder with one sub-folder per class (or data: in --config)")
    p.add_argument("--recipe", help="a shipped recipe (see `braintumor recipes`); --config and flags override it "
                                    "(default: none)")
    p.add_argument("--config", help="YAML file of options, e.g. a run's config.yaml; flags override it "
                                    "(default: none)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt with its own "
                   "data and recipe; only --epochs and launch settings may be given (default: a new run)")
    recipe = p.add_argument_group("recipe options (saved in the run's config.yaml)")
    launch = p.add_argument_group("launch options (this launch only; may change on --resume)")
    for key, f in FIELDS.items():
        if f.metadata["flag"]:
            config_flag(launch if f.metadata["launch"] else recipe, key)
    p.add_argument("--compile", action=Replaced, replacement="--train-step compile")
    p.set_defaults(func=cmd_train)


def train_options(args) -> dict:
    """The config options given on the command line (DATA and every generated flag that was used)."""
    from braintumor.training.config import FIELDS

    return {key: getattr(args, key) for key, f in FIELDS.items()
            if (f.metadata["flag"] or key == "data") and getattr(args, key) is not None}


def cmd_train(args) -> int:
    from braintumor.training.config import read_config_file, read_recipe, resolve_config
    from braintumor.training.trainer import resume, train

    given = train_options(args)
    if args.resume:
        mixed = [name for name, value in (("DATA", args.data), ("--config", args.config), ("--recipe", args.recipe))
                 if value]
        if mixed:
            raise UserError(f"--resume continues {args.resume} with its own data and recipe, so {mixed[0]} cannot be "
                            "given; only --epochs and launch options (--device, --workers, ...) may change")
        result = resume(args.resume, given)
    else:
        file_values = read_recipe(args.recipe) if args.recipe else {}
        file_values.update(read_config_file(args.config) if args.config else {})
        result = train(resolve_config(file_values, given))
    if result.report is not None:
        print(f"best validation accuracy {result.best_val_accuracy:.2%}; run folder: {result.run_dir}")
        print(f"report: {result.run_dir / 'report.md'}")
    return 0


def cmd_recipes(args) -> int:
    from braintumor.training.config import list_recipes

    recipes = list_recipes()
    width = max(map(len, recipes))
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    print("use: braintumor train DATA --recipe NAME (flags override the recipe's options)")
    return 0


def note_cpu_only(backend: str, device: str) -> None:
    """One line on stderr when --device asks for more than the CPU but the model is an ONNX/OpenVINO export."""
    if backend in ("onnx", "openvino") and device != "cpu":
        print(f"note: the {backend} model runs on the CPU (--device {device} applies to .pt checkpoints)",
              file=sys.stderr)


def _model_kind(checkpoint: str) -> str | None:
    """The model file's format by its content (models/formats), or None when it cannot be told yet (loading the
    model reports the problem)."""
    from braintumor.models.formats import model_format
    from braintumor.models.checkpoint import resolve_checkpoint

    try:
        return model_format(resolve_checkpoint(checkpoint))
    except (UserError, OSError):
        return None


def _model_backend(checkpoint: str, backend: str) -> str:
    """The runtime a model file runs on, for the CPU-only note."""
    from braintumor.models.formats import ONNX

    return "onnx" if _model_kind(checkpoint) == ONNX else backend


def _progress(total: int, quiet: bool, unit: str):
    """A tqdm bar on stderr (shown on a terminal only, never with -q)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, disable=True if quiet else None, leave=False,
                dynamic_ncols=True)


def cmd_evaluate(args) -> int:
    from braintumor.evaluation.evaluate import evaluate_checkpoint
    from braintumor.utils.outputs import staged_output_dir
    from braintumor.evaluation.report import format_table

    note_cpu_only(_model_backend(args.checkpoint, args.backend), args.device)
    with staged_output_dir(args.out, "evaluation", overwrite=args.overwrite) as staged:  # all or nothing
        report = evaluate_checkpoint(args.checkpoint, args.data, staged.path, device=args.device,
                                     batch_size=args.batch_size, exclude_duplicates_of=args.exclude_duplicates_of,
                                     skip_bad=args.skip_bad, workers=args.workers, tta=args.tta, groups=args.groups,
                                     backend=args.backend, min_confidence=args.min_confidence,
                                     progress=not getattr(args, "quiet", False))
    out = staged.target
    print(format_table(report["metrics"]))
    for name, subset in report.get("subsets", {}).items():
        print(f"{name}: accuracy {subset['accuracy']:.2%} on {subset['n']} images")
    trust = report["metrics"].get("trust", {})
    for status, accuracy in trust.get("accuracy_by_status", {}).items():
        count = trust["statuses"].get(status, 0)
        print(f"{status}: {count} slice(s)" + ("" if accuracy is None else f", accuracy {accuracy:.2%}"))
    print(f"per-image results: {out / 'predictions.csv'}")
    print(f"report: {out / 'report.md'}")
    return 0


def _volume_rule(args):
    from braintumor.inference.volume_verdict import VerdictRule

    return VerdictRule(threshold=args.slice_threshold, min_slices=args.min_slices)


def _model_note(classifier) -> str | None:
    """What the model lacks for the full status (no trust tiers, no not-MRI tier), or None."""
    missing = getattr(classifier.runtime, "missing", None)
    if missing is None and not classifier.has_ood:
        missing = "no trust tiers fitted: refit with braintumor calibrate"
    return missing


def cmd_predict(args) -> int:
    from braintumor.data.pixels import ImageReadError
    from braintumor.inference.classifier import Classifier
    from braintumor.inference.service import VolumeResult, discover_inputs, predict_paths
    from braintumor.inference.writers import PredictionWriter

    rule = _volume_rule(args)
    classifier = Classifier.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend,
                                            tta=args.tta)
    found = discover_inputs(args.paths)
    classifier.min_confidence = args.min_confidence
    note_cpu_only(classifier.backend, args.device)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    width = max(len(str(p)) for p in [*found.images, *found.volumes] or ["image"])
    writer = PredictionWriter(sys.stdout, classifier.classes, fmt, width=width, min_confidence=args.min_confidence)
    skipped: list[tuple[str, str]] = []
    volumes = []
    total = len(found.images) + len(found.volumes)
    # The bar shares the terminal with the rows only when they go elsewhere (a file, a pipe) or come at the end.
    rows_on_terminal = sys.stdout.isatty() and fmt != "json"
    with _progress(total, getattr(args, "quiet", False) or total < 2 or rows_on_terminal, "file") as bar:
        try:
            for result in predict_paths(classifier, found, rule=rule, batch_size=args.batch_size,
                                        skip_bad=args.skip_bad, on_skip=lambda s, r: skipped.append((s, r)),
                                        progress=bar.update):
                if isinstance(result, VolumeResult):
                    writer.write_volume(result)
                    volumes.append(result)
                else:
                    writer.write(result)
        except ImageReadError as err:
            done = f" after {writer.count} prediction(s)" if writer.count else ""
            raise UserError(f"{err}{done}; rerun with --skip-bad to skip unreadable files") from None
    if not writer.count:
        raise UserError(f"none of the {total} file(s) could be read")
    writer.close()
    lines = writer.legend()
    for v in volumes:
        if fmt != "json":  # JSON carries the verdict in the volume's object
            lines.append(f"{v.source}: volume verdict {v.verdict or 'NOT RECOGNISED'} (status {v.status}; "
                         f"{v.evidence}; {len(v.probabilities)} axial slices)")
    if volumes and fmt == "table":
        lines.append(f"volume rule: {volumes[0].rule}. Per-slice results: --csv or --json; montage: braintumor explain")
    note = _model_note(classifier)
    if note:
        lines.append(f"note: this model has {note}" if note.startswith("no ") else f"note: {note}")
    if getattr(args, "quiet", False):  # -q: only warnings
        lines = []
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable file(s): "
                     + "; ".join(f"{path} ({reason})" for path, reason in skipped))
    for line in lines:
        print(one_line(line), file=sys.stderr)
    return 0


def cmd_make_phantoms(args) -> int:
    if args.volumes:
        from braintumor.synthetic.volumes import write_phantom_volumes

        written = write_phantom_volumes(args.out, per_class=args.per_class or 1, size=args.size, slices=args.slices,
                                        seed=args.seed)
        print(f"wrote {len(written) // 3} phantom volumes, each as NIfTI, DICOM series folder and multi-frame "
              f"DICOM ({args.slices} axial slices of {args.size} px), to {args.out}")
        return 0
    from braintumor.synthetic.phantom import write_phantom_set

    per_class = 100 if args.per_class is None else args.per_class
    out = write_phantom_set(args.out, per_class=per_class, size=args.size, seed=args.seed)
    print(f"wrote {per_class} phantom slices per class to {out}")
    return 0


def cmd_demo(args) -> int:
    from braintumor.demo import run_demo

    run_demo(args.out, per_class=args.per_class, epochs=args.epochs, seed=args.seed)
    return 0


def cmd_audit(args) -> int:
    from braintumor.data.audit import audit, write_audit
    from braintumor.utils.outputs import staged_output_dir

    with staged_output_dir(args.out, "audit", overwrite=args.overwrite) as staged:  # all or nothing
        report = audit(args.data, against=args.against, threshold=args.threshold, progress=sys.stderr.isatty(),
                       groups=args.groups)
        json_path, md_path = write_audit(report, staged.path)
    json_path, md_path = staged.final(json_path), staged.final(md_path)
    summary = report["summary"]
    if report.get("leak_headline"):
        print(report["leak_headline"])
    print(" ".join(f"{key.replace('_', ' ')}: {value}" for key, value in summary.items()))
    print(f"report: {md_path}")
    if args.fail_on_leak and summary.get("leaked_images", 0) > 0:
        # The audited set (DATA) first, as in the headline: its images that duplicate one of OTHER_DATA.
        print(f"error: leak: {summary['duplicating_against']} image(s) of {args.data} duplicate images of "
              f"{args.against} ({summary['leaked_images']} of {args.against} duplicate images of {args.data}); "
              f"see {md_path}", file=sys.stderr)
        return 1
    return 0


def cmd_calibrate(args) -> int:
    """Refit the temperature and both trust tiers; never writes a shipped model (issue 25): the reference model
    and any file inside the installed package need --out, and --out never replaces a file without --overwrite."""
    from braintumor.models.checkpoint import inside_package, load_checkpoint, resolve_checkpoint
    from braintumor.training.config import from_saved
    from braintumor.trust.fitting import describe_trust, fit_trust_for_checkpoint
    from braintumor.utils.outputs import refuse_overwrite

    source = resolve_checkpoint(args.checkpoint)
    if args.out is None and (str(args.checkpoint) == "reference" or inside_package(source)):
        raise UserError(f"{args.checkpoint} is a model shipped inside the installed package, which calibrate never "
                        "rewrites; pass --out NEW.pt to write the refitted model to a new file")
    out = Path(args.out) if args.out is not None else source
    if args.out is not None:
        if inside_package(out):
            raise UserError(f"--out {out} lies inside the installed package, which calibrate never writes; "
                            "choose a path outside it")
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; give a file name such as {out / 'calibrated.pt'}")
        refuse_overwrite(out, args.overwrite)
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    values = dict(load_checkpoint(source).get("config") or {})
    for key in ("data", "val"):
        if getattr(args, key):
            values[key] = str(getattr(args, key))
    if not values.get("data"):
        raise UserError(f"{source} does not name its training data; pass --data TRAIN_DIR")
    settings = from_saved(values, str(source), progress=False, skip_bad=True).validate()
    trust = fit_trust_for_checkpoint(source, settings, out=out, atypical_rate=args.atypical_rate,
                                     device=args.device, batch_size=args.batch_size, workers=args.workers)
    for line in describe_trust(trust).splitlines():
        log.info("%s", line)
    print(out)
    return 0


def cmd_explain(args) -> int:
    from braintumor.visualize.explain import write_explanations
    from braintumor.utils.outputs import staged_output_dir
    from braintumor.inference.classifier import Classifier
    from braintumor.inference.service import discover_inputs, predict_volume
    from braintumor.inference.volume_verdict import write_volume_outputs
    from braintumor.data.volumes import read_volume

    from braintumor.models.formats import CHECKPOINT

    rule = _volume_rule(args)
    kind = _model_kind(args.checkpoint)
    if kind not in (None, CHECKPOINT):  # before loading it (which may say more): one line
        raise UserError(f"explanations need gradients: give the PyTorch checkpoint (.pt), not the {kind} export")
    classifier = Classifier.from_checkpoint(args.checkpoint, device=args.device)
    if classifier.model is None:
        raise UserError(f"explanations need gradients: give the PyTorch checkpoint (.pt), not the "
                        f"{classifier.backend} export")
    note_cpu_only(classifier.backend, args.device)
    found = discover_inputs(args.images)
    options = {"method": args.method, "layer": args.layer, "mirror": args.mirror}
    with staged_output_dir(args.out, "explanations", overwrite=args.overwrite) as staged:  # all or nothing
        out = staged.path
        written = write_explanations(classifier, found.images, out, target=args.target, **options) \
            if found.images else []
        for path in found.volumes:
            volume = read_volume(path)
            result = predict_volume(classifier, volume, rule)
            print(one_line(f"{result.source}: volume verdict {result.verdict or 'NOT RECOGNISED'} (status "
                           f"{result.status}; {result.evidence})"), file=sys.stderr)
            written.extend(write_volume_outputs(classifier, volume, result, out, **options))
    for path in written:
        print(staged.final(path))
    return 0


def cmd_export(args) -> int:
    from braintumor.inference.export import export_model

    written = export_model(args.checkpoint, args.format, args.out, overwrite=args.overwrite,
                           int8_calibration=args.int8_calibration, measure=args.measure)
    for path, note in written:
        kind = (" (int8, not exact: check it with `braintumor evaluate " + str(path) + " DATA`)"
                if args.int8_calibration and path == written[-1][0] else "")
        print(f"wrote {path}{kind}")
        if note:
            print(note, file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from braintumor.serve import run_server

    note_cpu_only(_model_backend(args.checkpoint, args.backend), args.device)
    run_server(args.checkpoint, host=args.host, port=args.port, max_file_bytes=args.max_file_mb * 2**20,
               max_files=args.max_files, device=args.device, backend=args.backend, tta=args.tta,
               min_confidence=args.min_confidence, budget_mb=args.memory_budget_mb)
    return 0


CHECKPOINT_HELP = ("a .pt checkpoint, a run folder, an exported .onnx file, or 'reference' "
                   "(the model shipped with braintumor; see MODEL_CARD.md)")
GROUPS_HELP = "patient/series groups, a CSV with columns path,group (default: per-patient sub-folders)"


def _tta_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each slice's prediction with its mirror's (default: as stored in the model)")


def _compute_flags(p: argparse.ArgumentParser, batch_size: int | None = None, workers: bool = False) -> None:
    """--device (and --batch-size, --workers) with the same meaning and default in every command."""
    from braintumor.training.config import DEFAULT_DEVICE, DEFAULT_WORKERS

    config_flag(p, "device", default=DEFAULT_DEVICE)
    if batch_size is not None:
        p.add_argument("--batch-size", type=bounded(int, 1, 65536), default=batch_size, help="images per batch")
    if workers:
        p.add_argument("--workers", type=bounded(int, 0, 256), default=DEFAULT_WORKERS,
                       help=f"DataLoader worker processes (default: {DEFAULT_WORKERS}, min(8, CPU cores))")


def _common_flags() -> argparse.ArgumentParser:
    """-q/-v for every subcommand (SUPPRESS: a flag given before the subcommand is not reset after it)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress messages: only warnings and errors (on stderr)")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also debug messages (on stderr, like progress, warnings and errors)")
    return common


def _volume_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slice-threshold", type=float, default=0.5, metavar="P",
                   help="volumes: a slice votes for a tumour class predicted with probability >= P")
    p.add_argument("--min-slices", type=int, default=2, metavar="N",
                   help="volumes: a tumour verdict needs at least N voting slices")


def _out_flags(p: argparse.ArgumentParser, default_parent: str) -> None:
    p.add_argument("--out", help=f"output folder (default: a new {default_parent}/<date-time>/); "
                                 "an existing folder with files needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")


def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("data", help="test folder with one sub-folder per class")
    _out_flags(p, "evaluation")
    _tta_flag(p)
    p.add_argument("--exclude-duplicates-of", metavar="TRAIN_DIR",
                   help="also report on the subset with no exact/near duplicate in TRAIN_DIR (default: not checked)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    _compute_flags(p, batch_size=64, workers=True)
    p.add_argument("--groups", metavar="FILE.csv", help=GROUPS_HELP + "; with --exclude-duplicates-of, a group "
                   "seen in training is not leak-free")
    p.add_argument("--backend", default="torch", help="torch or onnx (no Grad-CAM in the gallery)")
    p.add_argument("--min-confidence", type=probability, default=0.0, metavar="P",
                   help="status uncertain below this probability (reported apart in the metrics)")
    p.set_defaults(func=cmd_evaluate)


def _predict_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="images, folders, NIfTI volumes (.nii, .nii.gz), multi-frame DICOMs, DICOM series folders")
    _tta_flag(p)
    _volume_flags(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output (default: a table)")
    fmt.add_argument("--csv", action="store_true", help="CSV output (default: a table)")
    p.add_argument("--backend", default="auto",
                   help="auto (a checked CPU export beside the checkpoint when one passed, else torch), "
                        "torch, onnx or openvino")
    _compute_flags(p, batch_size=32)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable files (listed on stderr at the end) instead of stopping at the first")
    p.add_argument("--min-confidence", type=probability, default=0.0, metavar="P",
                   help="abstain (status uncertain, no class in the table) below this probability")
    p.set_defaults(func=cmd_predict)


def _explain_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", metavar="PATH", help="images, folders or volumes, as for predict")
    p.add_argument("--class", dest="target", help="class to explain (default: the predicted class)")
    p.add_argument("--method", default=None, help="explanation method: gradcampp, gradcam, hirescam, layercam, "
                   "occlusion or integrated-gradients (default: gradcampp, the best of the localisation benchmark)")
    p.add_argument("--layer", default=None, help="the block a CAM method reads, e.g. layer2, layer3, layer4 (default: "
                   "the method's own: layer4 for gradcam, layer3 for the others)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="average each map with the map of the mirrored slice, flipped back (default: on, the better "
                        "of the localisation benchmark; --no-mirror: the single-view map, half the time)")
    _out_flags(p, "explanations")
    _volume_flags(p)
    _compute_flags(p)
    p.set_defaults(func=cmd_explain)


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format")
    p.add_argument("--out", help="output file (default: beside the checkpoint, named after it with the format's "
                                 "suffix, e.g. RUN/best.onnx; ./braintumor-reference.onnx for the reference model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--int8-calibration", metavar="DIR", help="also quantize to int8 (ONNX), calibrated on images "
                   "from DIR; faster on CPUs, not exact (default: no int8 model)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="ONNX: compare each export with the checkpoint (classes, statuses, speed) and write the "
                        "verdict beside it, which predict/evaluate/serve --backend auto read (default: on)")
    p.set_defaults(func=cmd_export)


def _audit_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="folder with one sub-folder per class")
    p.add_argument("--against", metavar="OTHER_DATA",
                   help="a second folder (e.g. the test set) to check for leaks (default: none)")
    _out_flags(p, "audit")
    p.add_argument("--fail-on-leak", action="store_true",
                   help="exit 1 when DATA and OTHER_DATA share images (exact or near duplicates)")
    p.add_argument("--threshold", type=bounded(int, 0, 64), default=DEFAULT_THRESHOLD,
                   help="near duplicates: at most this many of the 256 perceptual-hash bits differ "
                        "(0: identical hashes only)")
    p.add_argument("--groups", metavar="FILE.csv", help=GROUPS_HELP + "; reports groups found on both sides of "
                   "--against")
    p.set_defaults(func=cmd_audit)


def _calibrate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt checkpoint or run folder (its best.pt); rewritten in place unless "
                   "--out is given; `reference` and any model inside the installed package need --out")
    p.add_argument("--out", metavar="NEW.pt", help="write the refitted checkpoint to this new file (an existing one "
                   "needs --overwrite) (default: rewrite CHECKPOINT in place; required for reference)")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    p.add_argument("--data", help="training folder (default: the one stored in the checkpoint's config)")
    p.add_argument("--val", help="separate validation folder (default: the run's own split of --data)")
    p.add_argument("--atypical-rate", type=probability, default=0.02,
                   help="share of each class's validation slices the atypical tier flags (default: 0.02)")
    _compute_flags(p, batch_size=64, workers=True)
    p.set_defaults(func=cmd_calibrate)


def _make_phantoms_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write")
    p.add_argument("--per-class", type=bounded(int, 1, 100_000), default=None,
                   help="slices or volumes per class (default: 100 slices, 1 volume)")
    from braintumor.synthetic.phantom import MAX_SIZE, MIN_SIZE

    p.add_argument("--size", type=bounded(int, MIN_SIZE, MAX_SIZE), default=128, help="image side in pixels")
    p.add_argument("--volumes", action="store_true",
                   help="write phantom volumes: NIfTI (.nii.gz), a DICOM series folder and a multi-frame DICOM each")
    p.add_argument("--slices", type=bounded(int, 1, 1024), default=24, help="axial slices per phantom volume")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="random seed")
    p.set_defaults(func=cmd_make_phantoms)


def _demo_parser(p: argparse.ArgumentParser) -> None:
    from braintumor.demo import DEMO_EPOCHS, DEMO_PER_CLASS

    p.add_argument("--out", default="demo-run", help="demo folder")
    p.add_argument("--per-class", type=bounded(int, 2, 100_000), default=DEMO_PER_CLASS,
                   help="training phantoms per class")
    p.add_argument("--epochs", type=bounded(int, 1, 100_000), default=DEMO_EPOCHS, help="training epochs")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="random seed")
    p.set_defaults(func=cmd_demo)


def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default="reference", help=CHECKPOINT_HELP + " (default: reference)")
    _tta_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="TCP port")
    p.add_argument("--max-file-mb", type=bounded(int, 1, 1024), default=20, help="largest upload, in MiB")
    p.add_argument("--max-files", type=bounded(int, 1, 1024), default=16, help="most files in one request")
    p.add_argument("--memory-budget-mb", type=bounded(int, 64, 1 << 20), default=None, metavar="MB",
                   help="memory for uploads and decoding in flight, all requests together; requests beyond it "
                        "get 503 with Retry-After (default: 1024)")
    _compute_flags(p)
    p.add_argument("--backend", default="torch", help="torch (needed for Grad-CAM) or onnx")
    p.add_argument("--min-confidence", type=probability, default=0.0, metavar="P",
                   help="abstain (shown as uncertain) below this probability")
    p.set_defaults(func=cmd_serve)


def _recipes_parser(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_recipes)


COMMANDS = {  # name -> (help, the function that adds its arguments)
    "train": ("train a ResNet on a folder-per-class data set (flags, a recipe or a YAML config)", _train_parser),
    "recipes": ("list the shipped training recipes", _recipes_parser),
    "evaluate": ("metrics, confusion matrix and calibration of a checkpoint on a folder", _evaluate_parser),
    "predict": ("classify image files, folders and volumes (NIfTI, DICOM series)", _predict_parser),
    "explain": ("explanation panels (Grad-CAM++ by default) for images; per-slice results and a montage for volumes",
                _explain_parser),
    "export": ("export a checkpoint to ONNX or TorchScript", _export_parser),
    "audit": ("find unreadable files, duplicates and train/test leakage", _audit_parser),
    "calibrate": ("refit the trust tiers (not_mri, atypical) and the temperature of a trained checkpoint",
                  _calibrate_parser),
    "make-phantoms": ("write a synthetic phantom data set (PNG folders) or volumes", _make_phantoms_parser),
    "demo": ("phantom data → train a small model on the CPU → report", _demo_parser),
    "serve": ("web page and JSON API for predictions", _serve_parser),
}


def build_parser() -> Parser:
    """The ``braintumor`` parser: one sub-command per entry of COMMANDS, each with -q/-v."""
    common = _common_flags()
    parser = Parser(prog="braintumor", description=f"Brain MRI slice classification. {RESEARCH_NOTE}",
                    parents=[common])
    parser.add_argument("--version", action="version", version=f"braintumor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (help_text, add_arguments) in COMMANDS.items():
        add_arguments(sub.add_parser(name, parents=[common], help=help_text, description=help_text))
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(one_line(f"warning: {message}"), file=sys.stderr)


class _TqdmHandler(logging.Handler):
    """Log lines through tqdm.write, so they land above any progress bar, on stderr: progress, status, warnings
    and errors are human lines; stdout holds only each command's results (printed by the command itself)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
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


def _keep_file_names() -> None:
    """File names that are not valid UTF-8 reach stdout/stderr as their own bytes instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="surrogateescape" if stream is sys.stdout else "backslashreplace")
        except (AttributeError, ValueError):  # not a TextIOWrapper (tests capture output)
            pass


def _closed_pipe() -> int:
    """stdout's reader went away (``| head``): stop quietly, like other Unix tools (exit 141 is SIGPIPE's)."""
    try:  # later writes (and the interpreter's final flush) must not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, 130 when interrupted, 141 for a closed pipe)."""
    args = build_parser().parse_args(argv)
    configure_logging(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    _keep_file_names()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            code = args.func(args)
            sys.stdout.flush()
            return code
    except BrokenPipeError:
        return _closed_pipe()
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
