"""The runtimes a Classifier runs a model file on: PyTorch (a checkpoint), TorchScript and ONNX Runtime (exports).

Each backend takes a normalised batch (B, 3, S, S) and returns ``(logits (B, C), scores (B, 2))``: the trust
scores ``[not_mri, atypical]`` of :class:`braintumor.trust.ood.ScoringNet`, already divided by their thresholds, or
None when the model carries no trust tier. ``runtime.tiers`` says which tiers the scores hold (a missing tier
scores 0, never flags) and ``runtime.missing`` what the model lacks, in one phrase.

:func:`open_model` is the one loader: it resolves the name ("reference", a run folder, a file, with a "did you
mean" for a typo), asks :func:`braintumor.models.formats.model_format` once what the file holds, picks the runtime
(``--backend``: a verified CPU export beside a checkpoint for "auto") and validates everything it reads (the spec,
the weights, the trust head, the graph). Exports carry the model's :class:`~braintumor.models.checkpoint.ModelSpec`
as metadata (ONNX: one JSON string per key in ``metadata_props``; TorchScript: ``braintumor.json`` inside the
archive), with the trust summary (temperature, tiers, fit summary), the braintumor version and the source
checkpoint's fingerprint; this module defines that metadata.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from braintumor.errors import UserError
from braintumor.models.checkpoint import (ModelSpec, load_checkpoint, missing_model_error, model_from_checkpoint,
                                          non_finite_tensor, resolve_checkpoint, spec_of)
from braintumor.models.formats import CHECKPOINT, ONNX, ONNX_RUNTIMES, TORCHSCRIPT, model_format
from braintumor.models.network import build_model
from braintumor.trust.ood import TIERS, ScoringNet, missing_tiers_note, trust_head_from_state, trust_summary
from braintumor.utils.devices import available_cores, resolve_device
from braintumor.utils.optional import require

INPUT_NAME, OUTPUT_NAME, TRUST_OUTPUT_NAME = "input", "logits", "trust_scores"
LEGACY_OOD_OUTPUT_NAME = "ood_score"  # exports before the two tiers: one (B,) atypical score
TORCHSCRIPT_META = "braintumor.json"
# The keys every braintumor export carries; their presence is what tells our files from other models.
META_KEYS = ("classes", "image_size", "mean", "std", "arch", "braintumor_version", "source_fingerprint")
# Keys added later; files without them get the default.
OPTIONAL_META = {"tta": False}
# What --backend picks among (see open_model).
BACKENDS = ("torch", "onnx", "openvino", "auto")
# An ONNX graph whose shapes (batch axis counted as 1) need more than this for one tensor, or in all, is refused
# before ONNX Runtime sees it: its constant folding would allocate them at load (an 823-byte ConstantOfShape
# 2^17 x 2^17 asks for 64 GiB). A ResNet-152 at 1024 px stays far below both.
MAX_ONNX_TENSOR_BYTES = 1 << 30
MAX_ONNX_TOTAL_BYTES = 16 << 30
# What shape inference cannot see (sizes that depend on the batch) is bounded at run time: every braintumor ONNX
# Runtime session allocates from one arena of at most this many bytes (half the machine's memory, at least 2 GiB;
# set before the first session opens), so a graph asking for more fails with one line instead of exhausting
# the machine.
MAX_ONNX_ARENA_BYTES = max(2 << 30, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
                           if hasattr(os, "sysconf") else 8 << 30)
_ARENA = {"registered": False, "lock": threading.Lock()}
_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError)


class Runtime:
    """What every backend shares: the trust tiers it scores and the check of what the network returned."""

    name = "runtime"
    fixed_size = False
    model = None
    tiers: tuple[str, ...] = ()
    num_classes: int | None = None

    @property
    def has_ood(self) -> bool:
        """True when the runtime returns trust scores (at least one tier)."""
        return bool(self.tiers)

    @property
    def missing(self) -> str | None:
        """What the model lacks for the two-tier status, in one phrase (None: both tiers are there)."""
        return missing_tiers_note({tier: {} for tier in self.tiers})

    def checked(self, logits: Any, scores: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The outputs as float32 arrays, logits (B, C) and scores (B, 2); a graph that returns another shape
        than its metadata promises is a one-line error, not an IndexError later."""
        logits = np.asarray(logits, dtype=np.float32)
        expected = (batch_size, self.num_classes) if self.num_classes else None
        if logits.ndim != 2 or logits.shape[0] != batch_size or (expected and logits.shape != expected):
            raise UserError(f"the model returned logits of shape {tuple(logits.shape)} for a batch of {batch_size} "
                            f"and {self.num_classes or 'its'} classes: the file is damaged; export it again")
        if scores is None or not self.tiers:
            return logits, None
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape == (batch_size,):  # a legacy export's one atypical score
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        if scores.shape != (batch_size, 2):
            raise UserError(f"the model returned trust scores of shape {tuple(scores.shape)} for a batch of "
                            f"{batch_size}: the file is damaged; export it again")
        return logits, scores


