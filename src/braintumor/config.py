"""All training options in one dataclass: defaults, then a YAML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .model import ARCHS

OPTIMIZERS = ("ranger", "radam", "adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle")
DATA_CACHES = ("auto", "none", "memory", "gpu")
GC_MODES = ("all", "conv", "none")


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
    skip_bad: bool = False
    out: str | None = None
    name: str = "run"
    max_steps_per_epoch: int = 0
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Raise UserError for any option outside its range; returns self."""
        checks = [
            (bool(self.data), "no training data folder given"),
            (self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (0.0 < self.val_split < 1.0, f"--val-split must be between 0 and 1, got {self.val_split}"),
            (self.image_size >= 32, f"--image-size must be at least 32, got {self.image_size}"),
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
            (self.distill_temperature > 0, f"--distill-temperature must be positive, got {self.distill_temperature}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.gc in GC_MODES, f"--gc must be one of {', '.join(GC_MODES)}"),
            (self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.data_cache in DATA_CACHES, f"--data-cache must be one of {', '.join(DATA_CACHES)}"),
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
    return values


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
