"""Which kind of model file a path holds, read from its first bytes (the name is only a hint).

This is the one place that decides a model file's format: every loader asks :func:`model_format` once per load
and passes the answer on (``load_checkpoint(..., kind=...)``, ``inference.runtimes.open_model``).

PyTorch checkpoints (``torch.save``) and TorchScript archives (``torch.jit.save``) are both zip files: TorchScript
ones carry the module's code (``<archive>/code/``), checkpoints only pickled data. ONNX files are a protobuf
``ModelProto`` whose first field is ``ir_version`` (field 1, a varint: tag byte 0x08). Checkpoints in torch's
legacy (pre-zip) format start with a pickle protocol byte (0x80).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

CHECKPOINT, TORCHSCRIPT, ONNX = "checkpoint", "torchscript", "onnx"
FORMATS = (CHECKPOINT, TORCHSCRIPT, ONNX)
# Suffixes each format may be written under (export refuses others); the first is the default.
SUFFIXES = {ONNX: (".onnx",), TORCHSCRIPT: (".ts", ".pt", ".pth", ".torchscript"), CHECKPOINT: (".pt", ".pth")}
# Runtimes that run ONNX files only (on the CPU), whatever --device says.
ONNX_RUNTIMES = ("onnx", "openvino")
_ZIP_MAGIC = b"PK\x03\x04"
_ONNX_FIRST_BYTE = 0x08
_PICKLE_PROTOCOL_BYTE = 0x80


def model_format(path: str | os.PathLike) -> str:
    """CHECKPOINT, TORCHSCRIPT or ONNX by content; for unrecognised bytes the suffix decides (``.onnx``: ONNX,
    ``.ts``/``.torchscript``: TorchScript, else checkpoint), so the reader of that format reports what is wrong."""
    found = content_format(path)
    if found is not None:
        return found
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return ONNX
    return TORCHSCRIPT if suffix in (".ts", ".torchscript") else CHECKPOINT


def content_format(path: str | os.PathLike) -> str | None:
    """CHECKPOINT, TORCHSCRIPT or ONNX as the file's first bytes say, or None (unreadable or unrecognised)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if head == _ZIP_MAGIC:
        return TORCHSCRIPT if _has_code(path) else CHECKPOINT
    if head[:1] == bytes([_PICKLE_PROTOCOL_BYTE]):
        return CHECKPOINT
    if head[:1] == bytes([_ONNX_FIRST_BYTE]):
        return ONNX
    return None


def runtime_for(path: str | os.PathLike, backend: str) -> str:
    """The runtime a model file will run on when ``--backend`` is ``backend``: an ONNX file (by content) always
    runs on ONNX Runtime (or OpenVINO when asked), so ``--device`` does not apply to it."""
    if backend in ONNX_RUNTIMES:
        return backend
    return "onnx" if Path(path).is_file() and model_format(path) == ONNX else backend


def _has_code(path: Path) -> bool:
    """True when the zip holds TorchScript code (an archive written by ``torch.jit.save``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