class TorchBackend(Runtime):
    """A PyTorch network (with its trust head, when fitted) on a device; the only backend with gradients."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu",
                 trust: dict[str, Any] | None = None, *, source: str | os.PathLike = "the model"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if isinstance(trust, dict) and "method" in trust:  # a bare legacy detector state (spec.ood_state)
            trust = {"ood": trust}
        self.head = trust_head(trust, source)
        self.tiers = self.head.tiers if self.head is not None else ()
        self.scoring_net = ScoringNet(self.model, self.head.to(self.device)).eval() if self.head is not None else None
        self.detector = self.head  # the 0.1 name of the fitted trust module
        self.num_classes = _out_features(self.model)

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        batch = batch.to(self.device)
        if self.scoring_net is not None:
            logits, scores = self.scoring_net(batch)
            return self.checked(logits.float().cpu().numpy(), scores.float().cpu().numpy(), len(batch))
        return self.checked(self.model(batch).float().cpu().numpy(), None, len(batch))


class TorchScriptBackend(Runtime):
    """A TorchScript export: runs without braintumor's model code, any batch and image size, no Grad-CAM. New
    exports are a traced ScoringNet (logits and trust scores); older ones return the logits only."""

    name = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule, device: str | torch.device = "cpu",
                 tiers: tuple[str, ...] = (), num_classes: int | None = None):
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.tiers, self.num_classes = tuple(tiers), num_classes

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            output = self.module(batch.to(self.device))
        except RuntimeError as err:
            raise UserError(f"the TorchScript model failed on this batch: {first_line(err)}") from None
        logits, scores = (output[0], output[1]) if isinstance(output, (tuple, list)) else (output, None)
        return self.checked(logits.float().cpu().numpy(),
                            None if scores is None else scores.float().cpu().numpy(), len(batch))


class OnnxBackend(Runtime):
    """An ONNX Runtime session (or anything with its ``run``/``get_inputs``, e.g. OpenVINO's), on the CPU at the
    exported image size; the output ``trust_scores`` (or a legacy ``ood_score``) holds the trust scores."""

    fixed_size = True

    def __init__(self, session: Any, name: str = "onnx", tiers: tuple[str, ...] | None = None,
                 num_classes: int | None = None):
        """``tiers`` None: read from the session's output names and metadata."""
        self.session, self.name = session, name
        self.device = torch.device("cpu")
        # Other runtimes' sessions may not list their outputs.
        outputs = [output.name for output in getattr(session, "get_outputs", lambda: [])()]
        self._trust_index = next((k for k, n in enumerate(outputs) if n in (TRUST_OUTPUT_NAME, LEGACY_OOD_OUTPUT_NAME)),
                                 1 if len(outputs) > 1 else None)
        if tiers is None:
            tiers = onnx_tiers(outputs, _session_trust(session))
        self.tiers, self.num_classes = tuple(tiers), num_classes

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        feed = {self.session.get_inputs()[0].name: batch.detach().cpu().numpy().astype(np.float32)}
        try:
            outputs = self.session.run(None, feed)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeException types
            raise UserError(f"{self.name} failed to run the model: {first_line(err)}") from None
        scores = outputs[self._trust_index] if self._trust_index is not None and len(outputs) > 1 else None
        return self.checked(outputs[0], scores, len(batch))


@dataclass(frozen=True)
class OpenedModel:
    """What :func:`open_model` found: the runtime, the spec, the file actually read and its format."""

    runtime: Runtime
    spec: ModelSpec
    path: Path
    format: str


def open_model(path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "torch",
               threads: int | None = None, model_factory: Callable[..., torch.nn.Module] = build_model) -> OpenedModel:
    """Open a checkpoint, a TorchScript or ONNX export (told apart by content, read once), a run folder or
    "reference" on the runtime ``backend`` asks for.

    ``backend``: "torch" runs the file on its own runtime; "auto" also looks beside a checkpoint for the fastest
    CPU export whose verdict passed (:mod:`braintumor.inference.accelerated`); "onnx" and "openvino" need an ONNX
    export. ``model_factory`` rebuilds a checkpoint's network.
    """
    from braintumor.inference.accelerated import resolve_auto_backend

    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise missing_model_error(path)
    kind, device = model_format(path), resolve_device(device)
    if backend == "auto" and kind == CHECKPOINT and device.type == "cpu":
        found = resolve_auto_backend(path)
        if found is not None:
            path, backend = found
            kind = ONNX
    if backend in ONNX_RUNTIMES and kind != ONNX:
        raise UserError(f"--backend {backend} runs ONNX exports, and {path} is not one; export it with "
                        f"`braintumor export {path} --format onnx`, or use --backend torch")
    if kind == ONNX:
        if device.type != "cpu":
            warnings.warn(f"{path.name} is an ONNX export: it runs on the CPU ({backend if backend == 'openvino' else 'ONNX Runtime'}), "
                          f"not {device}")
        if backend == "openvino":
            from braintumor.inference.accelerated import load_openvino

            session, meta = load_openvino(path, threads)
            spec = spec_from_metadata(meta)
            return OpenedModel(OnnxBackend(session, "openvino", export_tiers(meta) or None, len(spec.classes)), spec, path,
                               kind)
        session, meta = load_onnx_session(path, threads)
        spec = spec_from_metadata(meta)
        return OpenedModel(OnnxBackend(session, "onnx", export_tiers(meta) or None, len(spec.classes)), spec, path, kind)
    if kind == TORCHSCRIPT:
        module, meta = load_torchscript(path)
        spec = spec_from_metadata(meta)
        return OpenedModel(TorchScriptBackend(module, device, export_tiers(meta), len(spec.classes)), spec, path,
                           kind)
    ckpt = load_checkpoint(path, kind=kind)
    spec = spec_of(ckpt, path)
    model = model_from_checkpoint(ckpt, path, model_factory=model_factory)
    return OpenedModel(TorchBackend(model, device, spec.trust, source=path), spec, path, kind)


def open_model_file(path: Path, device: str | torch.device = "cpu", threads: int | None = None,
                    model_factory: Callable[[str, int, str], torch.nn.Module] = build_model):
    """(backend, spec) of a model file on its own runtime (:func:`open_model` with ``backend="torch"``)."""
    opened = open_model(path, device, "torch", threads, model_factory)
    return opened.runtime, opened.spec


# ------------------------------------------------------------------------------------------- trust in a model


def trust_head(trust: dict[str, Any] | None, source: str | os.PathLike = "the model"):
    """The trust head of a spec's ``trust`` entry (None when it has no tier); a malformed or non-finite entry is a
    one-line error naming the file."""
    try:
        head = trust_head_from_state(trust)
    except _ERRORS as err:
        raise UserError(f"{source} is damaged: its trust entry is malformed ({first_line(err)}); refit it with "
                        "braintumor calibrate") from None
    if head is not None:
        bad = non_finite_tensor(dict(head.state_dict()))
        if bad:
            raise UserError(f"{source} is damaged: its trust entry holds NaN or infinite values ({bad})")
    return head


def scoring_module(model: torch.nn.Module, trust: dict[str, Any] | None,
                   source: str | os.PathLike = "the model") -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The network to run or export: a ScoringNet (logits, trust scores) when the model has a trust tier, else
    the network itself (logits); and the tiers."""
    head = trust_head(trust, source)
    if head is None:
        return model, ()
    return ScoringNet(model, head).eval(), head.tiers


def export_tiers(meta: dict[str, Any]) -> tuple[str, ...]:
    """The trust tiers an export's graph scores, from its metadata (``trust.tiers``; a legacy export's graph with
    an ``ood_score`` output is marked by ``_legacy_ood`` when it is read)."""
    trust = meta.get("trust") if isinstance(meta.get("trust"), dict) else {}
    if meta.get("_legacy_ood"):
        return ("atypical",)
    tiers = trust.get("tiers")
    if isinstance(tiers, list) and all(tier in TIERS for tier in tiers):
        return tuple(tier for tier in TIERS if tier in tiers)
    return ()


def onnx_tiers(output_names: list[str], trust: dict[str, Any] | None) -> tuple[str, ...]:
    """The tiers of an ONNX graph from its output names and its metadata's trust summary."""
    if LEGACY_OOD_OUTPUT_NAME in output_names:
        return ("atypical",)
    if TRUST_OUTPUT_NAME in output_names or len(output_names) > 1:
        return export_tiers({"trust": trust or {}}) or TIERS
    return ()


