"""CPU inference latency and throughput: PyTorch eager vs ONNX Runtime, preprocessing included.

Builds a randomly initialised checkpoint (no download) in a temporary folder, exports it to ONNX, and times
``Classifier.predict`` from encoded JPEG bytes to a Prediction: decode, resize, normalize, network, softmax.
Prints a markdown table (single-image median / p95 latency and batch throughput) with the machine it ran on.

    python benchmarks/predict_latency.py                      # ResNet-152 at 224 px, all cores
    python benchmarks/predict_latency.py --threads 2 --runs 50

Random weights time the same as trained ones: every layer does the same dense arithmetic either way. The int8 row
is calibrated on 16 phantom slices; its probabilities differ from fp32 (see export.quantize_onnx).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from PIL import Image

from braintumor.inference.runtimes import OnnxBackend, load_onnx_session
from braintumor.models.checkpoint import ModelSpec, random_checkpoint
from braintumor.utils.devices import available_cores
from braintumor.inference.export import export_onnx, quantize_onnx
from braintumor.models.network import ARCHS
from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom
from braintumor.inference.classifier import Classifier


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet152", choices=ARCHS)
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default 224)")
    parser.add_argument("--source-size", type=int, default=512, help="size of the encoded JPEG slice (default 512)")
    parser.add_argument("--runs", type=int, default=30, help="timed single-image runs per backend (>= 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (allocations, lazy init)")
    parser.add_argument("--batch", type=int, default=16, help="batch size for the throughput measurement")
    parser.add_argument("--batch-runs", type=int, default=3, help="timed batches per backend")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: available cores)")
    parser.add_argument("--channels-last", action="store_true",
                        help="time PyTorch in NHWC memory format (slower than NCHW for ResNet-152 on a 2-core EPYC)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8-quantized ONNX Runtime row")
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error("--runs must be at least 20 so that the p95 means something")
    return args


def jpeg_slice(size: int, label: str = "glioma", seed: int = 0) -> bytes:
    """A synthetic MRI-like slice as the JPEG bytes a client would upload."""
    buffer = io.BytesIO()
    Image.fromarray(make_phantom(label, size, seed)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def time_single(classifier: Classifier, data: bytes, runs: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``runs`` single-image predictions (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        classifier.predict(data)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        classifier.predict(data)
        timings.append(time.perf_counter() - start)
    return timings


def time_batch(classifier: Classifier, data: bytes, batch: int, runs: int) -> float:
    """Images per second for batches of ``batch`` predictions (median batch time; one untimed batch first)."""
    items = [data] * batch
    classifier.predict(items, batch_size=batch)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        classifier.predict(items, batch_size=batch)
        timings.append(time.perf_counter() - start)
    return batch / statistics.median(timings)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def build_classifiers(args, workdir: Path) -> dict[str, Classifier]:
    """The same random network behind both backends."""
    checkpoint = random_checkpoint(workdir / "random.pt", arch=args.arch, image_size=args.image_size)
    eager = Classifier.from_checkpoint(checkpoint)
    if args.channels_last:
        eager.model.to(memory_format=torch.channels_last)  # in place: the backend's network
    onnx_path = export_onnx(checkpoint, workdir / "random.onnx")
    # ONNX Runtime first: torch's OpenMP workers keep spinning for a moment after each call and would slow it.
    classifiers = {"ONNX Runtime": onnx_classifier(onnx_path, args.threads)}
    if not args.no_int8:
        calibration = [jpeg_slice(args.source_size, label, seed) for seed in range(4) for label in PHANTOM_CLASSES]
        int8_path = quantize_onnx(onnx_path, workdir / "random-int8.onnx", calibration)
        classifiers["ONNX Runtime int8 (static QDQ)"] = onnx_classifier(int8_path, args.threads)
    eager_name = "PyTorch eager" + (" (channels_last)" if args.channels_last else "")
    classifiers[eager_name] = eager
    return classifiers


def onnx_classifier(path: Path, threads: int | None) -> Classifier:
    session, meta = load_onnx_session(path, threads=threads)
    return Classifier(OnnxBackend(session), ModelSpec.from_dict(meta))


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or available_cores()
    # A benchmark script may set process-wide state; library code never does.
    torch.set_num_threads(threads)
    data = jpeg_slice(args.source_size)
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        classifiers = build_classifiers(args, Path(tmp))
        for name, classifier in classifiers.items():
            single = np.array(time_single(classifier, data, args.runs, args.warmup)) * 1000.0
            throughput = time_batch(classifier, data, args.batch, args.batch_runs)
            rows.append((name, float(np.median(single)), float(np.percentile(single, 95)), throughput))
            print(f"# {name}: done", file=sys.stderr, flush=True)
    load_after = load_average()
    print(f"{args.arch} at {args.image_size} px, from a {args.source_size} px JPEG (decode + resize + normalize "
          f"included); {threads} intra-op threads on {available_cores()} available cores ({cpu_name()}, "
          f"{os.cpu_count()} logical); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"1-minute load average {load_before} before, {load_after} after (above the thread count: other "
          f"processes competed for the cores)\n")
    print(f"| backend | single image median (ms) | single image p95 (ms) | batch {args.batch} throughput (img/s) |")
    print("|---|---:|---:|---:|")
    for name, median, p95, throughput in rows:
        print(f"| {name} | {median:.1f} | {p95:.1f} | {throughput:.1f} |")
    print(f"\n{args.runs} timed single-image runs after {args.warmup} warm-up runs; throughput from the median of "
          f"{args.batch_runs} batches.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
