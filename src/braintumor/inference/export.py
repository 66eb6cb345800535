"""Export a checkpoint to ONNX or TorchScript with its ModelSpec, and quantize an ONNX export to int8.

Every export carries everything the checkpoint's predictions depend on. ONNX files hold the network (input
``input`` (B, 3, S, S) normalized float32, output ``logits`` (B, C), dynamic batch axis) and, in the model's
``metadata_props``, everything :class:`braintumor.inference.classifier.Classifier` needs to run it alone: the spec
(classes, image_size, mean, std, arch, tta), the braintumor version and the source checkpoint's fingerprint
(:func:`braintumor.inference.runtimes.export_metadata`; :mod:`braintumor.inference.runtimes` reads the files back).
When the checkpoint holds fitted trust tiers (:mod:`braintumor.trust`), the graph is the
:class:`braintumor.trust.ood.ScoringNet` with a second output ``trust_scores`` (B, 2) ``[not_mri, atypical]``
computed inside it, and ``trust`` in the metadata holds the temperature, the tiers and the fit summary.
TorchScript files are a trace of the same module (both outputs; any batch and image size) with the same metadata
stored inside the archive (``braintumor.json``).

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

from braintumor import __version__
from braintumor.utils.atomic import atomic_write
from braintumor.inference.runtimes import (INPUT_NAME, OUTPUT_NAME, TORCHSCRIPT_META, TRUST_OUTPUT_NAME,
                                           encode_onnx_metadata, export_metadata, load_onnx_session, scoring_module)
from braintumor.models.checkpoint import (REFERENCE_MODEL, load_checkpoint, missing_model_error, model_from_checkpoint,
                                          resolve_checkpoint, spec_of)
from braintumor.errors import UserError
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.utils.optional import require
from braintumor.utils.outputs import refuse_overwrite
from braintumor.models.formats import ONNX, SUFFIXES, TORCHSCRIPT

FORMATS = (ONNX, TORCHSCRIPT)
FORMAT_NAMES = {ONNX: "an ONNX", TORCHSCRIPT: "a TorchScript"}
MIN_OPSET = 13


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
           overwrite: bool = False) -> Path:
    """Export ``checkpoint`` as ``fmt`` ("onnx" or "torchscript") to ``out`` (default: beside it); return the path.

    ``out`` must end in a suffix of its format (``.onnx``; ``.ts``, ``.pt``, ``.pth`` or ``.torchscript``), so
    every reader can tell what the file is from its name as well as from its content. An existing ``out`` is
    replaced only with ``overwrite``."""
    source, out = export_target(checkpoint, fmt, out, overwrite=overwrite)
    return export_onnx(source, out) if fmt == ONNX else export_torchscript(source, out)


def export_target(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                  overwrite: bool = False) -> tuple[Path, Path]:
    """(source checkpoint, output path) of an export, checked before anything is written: a known format, an
    existing checkpoint, a suffix of the format, not the checkpoint itself, no file replaced without
    ``overwrite``."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    source = resolve_checkpoint(checkpoint)
    if not source.is_file():
        raise missing_model_error(source)
    out = default_export_path(source, fmt) if out is None else Path(out)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another file name")
    check_export_suffix(out, fmt)
    refuse_overwrite(out, overwrite)
    return source, out


def check_export_suffix(out: Path, fmt: str) -> None:
    """A one-line UserError when ``out``'s suffix belongs to another format (e.g. ONNX under a .pt name)."""
    allowed = SUFFIXES[fmt]
    if out.suffix.lower() not in allowed:
        other = [name for name in FORMATS if name != fmt and out.suffix.lower() in SUFFIXES[name]]
        hint = f" or pass --format {other[0]}" if other else ""
        raise UserError(f"--out {out} does not name {FORMAT_NAMES[fmt]} file: use a name ending in "
                        f"{' or '.join(allowed)}{hint}")