def _session_trust(session: Any) -> dict[str, Any] | None:
    try:
        value = json.loads(session.get_modelmeta().custom_metadata_map.get("trust", "null"))
    except Exception:  # noqa: BLE001 - sessions of other runtimes, or no metadata
        return None
    return value if isinstance(value, dict) else None


def _out_features(model: torch.nn.Module) -> int | None:
    """The class count a network's last Linear layer gives (None when there is none to find)."""
    last = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    return last[-1].out_features if last else None


# ------------------------------------------------------------------------------------------- export metadata


def export_metadata(spec: ModelSpec, version: str, source_fingerprint: str) -> dict[str, Any]:
    """What an export carries: the spec with its trust summary (temperature, tiers, fit summary: the trust head's
    tensors live in the graph), the braintumor version and the source checkpoint's fingerprint."""
    meta = {**spec.to_dict(), "braintumor_version": version, "source_fingerprint": source_fingerprint}
    if spec.trust is not None:
        meta["trust"] = trust_summary(spec.trust)
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
        size = meta["image_size"]
        meta["image_size"] = int(size) if isinstance(size, float) and size.is_integer() else size
        spec_from_metadata(meta)
    except (ValueError, TypeError, RecursionError) as err:
        raise UserError(f"{path} has corrupt braintumor metadata ({first_line(err)}); export it again") from None
    return meta


