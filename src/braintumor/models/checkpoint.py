"""What a checkpoint holds, how it is written atomically, and how it is read back safely.

The model's description is one typed :class:`ModelSpec` (architecture, classes, preprocessing, TTA, the fitted
temperature and OOD statistics). A checkpoint stores the spec's fields at its top level beside the weights, the
layout every braintumor checkpoint has had, so files written before the spec existed (the shipped reference model
among them) load unchanged. Two files per run: ``best.pt`` is for inference (the validated weights, the EMA
weights when the run used EMA, the spec, and a few provenance fields); ``last.pt`` holds everything resume needs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from braintumor.choices import MAX_IMAGE_SIZE, REFERENCE_NAME
from braintumor.utils.atomic import atomic_write
from braintumor.errors import UserError
from braintumor.models.formats import CHECKPOINT, TORCHSCRIPT, content_format, model_format
from braintumor.models.network import build_model, torch_load_problem

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "classes", "image_size", "mean", "std", "arch")
# What best.pt keeps besides the weights and the spec: where the weights came from (small; ``calibrate`` reads
# the recipe to rebuild the run's split).
PROVENANCE_KEYS = ("config", "epoch", "best_val_accuracy")
REFERENCE_MODEL = Path(__file__).parents[1] / "reference" / "reference-resnet18.pt"


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that inference needs to use a network as it was trained and validated.

    ``image_size``, ``mean`` and ``std`` are the evaluation preprocessing (resize to a square, normalise);
    ``tta`` averages each slice with its mirror; ``trust`` holds what ``braintumor calibrate`` fitted: the
    temperature, the OOD detector's statistics (``"ood"``) and the fit's summary (None: not fitted).
    """

    arch: str
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tta: bool = False
    trust: dict[str, Any] | None = None

    FIELDS = ("arch", "classes", "image_size", "mean", "std", "tta", "trust")

    def __post_init__(self) -> None:
        # Normalise the containers (lists from JSON or a checkpoint) and check every field, once, here.
        object.__setattr__(self, "classes", tuple(self.classes) if isinstance(self.classes, (list, tuple))
                           else self.classes)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str:
        if not isinstance(self.arch, str) or not self.arch:
            return f"arch must be a name, got {self.arch!r}"
        if (not isinstance(self.classes, tuple) or len(self.classes) < 2
                or not all(isinstance(c, str) and c for c in self.classes) or len(set(self.classes)) != len(self.classes)):
            return f"classes must be two or more distinct names, got {self.classes!r}"
        if (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                or not 1 <= self.image_size <= MAX_IMAGE_SIZE):
            return f"image_size must be a whole number from 1 to {MAX_IMAGE_SIZE}, got {self.image_size!r}"
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 3 or not all(math.isfinite(v) for v in value):
                return f"{name} must be 3 finite numbers, got {value!r}"
        if not all(v > 0 for v in self.std):
            return f"std must be positive, got {self.std!r}"
        if not isinstance(self.tta, bool):
            return f"tta must be true or false, got {self.tta!r}"
        if self.trust is not None:
            return _trust_problem(self.trust)
        return ""

    @property
    def temperature(self) -> float:
        """The fitted softmax temperature (1 when none was fitted)."""
        return float((self.trust or {}).get("temperature", 1.0))

    @property
    def ood_state(self) -> dict[str, Any] | None:
        """The legacy one-tier OOD detector's tensors (``trust["ood"]``), or None; the trust head as a whole is
        built from :attr:`trust` (``braintumor.trust.ood.trust_head_from_state``)."""
        return (self.trust or {}).get("ood")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and strings (``trust`` only when fitted): checkpoint and export-metadata keys."""
        data = {"arch": self.arch, "classes": list(self.classes), "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "tta": self.tta}
        if self.trust is not None:
            data["trust"] = self.trust
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        """The spec in ``data`` (a checkpoint or export metadata; other keys are ignored). Keys added after the
        first release (``tta``, ``trust``) default when absent; anything malformed raises ValueError."""
        missing = [key for key in ("arch", "classes", "image_size", "mean", "std") if key not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        size = data["image_size"]
        return cls(arch=data["arch"], classes=data["classes"],
                   image_size=int(size) if isinstance(size, float) and size.is_integer() else size,
                   mean=data["mean"], std=data["std"], tta=data.get("tta", False), trust=data.get("trust"))

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _trust_problem(trust: Any) -> str:
    """What is wrong with a spec's ``trust`` entry at the level of plain values (the trust head's tensors are
    checked where the head is built), or ""."""
    if not isinstance(trust, dict):
        return f"trust must be a dict of fitted statistics, got {type(trust).__name__}"
    if not all(isinstance(key, str) for key in trust):
        return "trust keys must be names"
    for key in ("ood", "not_mri", "atypical"):  # the tiers' fitted statistics (checked in full by the trust head)
        if key in trust and not isinstance(trust[key], dict):
            return f"trust.{key} must be a dict of fitted statistics, got {type(trust[key]).__name__}"
    if "temperature" in trust:
        value = trust["temperature"]
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
                or float(value) <= 0):
            return f"trust.temperature must be a finite number above 0, got {value!r}"
    return ""


def spec_of(ckpt: dict[str, Any], source: str | os.PathLike = "the checkpoint") -> ModelSpec:
    """The ModelSpec of a loaded checkpoint; a malformed one is a UserError naming the file."""
    try:
        return ModelSpec.from_dict(ckpt)
    except (ValueError, TypeError) as err:
        raise UserError(f"{source} is damaged: {err}") from None


def validated_weights(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The weights inference uses: the EMA average when the run kept one, else the trained weights."""
    return ckpt["ema"]["module"] if isinstance(ckpt.get("ema"), dict) else ckpt["model"]


