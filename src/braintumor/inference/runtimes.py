"""The runtimes a Classifier runs a model file on: PyTorch (a checkpoint), TorchScript and ONNX Runtime (exports).

Each backend takes a normalised batch (B, 3, S, S) and returns the logits (B, C) and, when the model carries a
fitted OOD detector, its scores (B,). Which backend reads a file is decided by the file's content
(:mod:`braintumor.models.formats`), never by a flag. Exports carry the model's :class:`~braintumor.models.checkpoint.ModelSpec`
as metadata (ONNX: one JSON string per key in ``metadata_props``; TorchScript: ``braintumor.json`` inside the
archive), with the braintumor version and the source checkpoint's fingerprint; this module defines that metadata.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from braintumor.models.checkpoint import ModelSpec, load_checkpoint, model_from_checkpoint, spec_of
from braintumor.utils.devices import available_cores, resolve_device
from braintumor.utils.optional import require
from braintumor.errors import UserError
from braintumor.models.formats import ONNX, TORCHSCRIPT, model_format
from braintumor.models.network import build_model

INPUT_NAME, OUTPUT_NAME, OOD_OUTPUT_NAME = "input", "logits", "ood_score"
TORCHSCRIPT_META = "braintumor.json"
# The keys every braintumor export carries; their presence is what tells our files from other models.
META_KEYS = ("classes", "image_size", "mean", "std", "arch", "braintumor_version", "source_fingerprint")
# Keys added later; files without them get the default.
OPTIONAL_META = {"tta": False}


class TorchBackend:
    """A PyTorch network (with its OOD detector, when fitted) on a device; the only backend with gradients."""

    name = "torch"
    fixed_size = False

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu",
                 ood_state: dict[str, Any] | None = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.detector, self._scoring_net = None, None
        if ood_state is not None:
            from braintumor.trust.ood import MahalanobisDetector, ScoringNet

            self.detector = MahalanobisDetector.from_state(ood_state).to(self.device)
            self._scoring_net = ScoringNet(self.model, self.detector).eval()
        self.has_ood = self.detector is not None

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if self._scoring_net is not None:
            logits, scores = self._scoring_net(batch.to(self.device))
            return logits.float().cpu().numpy(), scores.float().cpu().numpy()
        return self.model(batch.to(self.device)).float().cpu().numpy(), None


class TorchScriptBackend:
    """A TorchScript export: runs without braintumor's model code, any batch and image size, no Grad-CAM."""

    name = "torchscript"
    fixed_size = False
    model = None
    has_ood = False

    def __init__(self, module: torch.jit.ScriptModule, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        return self.module(batch.to(self.device)).float().cpu().numpy(), None


class OnnxBackend:
    """An ONNX Runtime session (or anything with its ``run``/``get_inputs``, e.g. OpenVINO's), on the CPU at the
    exported image size; a second graph output is the OOD score."""

    fixed_size = True
    model = None

    def __init__(self, session: Any, name: str = "onnx"):
        self.session, self.name = session, name
        self.device = torch.device("cpu")
        # Other runtimes' sessions may not list their outputs.
        self.has_ood = len(getattr(session, "get_outputs", lambda: [])()) > 1

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        feed = {self.session.get_inputs()[0].name: batch.detach().cpu().numpy().astype(np.float32)}
        outputs = self.session.run(None, feed)
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)


def open_model_file(path: Path, device: str | torch.device = "cpu", threads: int | None = None,
                    model_factory: Callable[[str, int, str], torch.nn.Module] = build_model):
    """(backend, spec) for a checkpoint, TorchScript or ONNX file, chosen by the file's content; a checkpoint's
    network is rebuilt by ``model_factory``."""
    kind = model_format(path)
    if kind == ONNX:
        if resolve_device(device).type != "cpu":
            warnings.warn(f"{path.name} is an ONNX export: it runs on the CPU (ONNX Runtime), not {device}")
        session, meta = load_onnx_session(path, threads)
        return OnnxBackend(session), spec_from_metadata(meta)
    if kind == TORCHSCRIPT:
        module, meta = load_torchscript(path)
        return TorchScriptBackend(module, device), spec_from_metadata(meta)
    ckpt = load_checkpoint(path)
    spec = spec_of(ckpt, path)
    return TorchBackend(model_from_checkpoint(ckpt, path, model_factory=model_factory), device, spec.ood_state), spec


def export_metadata(spec: ModelSpec, version: str, source_fingerprint: str) -> dict[str, Any]:
    """What an export carries: the spec (the OOD detector's tensors excepted: they live in the graph), the
    braintumor version and the source checkpoint's fingerprint."""
    meta = {**spec.to_dict(), "braintumor_version": version, "source_fingerprint": source_fingerprint}
    if spec.trust is not None:
        meta["trust"] = {key: value for key, value in spec.trust.items() if key != "ood"}
    return meta


def encode_onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata values are strings: JSON for each one, so lists and numbers round-trip exactly."""
    return {key: json.dumps(meta[key]) for key in (*META_KEYS, *OPTIONAL_META, "trust") if key in meta}


def decode_onnx_metadata(props: dict[str, str], path: Path) -> dict[str, Any]:
    """The metadata dict of a braintumor ONNX export's ``metadata_props``; UserError for foreign or corrupt ones."""
    missing = [key for key in META_KEYS if key not in props]
    if missing:
        raise UserError(f"{path} is an ONNX model but not a braintumor export (missing metadata: "
                        f"{', '.join(missing)}); create it with `braintumor export CHECKPOINT --format onnx`")
    try:
        meta = {key: json.loads(props[key]) for key in META_KEYS}
        meta.update({key: json.loads(props[key]) if key in props else default
                     for key, default in OPTIONAL_META.items()})
        for key in ("trust", "quantization"):
            if key in props:
                meta[key] = json.loads(props[key])
        meta["image_size"] = int(meta["image_size"])
        spec_from_metadata(meta)
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} has corrupt braintumor metadata ({err}); export it again") from err
    return meta


def spec_from_metadata(meta: dict[str, Any]) -> ModelSpec:
    """The ModelSpec an export's metadata describes (ValueError when malformed)."""
    return ModelSpec.from_dict(meta)


def load_onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime session for a braintumor ONNX export and its metadata dict.

    ``threads`` sets intra-op parallelism (default: the CPU cores this process may use). Raises UserError when
    the file is missing, is not an ONNX model, or lacks braintumor metadata.
    """
    ort = require("onnxruntime", "onnx", "running an ONNX model")

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
        raise UserError(f"{path} is not a readable ONNX model: {first_line(err)}") from err
    return session, decode_onnx_metadata(session.get_modelmeta().custom_metadata_map, path)


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript export (eval mode, CPU) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript model not found: {path}")
    extra_files = {TORCHSCRIPT_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except Exception as err:  # noqa: BLE001 - torch.jit fails on foreign bytes in many ways
        raise UserError(f"cannot load TorchScript model {path}: {first_line(err)}") from err
    if not extra_files[TORCHSCRIPT_META]:
        raise UserError(f"{path} is TorchScript but not a braintumor export (no {TORCHSCRIPT_META} inside)")
    try:
        meta = json.loads(extra_files[TORCHSCRIPT_META])
        spec_from_metadata(meta)
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} has corrupt braintumor metadata ({err}); export it again") from err
    return module.eval(), meta


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
