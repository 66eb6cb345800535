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
    arch: str = "resnet152"
    weights: str = "imagenet"
    image_size: int = 224
    rotation: float = 10.0
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
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    seed: int = 0
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON/checkpoint safe)."""
        return dataclasses.asdict(self)


def field_names() -> set[str]:
    """Names of every option, as written in YAML files (underscores)."""
    return {f.name for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML file; keys may use dashes or underscores. Unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise UserError(f"unknown option(s) in {path}: {', '.join(unknown)}")
    return values


def resolve_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults, overridden by the file, overridden by flags that were actually given (not None)."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in merged.items():
        if types.get(key) in ("int", int) and isinstance(value, float) and value.is_integer():
            merged[key] = int(value)
    try:
        return TrainConfig(**merged).validate()
    except TypeError as err:
        raise UserError(f"invalid option: {err}") from err


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Save the resolved configuration as YAML."""
    from .atomic import atomic_write

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda handle: handle.write(text), "w")
