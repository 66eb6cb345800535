"""CPU inference of a trained checkpoint on real labelled slices: accuracy, agreement with float32 and latency.

Exports the checkpoint to ONNX (float32) and to int8 (static QDQ, calibrated on real training slices), then runs
every CPU backend on the same slices: ONNX Runtime float32 (the reference), ONNX Runtime int8, and OpenVINO float32
and int8 when ``openvino`` is installed (``pip install braintumor[openvino]``). For each: accuracy, agreement
with float32, and ``Classifier.predict`` latency per slice from the file's bytes, split into decode,
preprocessing and network. Each accelerated backend's verdict (braintumor.inference.accelerated.judge) is written beside
its export, where ``braintumor predict --backend auto`` finds it.

    python benchmarks/cpu_inference.py --checkpoint runs/ref/best.pt --data Training --split val
    python benchmarks/cpu_inference.py --checkpoint runs/ref/best.pt --data Testing --calibration Training

``--split val`` evaluates the checkpoint's own validation split of ``--data`` (recomputed from its config) and
calibrates on its training side; otherwise all of ``--data`` is evaluated and ``--calibration DIR`` gives the
calibration slices. On 2 cores, ResNet-152 at 224 px takes about 0.4 s per slice over the four backends.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from braintumor.inference.runtimes import OnnxBackend, export_tiers, load_onnx_session
from braintumor.models.checkpoint import ModelSpec, inside_package, load_checkpoint, resolve_checkpoint
from braintumor.inference.accelerated import compare_predictions, describe_verdict, judge, load_openvino, write_verdict
from braintumor.data.index import discover
from braintumor.errors import UserError
from braintumor.utils.devices import available_cores
from braintumor.inference.export import export_onnx, quantize_onnx
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.inference.classifier import Classifier
from braintumor.utils.jsonfiles import write_json
from braintumor.utils.outputs import refuse_overwrites


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .pt checkpoint or run folder")
    parser.add_argument("--data", required=True, help="labelled folder-per-class slices")
    parser.add_argument("--split", choices=("all", "val"), default="all",
                        help="val: the checkpoint's validation split of --data; all (default): every slice")
    parser.add_argument("--calibration", help="folder of calibration slices (default with --split val: the "
                                              "training side of the split)")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--max-images", type=int, default=0, help="evaluate at most this many slices (0: all)")
    parser.add_argument("--latency-runs", type=int, default=30, help="single-slice predictions timed per backend")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: available cores)")
    parser.add_argument("--out", help="folder for the exports and verdicts (default: beside the checkpoint)")
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO even when it is installed")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing exports (and their verdicts) in --out and the --json file")
    return parser.parse_args(argv)


def evaluation_set(args, ckpt) -> tuple[list[Path], list[int], list[Path], str]:
    """(paths, labels, calibration paths, description) in the checkpoint's class order."""
    classes = list(ckpt["classes"])
    if args.split == "val":
        from braintumor.training.config import TrainConfig, field_names
        from braintumor.data.index import prepare_split

        values = {k: v for k, v in (ckpt.get("config") or {}).items() if k in field_names()}
        cfg = TrainConfig(**{**values, "data": args.data, "val": None})
        split = prepare_split(cfg, progress=False)
        if split.classes != classes:
            raise SystemExit(f"error: {args.data} has classes {split.classes}, the checkpoint {classes}")
        paths, labels, calibration = split.val_paths, split.val_labels, split.train_paths
        source = split.val_source
    else:
        index = discover(args.data, classes=classes)
        paths, labels, calibration, source = index.paths, index.labels, [], f"all of {args.data}"
    if args.calibration:
        calibration = discover(args.calibration, classes=classes).paths
    if not calibration:
        print("note: no separate calibration slices given: calibrating on evaluated slices", file=sys.stderr)
        calibration = paths
    rng = random.Random(0)
    calibration = rng.sample(list(calibration), min(args.calibration_images, len(calibration)))
    if args.max_images and len(paths) > args.max_images:
        keep = sorted(rng.sample(range(len(paths)), args.max_images))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        source += f", {args.max_images} slices drawn at random (seed 0)"
    return list(paths), list(labels), calibration, source