def inference_payload(weights: dict[str, Any], spec: ModelSpec, **provenance: Any) -> dict[str, Any]:
    """What best.pt holds: the weights, the spec and provenance (``config``, ``epoch``, ``best_val_accuracy``)."""
    unknown = set(provenance) - set(PROVENANCE_KEYS)
    if unknown:
        raise ValueError(f"not provenance: {', '.join(sorted(unknown))}")
    return {"model": weights, **spec.to_dict(), **provenance}


def random_checkpoint(path: str | os.PathLike, *, arch: str = "resnet18", classes: Sequence[str] | None = None,
                      image_size: int = 64, seed: int = 0) -> Path:
    """An untrained network (weights drawn from ``seed``) saved as a checkpoint that predicts, explains and
    exports like a trained one: for tests and benchmarks whose figures must not depend on a trained model.
    ``classes`` defaults to the phantoms' four."""
    from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # only here: not on every model load
    from braintumor.synthetic.phantom import PHANTOM_CLASSES

    classes = PHANTOM_CLASSES if classes is None else classes
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=len(classes), weights="none").eval()
    spec = ModelSpec(arch=arch, classes=tuple(classes), image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return save_checkpoint(inference_payload(model.state_dict(), spec, config={}, epoch=0, best_val_accuracy=0.0),
                           path)


def save_inference_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write best.pt from a full (resume) checkpoint: validated weights, spec, provenance; no optimizer state."""
    provenance = {key: ckpt[key] for key in PROVENANCE_KEYS if key in ckpt}
    return save_checkpoint(inference_payload(validated_weights(ckpt), spec_of(ckpt), **provenance), path)


def inside_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside the installed braintumor package (the shipped model's folder included), where
    no command writes: an upgrade or reinstall would replace it, and it may be read-only."""
    return Path(path).resolve().is_relative_to(REFERENCE_MODEL.parents[1].resolve())


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


def missing_model_error(path: str | os.PathLike, what: str = "checkpoint") -> UserError:
    """"checkpoint not found: PATH", with "did you mean ...?" when a name close to it exists ("reference", or a
    file beside PATH)."""
    path = Path(path)
    if path.is_dir():
        return UserError(f"{path} is a folder without best.pt or last.pt: give a run folder or a model file")
    parent = path.parent
    # "reference" is a bare name: offered only for a bare name; files beside the path for any path.
    candidates = {REFERENCE_NAME: REFERENCE_NAME} if str(parent) == "." else {}
    try:
        for entry in sorted(parent.iterdir())[:2000] if parent.is_dir() else ():
            candidates.setdefault(entry.name, entry.name if str(parent) == "." else str(parent / entry.name))
    except OSError:
        pass
    match = difflib.get_close_matches(path.name, list(candidates), n=1, cutoff=0.75)
    hint = f"; did you mean {candidates[match[0]]!r}?" if match else ""
    return UserError(f"{what} not found: {path}{hint}")


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts only) atomically with ``torch.save``."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no pickled code runs) and check it is one of ours.

    ``kind`` is the file's format when the caller has already asked :func:`~braintumor.models.formats.model_format`
    (a file's format is read once per load)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise missing_model_error(path)
    kind = model_format(path) if kind is None else kind
    if kind != CHECKPOINT:
        # Bytes no format claims get their name's format: say so (an error path, so the second look is free).
        verb = "is" if content_format(path) else "is named as"
        raise UserError(f"{path} {verb} {'a TorchScript' if kind == TORCHSCRIPT else 'an ONNX'} export, not a .pt "
                        "checkpoint; this command needs the checkpoint (predict, evaluate and serve read exports too)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: noise on top of our one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's loader fails on foreign bytes in many ways
        raise UserError(f"cannot read checkpoint {path}: {_input_given_as_model(path) or torch_load_problem(err)}"
                        ) from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED_KEYS):
        raise UserError(f"{path} is not a braintumor checkpoint (missing classes, arch or weights)")
    version = ckpt.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise UserError(f"{path} is damaged: format_version must be a whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer braintumor (format {version}); upgrade")
    return ckpt


def _input_given_as_model(path: Path) -> str | None:
    """Why an image or volume cannot be read as a model, when one was given where the model belongs (the model is
    the first argument of predict, explain, evaluate, ...); None for any other file."""
    from braintumor.data.io import IMAGE_EXTENSIONS
    from braintumor.data.volumes import is_nifti

    if path.suffix.lower() in IMAGE_EXTENSIONS or is_nifti(path):
        return ("it is an image or volume, not a model: give the model first (a .pt checkpoint, a run folder, an "
                "export or 'reference'), then the images")
    return None


def model_from_checkpoint(ckpt: dict[str, Any], source: str | os.PathLike = "the checkpoint", *,
                          model_factory: Callable[[str, int, str], nn.Module] = build_model) -> nn.Module:
    """Rebuild the network a checkpoint describes (with ``model_factory``, the one it was trained with), load its
    weights and put it in eval mode."""
    spec = spec_of(ckpt, source)
    arch, classes = spec.arch, spec.classes
    try:
        model = model_factory(arch, len(classes), "none")
    except (ValueError, KeyError, UserError):
        raise UserError(f"{source} is damaged: unknown architecture {arch!r}") from None
    # A run with --ema is used through its averaged weights; fp16 weights (the shipped model) load into fp32.
    weights = validated_weights(ckpt)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"{source} is damaged: its weights do not fit a {arch} with {len(classes)} classes "
                        f"({detail})") from None
    bad = non_finite_tensor(model.state_dict())
    if bad:
        # Refused at load: a NaN weight makes every prediction NaN, which no status could make useful.
        raise UserError(f"{source} is damaged: its weights hold NaN or infinite values ({bad})")
    return model.eval()


def non_finite_tensor(tensors: Any, prefix: str = "") -> str:
    """The name of the first floating-point tensor holding NaN or inf in a (nested) dict/list, or ""."""
    if isinstance(tensors, torch.Tensor):
        return prefix or "a tensor" if tensors.is_floating_point() and not bool(torch.isfinite(tensors).all()) else ""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors) \
        if isinstance(tensors, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return ""
