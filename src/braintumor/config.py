"""All training options in one dataclass: defaults, then a YAML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .model import ARCHS
from .train_step import STEP_MODES

OPTIMIZERS = ("ranger", "radam", "adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle")
DATA_CACHES = ("auto", "none", "memory", "gpu")
GC_MODES = ("all", "conv", "none")
MAX_IMAGE_SIZE = 1024  # ResNet-152 at 1024 px already needs tens of GB per batch of 32


@dataclass
class TrainConfig:
    """Every option of a training run; saved as ``config.yaml`` in the run folder."""

    data: str = ""
    val: str | None = None
    val_split: float = 0.15
    group_split: bool = True
    groups: str | None = None
    arch: str = "resnet152"
    weights: str = "imagenet"
    image_size: int = 224
    rotation: float = 10.0
    scale: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    progressive_resize: int = 0
    progressive_until: float = 0.5
    eval_image_size: int = 0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.0
    optimizer: str = "ranger"
    gc: str = "all"
    lookahead_k: int = 6
    lookahead_alpha: float = 0.5
    scheduler: str = "none"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    ema: float = 0.0
    tta: bool = False
    teacher: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    recipe: str | None = None
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    seed: int = 0
    split_seed: int | None = None
    device: str = "auto"
    data_cache: str = "auto"
    compile: bool = False
    train_step: str = "auto"
    skip_bad: bool = False
    out: str | None = None
    name: str = "run"
    max_steps_per_epoch: int = 0
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Raise UserError for any option outside its range; returns self."""
        _check_types(self)
        checks = [
            (bool(self.data), "no training data folder given"),
            (self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (0.0 < self.val_split < 1.0, f"--val-split must be between 0 and 1, got {self.val_split}"),
            (self.image_size >= 32, f"--image-size must be at least 32, got {self.image_size}"),
            (self.image_size <= MAX_IMAGE_SIZE, f"--image-size must be at most {MAX_IMAGE_SIZE}, got {self.image_size}"),
            (0.0 <= self.rotation <= 180.0, f"--rotation must be in [0, 180] degrees, got {self.rotation}"),
            (0.0 <= self.scale < 1.0, f"--scale must be in [0, 1), got {self.scale}"),
            (0.0 <= self.translate <= 0.5, f"--translate must be in [0, 0.5], got {self.translate}"),
            (0.0 <= self.brightness < 1.0, f"--brightness must be in [0, 1), got {self.brightness}"),
            (0.0 <= self.contrast < 1.0, f"--contrast must be in [0, 1), got {self.contrast}"),
            (0.0 <= self.gamma < 1.0, f"--gamma must be in [0, 1), got {self.gamma}"),
            (self.progressive_resize == 0 or 32 <= self.progressive_resize <= self.image_size,
             f"--progressive-resize must be 0 (off) or a start size in [32, --image-size], got {self.progressive_resize}"),
            (0.0 < self.progressive_until <= 1.0,
             f"--progressive-until must be a fraction of the epochs in (0, 1], got {self.progressive_until}"),
            (self.eval_image_size == 0 or self.eval_image_size >= 32,
             f"--eval-image-size must be 0 (same as --image-size) or at least 32, got {self.eval_image_size}"),
            (0.0 <= self.ema < 1.0, f"--ema must be a decay in [0, 1) (0: off), got {self.ema}"),
            (0.0 <= self.distill_weight <= 1.0, f"--distill-weight must be in [0, 1], got {self.distill_weight}"),
            (math.isfinite(self.distill_temperature) and self.distill_temperature > 0,
             f"--distill-temperature must be positive and finite, got {self.distill_temperature}"),
            (self.eval_image_size <= MAX_IMAGE_SIZE,
             f"--eval-image-size must be at most {MAX_IMAGE_SIZE}, got {self.eval_image_size}"),
            (self.split_seed is None or 0 <= self.split_seed < 2**32,
             f"--split-seed must be between 0 and 2**32 - 1, got {self.split_seed}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.epochs <= 100_000, f"--epochs must be at most 100000, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.batch_size <= 65_536, f"--batch-size must be at most 65536, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive and finite, got {self.lr}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"),
            (self.lookahead_k >= 1, f"--lookahead-k must be at least 1, got {self.lookahead_k}"),
            (0.0 < self.lookahead_alpha <= 1.0, f"--lookahead-alpha must be in (0, 1], got {self.lookahead_alpha}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.gc in GC_MODES, f"--gc must be one of {', '.join(GC_MODES)}"),
            (self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}"),
            (0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs must be between 0 and --epochs ({self.epochs}), got {self.warmup_epochs}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.workers <= 256, f"--workers must be between 0 and 256, got {self.workers}"),
            (0 <= self.seed < 2**32, f"--seed must be between 0 and 2**32 - 1, got {self.seed}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.data_cache in DATA_CACHES, f"--data-cache must be one of {', '.join(DATA_CACHES)}"),
            (self.train_step in STEP_MODES, f"--train-step must be one of {', '.join(STEP_MODES)}"),
            (self.max_steps_per_epoch >= 0, "--max-steps-per-epoch must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    @property
    def inference_image_size(self) -> int:
        """The size validation and the saved model use: --eval-image-size, else --image-size."""
        return self.eval_image_size or self.image_size

    def train_image_size(self, epoch: int) -> int:
        """Training size of a 0-based epoch: with --progressive-resize S, linear from S at the first epoch to
        --image-size at the --progressive-until fraction of the epochs, in steps of 16 pixels; then full size."""
        if not self.progressive_resize:
            return self.image_size
        full_from = max(1, round(self.progressive_until * self.epochs))
        if epoch >= full_from:
            return self.image_size
        size = self.progressive_resize + (self.image_size - self.progressive_resize) * epoch / full_from
        return min(self.image_size, max(self.progressive_resize, 16 * round(size / 16)))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON/checkpoint safe)."""
        return dataclasses.asdict(self)


def _check_types(cfg: "TrainConfig") -> None:
    """Each option holds its field's type (YAML and the Python API can hand over anything)."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        ok = {"int": type(value) is int, "float": type(value) in (int, float), "bool": type(value) is bool,
              "str": isinstance(value, str), "str | None": value is None or isinstance(value, str),
          "int | None": value is None or type(value) is int}.get(kind, True)
        if not ok:
            raise UserError(f"option {f.name} must be {_KIND_WORDS.get(kind, kind)}, got {value!r}")


_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
               "str | None": "text", "int | None": "a whole number"}


def coerce_option(key: str, value: Any, source: str) -> Any:
    """A YAML value as its field's type: '1e-5' (PyYAML reads it as text) becomes 1e-05, 64.0 becomes 64.

    Anything that is not cleanly that type (1.5 for an integer, 'maybe' for a switch) is a UserError naming the
    key and ``source``.
    """
    kind = str({f.name: f.type for f in dataclasses.fields(TrainConfig)}.get(key, ""))
    words = _KIND_WORDS.get(kind, kind)
    if kind in ("int", "float", "int | None") and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise UserError(f"{key} in {source} must be {words}, got {value!r}") from None
    if kind in ("int", "int | None") and isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    if kind in ("str", "str | None") and isinstance(value, (int, float)) and not isinstance(value, bool):
        raise UserError(f"{key} in {source} must be {words}, got {value!r}")
    ok = {"int": type(value) is int, "float": type(value) in (int, float), "bool": type(value) is bool,
          "str": isinstance(value, str), "str | None": value is None or isinstance(value, str),
          "int | None": value is None or type(value) is int}.get(kind, True)
    if not ok:
        raise UserError(f"{key} in {source} must be {words}, got {value!r}")
    return float(value) if kind == "float" else value


def field_names() -> set[str]:
    """Names of every option, as written in YAML files (underscores)."""
    return {f.name for f in dataclasses.fields(TrainConfig)}


RECIPES_DIR = Path(__file__).with_name("recipes")


def _read_yaml_options(path: Path, allowed_extra: tuple[str, ...] = ()) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - field_names() - set(allowed_extra))
    if unknown:
        raise UserError(f"unknown option(s) in {path}: {', '.join(unknown)}")
    return {key: coerce_option(key, value, str(path)) for key, value in values.items()}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML file; keys may use dashes or underscores. Unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return _read_yaml_options(path)


def list_recipes() -> dict[str, str]:
    """Name -> one-line description of every recipe shipped in ``braintumor/recipes``."""
    return {path.stem: str(_read_yaml_options(path, ("description",)).get("description", ""))
            for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def read_recipe(name: str) -> dict[str, Any]:
    """The options of a shipped recipe (``braintumor train DATA --recipe NAME``), with ``recipe`` set to its name."""
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())}")
    values = _read_yaml_options(path, ("description",))
    values.pop("description", None)
    return {**values, "recipe": name}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """YAML and JSON values to the option's type: PyYAML reads ``1e-5`` as a string, ``3.0`` as a float."""
    if kind in ("float", float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise UserError(f"option {key} must be a number, got {value!r}") from None
    if kind in ("int", int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def resolve_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults, overridden by the file, overridden by flags that were actually given (not None)."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    merged = {key: _coerce(key, value, types.get(key)) for key, value in merged.items()}
    try:
        return TrainConfig(**merged).validate()
    except TypeError as err:
        raise UserError(f"invalid option: {err}") from err


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Save the resolved configuration as YAML."""
    from .atomic import atomic_write

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda handle: handle.write(text), "w")