def predicted_classes(classifier: Classifier, batches: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([classifier.predict_proba(batch).argmax(axis=1) for batch in batches])


def latency(classifier: Classifier, files: list[bytes]) -> dict[str, float]:
    """Median ms of Classifier.predict on single slices, and of its decode, preprocessing and network parts."""
    classifier.predict(files[0])  # warm-up: lazy initialisation, allocations
    parts: dict[str, list[float]] = {"total": [], "decode": [], "preprocess": [], "network": []}
    for data in files:
        start = time.perf_counter()
        classifier.predict(data)
        parts["total"].append(time.perf_counter() - start)
        start = time.perf_counter()
        image = classifier.load(data)
        decoded = time.perf_counter()
        batch = classifier.preprocess(image).unsqueeze(0)
        preprocessed = time.perf_counter()
        classifier.predict_proba(batch)
        parts["decode"].append(decoded - start)
        parts["preprocess"].append(preprocessed - decoded)
        parts["network"].append(time.perf_counter() - preprocessed)
    result = {f"{key}_ms": 1000 * statistics.median(values) for key, values in parts.items()}
    result["total_p95_ms"] = 1000 * float(np.percentile(parts["total"], 95))
    return result


def build_backends(args, checkpoint: Path, out: Path, calibration: list[Path]) -> dict[str, tuple[Classifier, Path]]:
    """name -> (classifier, export file); the float32 ONNX Runtime reference first."""
    stem = checkpoint.stem
    fp32 = export_onnx(checkpoint, out / f"{stem}.onnx")
    print(f"# exported {fp32}; calibrating int8 on {len(calibration)} slices", file=sys.stderr, flush=True)
    int8 = quantize_onnx(fp32, out / f"{stem}-int8.onnx", calibration, max_images=len(calibration))
    backends = {}
    for precision, path in (("fp32", fp32), ("int8", int8)):
        session, meta = load_onnx_session(path, threads=args.threads)
        backends[f"onnxruntime-{precision}"] = (onnx_classifier(session, meta), path)
    if not args.no_openvino:
        try:
            import openvino  # noqa: F401
        except ImportError:
            print("note: openvino is not installed (pip install 'braintumor[openvino]'): OpenVINO rows skipped",
                  file=sys.stderr)
        else:
            for precision, path in (("fp32", fp32), ("int8", int8)):
                session, meta = load_openvino(path, threads=args.threads)
                backends[f"openvino-{precision}"] = (onnx_classifier(session, meta), path)
    return backends


def onnx_classifier(session, meta) -> Classifier:
    spec = ModelSpec.from_dict(meta)
    return Classifier(OnnxBackend(session, tiers=export_tiers(meta), num_classes=len(spec.classes)), spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)  # a benchmark script may set process-wide state; library code never does
    checkpoint = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent
    # Checked before the work: the default --out is the checkpoint's folder, which may hold the user's own exports
    # and, for the shipped model, is the installed package.
    try:
        if inside_package(out):
            raise UserError(f"{out} lies inside the installed braintumor package, where nothing is written; pass "
                            "--out DIR for the exports and their verdicts")
        refuse_overwrites([("--out", out / f"{checkpoint.stem}.onnx"), ("--out", out / f"{checkpoint.stem}-int8.onnx"),
                           ("--json", args.json)], args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    paths, labels, calibration, source = evaluation_set(args, ckpt)
    start = time.perf_counter()
    backends = build_backends(args, checkpoint, out, calibration)
    export_seconds = time.perf_counter() - start
    reference = next(iter(backends.values()))[0]
    # Decode and preprocess once: every backend sees the same tensors, so only the network differs.
    tensors = [reference.preprocess(reference.load(path)) for path in paths]
    batches = [torch.stack(tensors[i:i + args.batch_size]) for i in range(0, len(tensors), args.batch_size)]
    files = [Path(path).read_bytes() for path in paths[:args.latency_runs]]
    labels_array = np.asarray(labels)
    torch_classifier = Classifier.from_checkpoint(checkpoint, backend="torch")
    rows, fingerprint, reference_predictions = {}, file_fingerprint(checkpoint), None
    for name, (classifier, export_path) in {"pytorch-fp32": (torch_classifier, checkpoint), **backends}.items():
        row = latency(classifier, files)
        if name != "pytorch-fp32":  # PyTorch is timed only: ONNX Runtime float32 matches it to ~1e-6
            predictions = predicted_classes(classifier, batches)
            if reference_predictions is None:
                reference_predictions = predictions
            row.update(judge(compare_predictions(reference_predictions, predictions, labels_array)))
            if name != "onnxruntime-fp32":
                # reference_latency_ms: --backend auto takes an export only when it was measured faster than PyTorch.
                row["verdict_file"] = str(write_verdict(export_path, name, {
                    **row, "latency_ms": row["total_ms"], "reference_latency_ms": rows["pytorch-fp32"]["total_ms"],
                    "source_fingerprint": fingerprint, "threads": threads, "data": source}))
        rows[name] = row
        print(f"# {name}: {row['total_ms']:.1f} ms per slice", file=sys.stderr, flush=True)

    print(f"\n{ckpt['arch']} at {ckpt['image_size']} px, checkpoint {checkpoint} ({fingerprint}); {len(paths)} "
          f"slices: {source}; {threads} threads on {available_cores()} available cores ({os.cpu_count()} logical); "
          f"1-minute load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; exports and int8 "
          f"calibration on {len(calibration)} slices took {export_seconds:.0f} s\n")
    print("| backend | accuracy | vs float32 (points) | agreement | predict ms (median) | p95 | decode | "
          "preprocess | network | default |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, row in rows.items():
        accuracy = f"{100 * row['accuracy']:.2f} %" if "accuracy" in row else "(= float32)"
        gap = f"{-row['accuracy_gap_points']:+.2f}" if "accuracy" in row else ""
        agreement = f"{100 * row['agreement']:.1f} %" if "agreement" in row else ""
        default = ("yes" if row["default_ok"] else "no (opt-in)") if "verdict_file" in row else "reference" \
            if name == "onnxruntime-fp32" else ""
        print(f"| {name} | {accuracy} | {gap} | {agreement} | {row['total_ms']:.1f} | {row['total_p95_ms']:.1f} | "
              f"{row['decode_ms']:.1f} | {row['preprocess_ms']:.1f} | {row['network_ms']:.1f} | {default} |")
    print()
    for name, row in rows.items():
        if "verdict_file" in row:
            print(describe_verdict(name, row))
    if args.json:
        write_json(args.json, {"checkpoint": str(checkpoint), "data": source, "n": len(paths), "threads": threads,
                               "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