def spec_from_metadata(meta: dict[str, Any]) -> ModelSpec:
    """The ModelSpec an export's metadata describes (ValueError when malformed)."""
    return ModelSpec.from_dict(meta)


# ------------------------------------------------------------------------------------------- ONNX


def read_onnx(path: str | os.PathLike) -> tuple[bytes, Any, dict[str, Any]]:
    """(bytes, ModelProto, metadata) of a braintumor ONNX export, every part checked before any runtime sees it:
    braintumor metadata, no external data, finite weights, no tensor beyond the allocation budget, and a logits
    output as wide as the class list."""
    onnx = require("onnx", "onnx", "running an ONNX model")

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX model: {first_line(err)}") from None
    if not proto.graph.output:
        raise UserError(f"{path} is not a readable ONNX model: its graph has no output")
    meta = decode_onnx_metadata({entry.key: entry.value for entry in proto.metadata_props}, path)
    outputs = [output.name for output in proto.graph.output]
    if LEGACY_OOD_OUTPUT_NAME in outputs:
        meta["_legacy_ood"] = True
    _check_onnx_graph(proto, path, len(meta["classes"]), data)
    return data, proto, meta


def _check_onnx_graph(proto: Any, path: Path, num_classes: int, data: bytes | None = None) -> None:
    """Refuse external data, non-finite weights, graphs that would allocate beyond the budget, and a logits
    output whose static width is not the class count."""
    import onnx
    from onnx import numpy_helper

    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise UserError(f"{path} keeps weights in external files: braintumor exports are one file; export it "
                            "again")
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                onnx.TensorProto.BFLOAT16):
            try:
                values = numpy_helper.to_array(tensor)
            except Exception as err:  # noqa: BLE001 - a tensor whose bytes do not match its shape
                raise UserError(f"{path} is damaged: weight {tensor.name!r} cannot be read ({first_line(err)})") \
                    from None
            if not np.isfinite(values.astype(np.float32, copy=False)).all():
                raise UserError(f"{path} is damaged: its weights hold NaN or infinite values ({tensor.name})")
    try:
        # From the file's bytes when at hand: serializing the proto again costs as much as the inference.
        inferred = onnx.shape_inference.infer_shapes(proto if data is None else data, data_prop=True)
    except Exception as err:  # noqa: BLE001 - shape inference rejects inconsistent graphs
        raise UserError(f"{path} is not a valid ONNX graph: {first_line(err)}") from None
    graph = inferred.graph
    total = 0
    for value in [*graph.value_info, *graph.output]:
        size = _static_bytes(value)
        if size is None:
            continue
        if size > MAX_ONNX_TENSOR_BYTES:
            raise UserError(f"{path} is refused: its graph allocates {size / 2**30:.3g} GiB for one tensor "
                            f"({value.name!r}), beyond the {MAX_ONNX_TENSOR_BYTES / 2**30:.0f} GiB a braintumor "
                            "export may use")
        total += size
    if total > MAX_ONNX_TOTAL_BYTES:
        raise UserError(f"{path} is refused: its graph allocates {total / 2**30:.3g} GiB in all, beyond the "
                        f"{MAX_ONNX_TOTAL_BYTES / 2**30:.0f} GiB a braintumor export may use")
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value != num_classes:
        raise UserError(f"{path} is damaged: its metadata lists {num_classes} classes but the graph outputs "
                        f"{dims[1].dim_value} logits; export it again")


