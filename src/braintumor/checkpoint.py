"""What a checkpoint holds, how it is written atomically, and how it is read back safely."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write
from .errors import UserError
from .model import build_model

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "classes", "image_size", "mean", "std", "arch")
# The model shipped inside the package (see MODEL_CARD.md); "reference" names it wherever a checkpoint is expected.
REFERENCE_NAME = "reference"
REFERENCE_MODEL = Path(__file__).with_name("reference") / "reference-resnet18.pt"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file a user means: "reference" (the shipped model), a run folder (its best.pt, else
    last.pt), or the path itself."""
    if str(path) == REFERENCE_NAME:
        if not REFERENCE_MODEL.is_file():
            raise UserError(f"the reference model is missing from this installation ({REFERENCE_MODEL}); "
                            "reinstall braintumor or build it with `make reference-model`")
        return REFERENCE_MODEL
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
    return path


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts only) atomically with ``torch.save``."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def publish_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make ``target`` an atomic snapshot of ``source`` (e.g. best.pt of last.pt) without writing it again.

    A hard link shares the file's data; since checkpoints are only ever replaced by rename, never rewritten in
    place, a later last.pt leaves the linked best.pt as it was. Where links are not supported, copy.
    """
    source, target = Path(source), Path(target)
    temporary = target.with_name(f".{target.name}.link.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        return atomic_write(target, lambda handle: handle.write(source.read_bytes()))
    os.replace(temporary, target)
    return target


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no pickled code runs) and check it is one of ours."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path} is named as an ONNX export, not a .pt checkpoint; this command reads checkpoints "
                        "(predict and evaluate read exports with --backend onnx)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise on top of our one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            # Do not repeat torch's advice to retry with weights_only=False: that would run the file's code.
            raise UserError(f"cannot read checkpoint {path}: not a braintumor checkpoint (it holds Python objects "
                            "other than tensors and plain data, and braintumor will not unpickle it)") from None
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint file") from None
    except Exception as err:  # noqa: BLE001 - torch's loader fails on foreign bytes in many ways
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # e.g. "101" (a magic-number mismatch inside torch), IndexError/KeyError from the unpickler on text
        if first_line.isdigit() or isinstance(err, (KeyError, IndexError, TypeError, EOFError)):
            raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint file") from None
        raise UserError(f"cannot read checkpoint {path}: {first_line}") from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED_KEYS):
        raise UserError(f"{path} is not a braintumor checkpoint (missing classes, arch or weights)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer braintumor (format {ckpt['format_version']}); upgrade")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], source: str | os.PathLike = "the checkpoint") -> nn.Module:
    """Rebuild the network a checkpoint describes, load its weights and put it in eval mode."""
    arch, classes = ckpt["arch"], ckpt["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{source} is damaged: its class list is not a list of names")
    try:
        model = build_model(arch, num_classes=len(classes), weights="none")
    except (ValueError, KeyError, UserError):
        raise UserError(f"{source} is damaged: unknown architecture {arch!r}") from None
    # A run with --ema is used through its averaged weights; fp16 weights (the shipped model) load into fp32.
    weights = ckpt["ema"]["module"] if isinstance(ckpt.get("ema"), dict) else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"{source} is damaged: its weights do not fit a {arch} with {len(classes)} classes "
                        f"({detail})") from None
    return model.eval()