def default_export_path(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """Beside the checkpoint, named after it; the reference model's export goes to the current folder (never
    into the installed package)."""
    source = resolve_checkpoint(checkpoint)
    suffix = ".onnx" if fmt == ONNX else ".torchscript.pt"
    return Path(f"braintumor-reference{suffix}") if source == REFERENCE_MODEL else source.with_suffix(suffix)


def export_onnx(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, opset: int = 17) -> Path:
    """Write the checkpoint's network as a checked ONNX model with braintumor metadata (atomically)."""
    onnx = require("onnx", "onnx", "export --format onnx")

    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(f"ONNX opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    model, meta, tiers = _load_for_export(checkpoint_path)
    output_names = [OUTPUT_NAME, TRUST_OUTPUT_NAME] if tiers else [OUTPUT_NAME]
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
    for key, value in encode_onnx_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"braintumor {meta['arch']} classifier ({', '.join(meta['classes'])}); research use only"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    return atomic_write(out_path, lambda handle: handle.write(data))


def export_torchscript(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the checkpoint's network, with its trust head when fitted, as a TorchScript trace (outputs: logits,
    and trust scores (B, 2) when the model has a tier; any batch and image size) with ``braintumor.json`` (spec,
    temperature, tiers, fit summary, provenance) inside the same file."""
    model, meta, _ = _load_for_export(checkpoint_path)
    extra_files = {TORCHSCRIPT_META: json.dumps(meta)}
    size = meta["image_size"]
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit warns that it is deprecated in favour of torch.export, and that traced shapes are constants
        # (they are not: the batch and image size stay free, as tests/test_export.py checks).
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.zeros(2, 3, size, size), check_trace=False)
        return atomic_write(out_path, lambda handle: torch.jit.save(traced, handle, _extra_files=extra_files))


def quantize_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike, calibration_images: Sequence,
                  max_images: int = 64) -> Path:
    """Write an int8 copy of a braintumor ONNX export (static, per-channel weights, QDQ), calibrated on images.

    About twice as fast on x86 CPUs with AVX512-VNNI, at the cost of exactness: probabilities move by up to a few
    percent, so check accuracy on a held-out set before using it. ``calibration_images`` (paths, bytes or PIL
    images; the first ``max_images`` are used) should look like the data the model will see, e.g. training slices.
    """
    require("onnxruntime", "onnx", "int8 quantization")
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    import onnx

    from braintumor.data.io import read_image
    from braintumor.data.transforms import eval_transform

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
        # With trust tiers only the network's convolutions and linear layers are quantized: the trust arithmetic
        # (feature statistics, whitening products under "/head/", thresholds, the finiteness guard) stays float32,
        # or int8 rounding moves every slice's trust scores to a few values.
        graph = onnx.load(str(prepared), load_external_data=False).graph
        only = None
        if TRUST_OUTPUT_NAME in [output.name for output in graph.output]:
            only = [node.name for node in graph.node
                    if node.op_type in ("Conv", "Gemm", "MatMul") and not node.name.startswith("/head/")]
        quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=only)
        proto = onnx.load(str(quantized))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "quantization", json.dumps(
        {"type": "int8 static QDQ, per-channel weights", "calibration_images": len(images)})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    return atomic_write(out_path, lambda handle: handle.write(data))


def _load_for_export(checkpoint_path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any], tuple[str, ...]]:
    """The checkpoint's network in eval mode, fp32, on CPU (a ScoringNet returning the trust scores as a second
    output when it has a tier), the metadata that goes with it, and the tiers in the network."""
    source = resolve_checkpoint(checkpoint_path)
    ckpt = load_checkpoint(source)
    spec = spec_of(ckpt, source)
    model = model_from_checkpoint(ckpt, source).float().cpu().eval()
    network, tiers = scoring_module(model, spec.trust, source)
    meta = export_metadata(spec, __version__, file_fingerprint(source))
    return network.float().cpu().eval(), meta, tiers


def export_model(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *,
                 overwrite: bool = False, int8_calibration: str | os.PathLike | None = None, measure: bool = True,
                 threads: int | None = None) -> list[tuple[Path, str | None]]:
    """``braintumor export``: write the export(s) and, for ONNX, measure each against the checkpoint and write its
    verdict beside it (what ``--backend auto`` reads). Returns (file written, one line on the measurement or None).

    With ``int8_calibration`` (a folder or image paths) the float32 export goes to ``<out stem>.fp32.onnx`` and
    the int8 one, calibrated and measured on those images, to ``out``. Every target is checked (suffix, not the
    checkpoint, no file replaced without ``overwrite``) before anything is written.
    """
    from braintumor.data.inputs import expand_inputs
    from braintumor.inference.accelerated import describe_measurement, measure_export

    if int8_calibration is not None and fmt != ONNX:
        raise UserError("--int8-calibration needs --format onnx")
    source, out = export_target(checkpoint, fmt, out, overwrite=overwrite)
    if fmt == TORCHSCRIPT:
        return [(export_torchscript(source, out), None)]
    calibration = None
    if int8_calibration is not None:
        _, fp32_out = export_target(source, ONNX, out.with_name(out.stem + ".fp32.onnx"), overwrite=overwrite)
        calibration = expand_inputs([int8_calibration])
        if not calibration:
            raise UserError(f"--int8-calibration {int8_calibration} holds no images")
        targets = [(export_onnx(source, fp32_out), "onnxruntime-fp32")]
        targets.append((quantize_onnx(fp32_out, out, calibration), "onnxruntime-int8"))
    else:
        targets = [(export_onnx(source, out), "onnxruntime-fp32")]
    written = []
    for path, backend in targets:
        note = None
        if measure:
            try:
                verdict = measure_export(source, path, backend, calibration, threads=threads)
                note = describe_measurement(backend, verdict)
            except UserError as err:  # the export is written; only the measurement failed
                note = f"note: {path} was written but not measured ({err}); --backend auto will not use it"
        written.append((path, note))
    return written