def _static_bytes(value: Any) -> int | None:
    """Bytes of a tensor whose shape inference found every dimension (symbolic ones, the batch axis, count as 1),
    or None when its type or shape is unknown."""
    from onnx import helper

    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    elements = 1
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            if dim.dim_value < 0:
                return None
            elements *= dim.dim_value
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
    except Exception:  # noqa: BLE001 - undefined or string types
        itemsize = 8
    return elements * max(1, itemsize)


def load_onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime session for a braintumor ONNX export and its metadata dict.

    ``threads`` sets intra-op parallelism (default: the CPU cores this process may use). Raises UserError when
    the file is missing, is not an ONNX model, lacks braintumor metadata or fails validation (:func:`read_onnx`).
    """
    ort = require("onnxruntime", "onnx", "running an ONNX model")
    data, _, meta = read_onnx(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A single-image CNN is one chain of operators: parallelism inside operators is all there is to use.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads) if threads else available_cores()
    options.log_severity_level = 4  # fatal only: its errors become our one line (OnnxBackend.run)
    _memory_limited(ort, options)
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise UserError(f"{path} is not a readable ONNX model: {first_line(err)}") from None
    return session, meta


def _memory_limited(ort: Any, options: Any) -> None:
    """Make a session allocate from the process's one ONNX Runtime arena capped at MAX_ONNX_ARENA_BYTES
    (registered on first use; without it, e.g. in an onnxruntime lacking the API, sessions run unbounded)."""
    with _ARENA["lock"]:
        if not _ARENA["registered"]:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(int(MAX_ONNX_ARENA_BYTES), -1, -1, -1))
            except Exception:  # noqa: BLE001 - an onnxruntime without environment allocators
                return
            _ARENA["registered"] = True
    options.add_session_config_entry("session.use_env_allocators", "1")


# ------------------------------------------------------------------------------------------- TorchScript


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript export (eval mode, CPU) and its metadata, checked: braintumor metadata, finite weights, and
    logits as wide as the class list (one probe image at the model's size)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript model not found: {path}")
    extra_files = {TORCHSCRIPT_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    except Exception as err:  # noqa: BLE001 - torch.jit fails on foreign bytes in many ways
        raise UserError(f"cannot load TorchScript model {path}: {first_line(err)}") from None
    if not extra_files[TORCHSCRIPT_META]:
        raise UserError(f"{path} is TorchScript but not a braintumor export (no {TORCHSCRIPT_META} inside)")
    try:
        meta = json.loads(extra_files[TORCHSCRIPT_META])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        spec = spec_from_metadata(meta)
    except (ValueError, TypeError, RecursionError) as err:
        raise UserError(f"{path} has corrupt braintumor metadata ({first_line(err)}); export it again") from None
    bad = non_finite_tensor(dict(module.state_dict()))
    if bad:
        raise UserError(f"{path} is damaged: its weights hold NaN or infinite values ({bad})")
    module = module.eval()
    with torch.inference_mode():
        try:
            output = module(torch.zeros(1, 3, spec.image_size, spec.image_size))
        except Exception as err:  # noqa: BLE001 - TorchScript raises its own error types
            raise UserError(f"{path} does not run on a {spec.image_size} px image: {first_line(err)}") from None
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, len(spec.classes)):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"{path} is damaged: its metadata lists {len(spec.classes)} classes but the model returns "
                        f"logits of shape {shape}; export it again")
    if not isinstance(output, (tuple, list)):
        meta = {**meta, "trust": {**(meta.get("trust") or {}), "tiers": []}} if meta.get("trust") else meta
    return module, meta


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
