"""Export a checkpoint to ONNX or TorchScript with its class names and preprocessing, and load ONNX for inference.

ONNX files hold the network (input ``input`` (B, 3, S, S) normalized float32, output ``logits`` (B, C), dynamic batch
axis) and, in the model's ``metadata_props``, everything :class:`braintumor.predict.Classifier` needs to run it
alone: classes (JSON), image_size, mean, std, arch, the braintumor version and the source checkpoint's fingerprint.
When the checkpoint holds a fitted OOD detector and temperature (:mod:`braintumor.trust`), the graph has a second
output ``ood_score`` (B,) computed inside it, and ``trust`` in the metadata holds the temperature and fit summary.

Exporter choice (torch 2.14, onnx 1.23, onnxscript 0.7): the TorchScript-based exporter (``dynamo=False``)
writes the requested opset 17 directly, takes ~2 s for resnet18, and matches eager PyTorch to ~1e-6 relative.
The torch.export-based exporter (``dynamo=True``, with ``dynamic_shapes``) also works offline and is as exact,
but cannot go below opset 18 (its down-conversion to 17 fails on ResNet's ReduceMean/Squeeze axes), is ~5x slower
to export, and prints progress lines; switch to it when torch drops the TorchScript-based one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_write
from .checkpoint import REFERENCE_MODEL, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .errors import UserError

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME, OOD_OUTPUT_NAME = "input", "logits", "ood_score"
TORCHSCRIPT_META = "braintumor.json"
# The keys every braintumor export carries; their presence is what tells our files from other ONNX models.
META_KEYS = ("classes", "image_size", "mean", "std", "arch", "braintumor_version", "source_fingerprint")
# Keys added later; files without them get the default.
OPTIONAL_META = {"tta": False}
MIN_OPSET = 13


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Export ``checkpoint`` as ``fmt`` ("onnx" or "torchscript") to ``out`` (default: beside it); return the path."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    source = _checkpoint_file(checkpoint)
    if out is None:
        out = default_export_path(source, fmt)
    if Path(out).resolve() == source.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another file name")
    return export_onnx(source, out) if fmt == "onnx" else export_torchscript(source, out)


def default_export_path(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """Beside the checkpoint, named after it; the reference model's export goes to the current folder (never
    into the installed package)."""
    source = _checkpoint_file(checkpoint)
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    return Path(f"braintumor-reference{suffix}") if source == REFERENCE_MODEL else source.with_suffix(suffix)


def export_onnx(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, opset: int = 17) -> Path:
    """Write the checkpoint's network as a checked ONNX model with braintumor metadata (atomically)."""
    import onnx

    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(f"ONNX opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    model, meta = _load_for_export(checkpoint_path)
    output_names = [OUTPUT_NAME]
    if meta.get("trust") is not None and model_trust_detector(model) is not None:
        output_names.append(OOD_OUTPUT_NAME)
    example = torch.zeros(2, 3, meta["image_size"], meta["image_size"])
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter announces its own deprecation; the choice is explained above.
        warnings.simplefilter("ignore", DeprecationWarning)
        buffer = io.BytesIO()
        torch.onnx.export(
            model, (example,), buffer, input_names=[INPUT_NAME], output_names=output_names,
            opset_version=opset, dynamo=False, do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    del proto.metadata_props[:]
    for key, value in _encode_meta(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"braintumor {meta['arch']} classifier ({', '.join(meta['classes'])}); research use only"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    return atomic_write(out_path, lambda handle: handle.write(data))


def export_torchscript(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the checkpoint's network as TorchScript (scripted: any batch size) with ``braintumor.json`` inside."""
    model, meta = _load_for_export(checkpoint_path, with_ood=False)
    extra_files = {TORCHSCRIPT_META: json.dumps(meta)}
    with warnings.catch_warnings():
        # torch.jit warns that it is deprecated in favour of torch.export; TorchScript is what was asked for.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
        return atomic_write(out_path, lambda handle: torch.jit.save(scripted, handle, _extra_files=extra_files))


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript export (eval mode, CPU) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript model not found: {path}")
    extra_files = {TORCHSCRIPT_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except Exception as err:
        raise UserError(f"cannot load TorchScript model {path}: {_first_line(err)}") from err
    if not extra_files[TORCHSCRIPT_META]:
        raise UserError(f"{path} is TorchScript but not a braintumor export (no {TORCHSCRIPT_META} inside)")
    return module.eval(), json.loads(extra_files[TORCHSCRIPT_META])


def quantize_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike, calibration_images: Sequence,
                  max_images: int = 64) -> Path:
    """Write an int8 copy of a braintumor ONNX export (static, per-channel weights, QDQ), calibrated on images.

    About twice as fast on x86 CPUs with AVX512-VNNI, at the cost of exactness: probabilities move by up to a few
    percent, so check accuracy on a held-out set before using it. ``calibration_images`` (paths, bytes or PIL
    images; the first ``max_images`` are used) should look like the data the model will see, e.g. training slices.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    import onnx

    from .data.io import read_image
    from .data.transforms import eval_transform

    _, meta = load_onnx_session(onnx_path, threads=1)  # a braintumor export, or a UserError
    images = list(calibration_images)[:max_images]
    if not images:
        raise UserError("int8 quantization needs calibration images: give a few dozen typical slices")
    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter(images)

        def get_next(self):
            item = next(self._items, None)
            if item is None:
                return None
            return {INPUT_NAME: transform(read_image(item)).unsqueeze(0).numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference and graph clean-up first, as onnxruntime's quantization guide prescribes.
        quant_pre_process(str(onnx_path), str(prepared))
        quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(quantized))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "quantization", json.dumps(
        {"type": "int8 static QDQ, per-channel weights", "calibration_images": len(images)})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    return atomic_write(out_path, lambda handle: handle.write(data))


def load_onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime session for a braintumor ONNX export and its metadata dict.

    ``threads`` sets intra-op parallelism (default: the CPU cores this process may use). Raises UserError when
    the file is missing, is not an ONNX model, or lacks braintumor metadata.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A single-image CNN is one chain of operators: parallelism inside operators is all there is to use.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads) if threads else available_cores()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise UserError(f"{path} is not a readable ONNX model: {_first_line(err)}") from err
    props = session.get_modelmeta().custom_metadata_map
    meta = _decode_meta(props, path)
    if "trust" in props:
        meta["trust"] = json.loads(props["trust"])
    if "quantization" in props:
        meta["quantization"] = json.loads(props["quantization"])
    return session, meta


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _checkpoint_file(path: str | os.PathLike) -> Path:
    """"reference" or a run folder resolved to a file, as load_checkpoint does."""
    return resolve_checkpoint(path)


def model_trust_detector(model: torch.nn.Module):
    """The OOD detector of a network prepared for export, or None."""
    return getattr(model, "detector", None)


def _load_for_export(checkpoint_path: str | os.PathLike, with_ood: bool = True,
                     ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's network in eval mode, fp32, on CPU (with its OOD detector as a second output when it has
    one and ``with_ood``), and the metadata that goes with it."""
    from .ood import MahalanobisDetector, ScoringNet
    from .predict import file_fingerprint

    source = _checkpoint_file(checkpoint_path)
    ckpt = load_checkpoint(source)
    model = model_from_checkpoint(ckpt, source).float().cpu().eval()
    meta = {
        "classes": [str(name) for name in ckpt["classes"]],
        "image_size": int(ckpt["image_size"]),
        "mean": [float(v) for v in ckpt["mean"]],
        "std": [float(v) for v in ckpt["std"]],
        "arch": str(ckpt["arch"]),
        "braintumor_version": __version__,
        "source_fingerprint": file_fingerprint(source),
        "tta": bool(ckpt.get("tta", False)),
    }
    trust = ckpt.get("trust")
    if trust is not None:
        # The temperature and the fit's summary travel as metadata; the detector's tensors live in the graph.
        meta["trust"] = {key: value for key, value in trust.items() if key != "ood"}
        if with_ood and trust.get("ood") is not None:
            model = ScoringNet(model, MahalanobisDetector.from_state(trust["ood"])).eval()
    return model, meta


def _encode_meta(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata values are strings: JSON for each one, so lists and numbers round-trip exactly."""
    return {key: json.dumps(meta[key]) for key in (*META_KEYS, *OPTIONAL_META, "trust") if key in meta}


def _decode_meta(props: dict[str, str], path: Path) -> dict[str, Any]:
    missing = [key for key in META_KEYS if key not in props]
    if missing:
        raise UserError(f"{path} is an ONNX model but not a braintumor export (missing metadata: "
                        f"{', '.join(missing)}); create it with `braintumor export CHECKPOINT --format onnx`")
    try:
        meta = {key: json.loads(props[key]) for key in META_KEYS}
        meta.update({key: json.loads(props[key]) if key in props else default
                     for key, default in OPTIONAL_META.items()})
        meta["image_size"] = int(meta["image_size"])
        if not (isinstance(meta["classes"], list) and len(meta["classes"]) >= 2
                and len(meta["mean"]) == 3 and len(meta["std"]) == 3):
            raise ValueError("classes, mean or std malformed")
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} has corrupt braintumor metadata ({err}); export it again") from err
    return meta


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
