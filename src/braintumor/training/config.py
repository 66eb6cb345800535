"""Every training option declared once: its type, default, help, choices and whether it belongs to the recipe.

The *recipe* (data, model, augmentation, optimizer, schedule, seeds) says what a run learns and is saved as the
run's ``config.yaml``; *launch* settings (device, workers, data path, progress, run folder) say how this launch
computes it and may change on ``--resume``, as may ``epochs``. The CLI's ``train`` flags are generated from the
field metadata below, YAML values are coerced to the field's type, and old names are upgraded with a notice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import reprlib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Only torch-free modules here: the CLI's parser is built from this file (``braintumor --help`` stays fast).
from braintumor.choices import ARCHS, MAX_IMAGE_SIZE, OPTIMIZERS, PRECISIONS, REFERENCE_NAME, STEP_MODES
from braintumor.errors import UserError

log = logging.getLogger(__name__)

SCHEDULERS = ("constant", "cosine", "linear")
# Names of earlier versions, still read from old run configs and YAML files (with a one-line notice).
LEGACY_SCHEDULERS = {"none": "constant", "onecycle": "linear"}
DATA_CACHES = ("auto", "none", "memory", "gpu")
GC_MODES = ("all", "conv", "none")
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)  # every command's --workers default
DEFAULT_DEVICE = "auto"  # every command's --device default


def option(default: Any = MISSING, help: str = "", *, launch: bool = False, choices: tuple[str, ...] = (),
           metavar: str | None = None, shown: str | None = None, path: bool = False, flag: bool = True):
    """A config field with its CLI description: ``launch`` (not part of the recipe), ``choices``, ``shown`` (the
    default as --help words it, when not the value itself), ``path`` (stored absolute), ``flag`` (False: no
    generated --flag)."""
    return field(default=default, metadata=dict(help=help, launch=launch, choices=choices, metavar=metavar,
                                                 shown=shown, path=path, flag=flag))


@dataclass
class TrainConfig:
    """Every option of a training run; its recipe part is saved as ``config.yaml`` in the run folder."""

    data: str = option("", "training folder with one sub-folder per class", path=True, flag=False)
    val: str | None = option(None, "separate validation folder", metavar="DIR", path=True,
                             shown="split the training folder")
    val_split: float = option(0.15, "validation fraction of the training folder")
    group_split: bool = option(True, "keep exact/near duplicates and patient groups on one side of the split")
    groups: str | None = option(None, "CSV with columns path,group (patient or series id): a group never straddles "
                                "the split", metavar="FILE.csv", path=True,
                                shown="per-patient sub-folders of the class folders, when there are any")
    arch: str = option("resnet152", "network", choices=ARCHS)
    weights: str = option("imagenet", "initial weights: imagenet, none, or a torchvision state-dict file",
                          path=True)
    image_size: int = option(224, "square input size in pixels")
    rotation: float = option(10.0, "random rotation range in degrees, +/-")
    scale: float = option(0.0, "random scale U(1-s, 1+s); 0: off")
    translate: float = option(0.0, "random shift up to this fraction of the size; 0: off")
    brightness: float = option(0.0, "random brightness factor U(1-b, 1+b); 0: off")
    contrast: float = option(0.0, "random contrast factor U(1-c, 1+c); 0: off")
    gamma: float = option(0.0, "random gamma exp(U(-g, g)); 0: off")
    erasing: float = option(0.0, "probability of blacking out one random rectangle (2-33 % of the slice, aspect "
                            "0.3-3.3) per training slice, random erasing; 0: off")
    crop_area: float = option(0.0, "random-resized crop: each training slice is cropped to U(a, 1) of its area "
                              "(aspect 3/4-4/3, anywhere in the slice) and resized back, before the flip; 0: off")
    cutmix: float = option(0.0, "CutMix: each training slice gets a rectangle of another slice of its batch pasted "
                           "in, labels mixed by area; the Beta(a, a) concentration a of the kept share (1: "
                           "uniform); 0: off")
    mixup: float = option(0.0, "MixUp: each training slice is blended with another slice of its batch, labels "
                          "mixed alike; the Beta(a, a) concentration a of the weight (e.g. 0.2); 0: off; with "
                          "--cutmix, each batch takes one of the two at random")
    progressive_resize: int = option(0, "train at START_SIZE first, growing to --image-size; 0: off",
                                     metavar="START_SIZE")
    progressive_until: float = option(0.5, "fraction of the epochs after which training is at full size")
    eval_image_size: int = option(0, "size for validation and the saved model; 0: --image-size")
    epochs: int = option(10, "number of epochs (the one recipe option --resume may change)")
    batch_size: int = option(32, "global batch size over all processes")
    lr: float = option(1e-5, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay")
    optimizer: str = option("ranger", "optimizer", choices=OPTIMIZERS)
    gc: str = option("all", "gradient centralization of Ranger", choices=GC_MODES)
    lookahead_k: int = option(6, "Ranger's LookAhead sync period in steps")
    lookahead_alpha: float = option(0.5, "Ranger's LookAhead step")
    scheduler: str = option("constant", "learning rate after the warm-up: constant, or cosine or linear decay "
                            "from --lr to 0 at the end of the run", choices=SCHEDULERS)
    warmup_epochs: float = option(0.0, "linear warm-up from 0 to --lr over this many epochs")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    ema: float = option(0.0, "validate and save an exponential moving average of the weights with this decay "
                        "(e.g. 0.999); 0: off", metavar="DECAY")
    tta: bool = option(False, "test-time augmentation: validate each slice averaged with its mirror (stored in "
                       "the model)")
    teacher: str | None = option(None, "distil from this trained checkpoint (same classes; one with a larger input "
                                 "size sees the slices at that size)", metavar="CKPT", path=True,
                                 shown="no distillation")
    distill_weight: float = option(0.5, "weight of the teacher's soft targets")
    distill_temperature: float = option(4.0, "softening temperature of the distillation")
    recipe: str | None = option(None, "the shipped recipe the run started from", flag=False)
    seed: int = option(0, "random seed of the weights, augmentation and batch order")
    split_seed: int | None = option(None, "seed of the validation split; fix it to compare seeds on one split",
                                    shown="--seed")
    precision: str = option("auto", "autocast of the training steps: auto (bf16 on CUDA, float32 on a CPU), bf16 "
                            "(also on a CPU with native bfloat16, about 2x faster there), fp32", choices=PRECISIONS)
    max_steps_per_epoch: int = option(0, "cap on the training steps per epoch (smoke tests); 0: no cap")
    # Launch settings: how this launch computes the recipe.
    workers: int = option(DEFAULT_WORKERS, "DataLoader worker processes", launch=True,
                          shown=f"{DEFAULT_WORKERS}, min(8, CPU cores)")
    device: str = option(DEFAULT_DEVICE, "auto (a CUDA GPU when there is one), cpu, cuda or cuda:N", launch=True)
    data_cache: str = option("auto", "decode the images once and augment batches on the device (memory, gpu), or "
                             "decode per epoch in workers (none); auto picks by size", choices=DATA_CACHES,
                             launch=True)
    train_step: str = option("auto", "eager, compile (torch.compile the model), compile-step (model and Ranger "
                             "update) or cuda-graphs; a mode that cannot run falls back with a notice",
                             choices=STEP_MODES, launch=True)
    skip_bad: bool = option(False, "skip unreadable images (listed in the report) instead of stopping",
                            launch=True)
    out: str | None = option(None, "run folder", metavar="DIR", launch=True, shown="runs/<date-time>-<name>")
    name: str = option("run", "run name used in the default run folder", launch=True)
    progress: bool = option(True, "progress bars (on a terminal)", launch=True)

    def validate(self) -> "TrainConfig":
        """Raise UserError for any option of the wrong type, outside its choices or its range; returns self."""
        if not self.data:
            raise UserError("no training data folder given: braintumor train DATA (or data: in --config)")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_type(f.name, value, f"--{flag_name(f.name)}")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise UserError(f"--{flag_name(f.name)} must be one of {', '.join(f.metadata['choices'])}, "
                                f"got {shown_value(value)}")
        for ok, message in self._range_checks():
            if not ok:
                raise UserError(message)
        return self

    def _range_checks(self) -> list[tuple[bool, str]]:
        return [
            (0.0 < self.val_split < 1.0, f"--val-split must be between 0 and 1, got {self.val_split}"),
            (32 <= self.image_size <= MAX_IMAGE_SIZE,
             f"--image-size must be at least 32 and at most {MAX_IMAGE_SIZE}, got {self.image_size}"),
            (0.0 <= self.rotation <= 180.0, f"--rotation must be in [0, 180] degrees, got {self.rotation}"),
            (0.0 <= self.scale < 1.0, f"--scale must be in [0, 1), got {self.scale}"),
            (0.0 <= self.translate <= 0.5, f"--translate must be in [0, 0.5], got {self.translate}"),
            (0.0 <= self.brightness < 1.0, f"--brightness must be in [0, 1), got {self.brightness}"),
            (0.0 <= self.contrast < 1.0, f"--contrast must be in [0, 1), got {self.contrast}"),
            (0.0 <= self.gamma < 1.0, f"--gamma must be in [0, 1), got {self.gamma}"),
            (0.0 <= self.erasing <= 1.0, f"--erasing must be a probability in [0, 1], got {self.erasing}"),
            (0.0 <= self.crop_area < 1.0, f"--crop-area must be a share of the slice in (0, 1), or 0 (off), "
                                          f"got {self.crop_area}"),
            (math.isfinite(self.cutmix) and self.cutmix >= 0,
             f"--cutmix must be a Beta concentration > 0, or 0 (off), got {self.cutmix}"),
            (math.isfinite(self.mixup) and self.mixup >= 0,
             f"--mixup must be a Beta concentration > 0, or 0 (off), got {self.mixup}"),
            (self.progressive_resize == 0 or 32 <= self.progressive_resize <= self.image_size,
             f"--progressive-resize must be 0 (off) or a start size in [32, --image-size], got {self.progressive_resize}"),
            (0.0 < self.progressive_until <= 1.0,
             f"--progressive-until must be a fraction of the epochs in (0, 1], got {self.progressive_until}"),
            (self.eval_image_size == 0 or 32 <= self.eval_image_size <= MAX_IMAGE_SIZE,
             f"--eval-image-size must be 0 (same as --image-size) or in [32, {MAX_IMAGE_SIZE}], "
             f"got {self.eval_image_size}"),
            (0.0 <= self.ema < 1.0, f"--ema must be a decay in [0, 1) (0: off), got {self.ema}"),
            (0.0 <= self.distill_weight <= 1.0, f"--distill-weight must be in [0, 1], got {self.distill_weight}"),
            (math.isfinite(self.distill_temperature) and self.distill_temperature > 0,
             f"--distill-temperature must be positive and finite, got {self.distill_temperature}"),
            (self.recipe != "distill" or bool(self.teacher),
             "the distill recipe needs a teacher: add --teacher CKPT (a trained run's best.pt, or reference)"),
            (self.split_seed is None or 0 <= self.split_seed < 2**32,
             f"--split-seed must be between 0 and 2**32 - 1, got {self.split_seed}"),
            (1 <= self.epochs <= 100_000, f"--epochs must be at least 1 and at most 100000, got {self.epochs}"),
            (1 <= self.batch_size <= 65_536, f"--batch-size must be at least 1 and at most 65536, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive and finite, got {self.lr}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"),
            (self.lookahead_k >= 1, f"--lookahead-k must be at least 1, got {self.lookahead_k}"),
            (0.0 < self.lookahead_alpha <= 1.0, f"--lookahead-alpha must be in (0, 1], got {self.lookahead_alpha}"),
            (0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs must be between 0 and --epochs ({self.epochs}), got {self.warmup_epochs}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.workers <= 256, f"--workers must be between 0 and 256, got {self.workers}"),
            (0 <= self.seed < 2**32, f"--seed must be between 0 and 2**32 - 1, got {self.seed}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (self.max_steps_per_epoch >= 0, f"--max-steps-per-epoch must be >= 0, got {self.max_steps_per_epoch}"),
        ]

    @property
    def inference_image_size(self) -> int:
        """The size validation and the saved model use: --eval-image-size, else --image-size."""
        return self.eval_image_size or self.image_size

    def split_settings(self):
        """What the data layer's split needs of this run (data.index.prepare_split never reads a TrainConfig)."""
        from braintumor.data.index import SplitSettings

        return SplitSettings(**split_of(self.to_dict()), data=self.data, val=self.val, skip_bad=self.skip_bad,
                             data_cache=self.data_cache, image_size=self.image_size,
                             inference_image_size=self.inference_image_size)

    def batch_settings(self):
        """What the data layer's batches need of this run (data.pipeline.build_batches)."""
        from braintumor.data.augment import Augmentation
        from braintumor.data.pipeline import BatchSettings

        return BatchSettings(batch_size=self.batch_size, seed=self.seed, workers=self.workers,
                             image_size=self.image_size, inference_image_size=self.inference_image_size,
                             augmentation=Augmentation.from_config(self))

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
        """Plain dict of every option, recipe and launch (YAML/JSON/checkpoint safe)."""
        return dataclasses.asdict(self)

    def recipe_dict(self) -> dict[str, Any]:
        """The recipe only: what ``config.yaml`` stores and what ``--resume`` keeps."""
        return {key: value for key, value in self.to_dict().items() if key in RECIPE_FIELDS}

    def with_absolute_paths(self, base: str | os.PathLike | None = None) -> "TrainConfig":
        """A copy whose path options (data, val, groups, teacher, a weights file) are absolute, against ``base``
        (default: the current folder), so the run resumes from any folder."""
        return dataclasses.replace(self, **{key: _absolute(value, base) for key, value in self.to_dict().items()
                                            if key in PATH_FIELDS and _is_path(key, value)})


# Below this peak lr a network from random initialisation (--weights none) learns next to nothing in a short
# run: the 1e-5 default is a fine-tuning rate for ImageNet weights; the scratch recipes use 1e-3 to 3e-3.
SCRATCH_MIN_LR = 1e-4
# Rough seconds per training image (forward + backward) at 224 px on 2 CPU cores, from predict_latency's
# 7.4 img/s eager ResNet-152 inference (README) times 3 for training, scaled by the networks' FLOPs.
CPU_SECONDS_PER_IMAGE_224 = {"resnet18": 0.06, "resnet34": 0.12, "resnet50": 0.14, "resnet101": 0.27,
                             "resnet152": 0.4}


def config_warnings(cfg: TrainConfig) -> list[str]:
    """One-line warnings about a config that will run but probably not as the user hopes."""
    warnings = []
    if cfg.weights == "none" and cfg.lr < SCRATCH_MIN_LR:
        warnings.append(f"warning: --weights none trains from random initialisation, where --lr {cfg.lr:g} (a "
                        "fine-tuning rate) learns next to nothing; use --lr 1e-3 or so, or --recipe scratch-cpu")
    return warnings


def cpu_time_hint(cfg: TrainConfig, train_images: int, cores: int) -> str | None:
    """For a run on the CPU without a recipe and with a large network: a one-line estimate of its time and the
    CPU recipe to use instead; None otherwise."""
    per_image = CPU_SECONDS_PER_IMAGE_224.get(cfg.arch)
    if cfg.recipe is not None or per_image is None or per_image < 0.1:
        return None
    seconds = per_image * (cfg.image_size / 224) ** 2 * 2 / max(1, cores) * train_images
    if cfg.max_steps_per_epoch:
        seconds = min(seconds, per_image * (cfg.image_size / 224) ** 2 * 2 / max(1, cores)
                      * cfg.max_steps_per_epoch * cfg.batch_size)
    if seconds * cfg.epochs < 1800:
        return None
    download = " (after downloading its ImageNet weights)" if cfg.weights == "imagenet" else ""
    return (f"note: {cfg.arch} at {cfg.image_size} px on {cores} CPU core(s){download} takes roughly "
            f"{seconds / 60:.0f} min per epoch here, {seconds * cfg.epochs / 3600:.1f} h for {cfg.epochs} epochs; "
            "on a CPU, --recipe scratch-cpu trains a ResNet-18 in about an hour on 2 cores")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
LAUNCH_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["launch"])
RECIPE_FIELDS = tuple(name for name, f in FIELDS.items() if not f.metadata["launch"])
PATH_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["path"])
# What --resume may change: how the run is computed, and for how many epochs; never what it learns from (nor
# --out: the run folder is the one resumed).
CHANGEABLE_ON_RESUME = ("epochs", *(name for name in LAUNCH_FIELDS if name != "out"))


def split_of(config: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's split of its training folder: the validation fraction, the split seed (--split-seed,
    else --seed), duplicate grouping and the groups file. ``config`` is ``TrainConfig.to_dict()`` or a stored run
    config; keys an older run did not record take their declared defaults."""
    split = {key: config.get(key, FIELDS[key].default) for key in ("val_split", "split_seed", "group_split", "groups")}
    if split["split_seed"] is None:
        split["split_seed"] = config.get("seed", FIELDS["seed"].default)
    return split


def flag_name(key: str) -> str:
    """The command-line spelling of an option: ``batch_size`` -> ``batch-size``."""
    return key.replace("_", "-")


def field_names() -> set[str]:
    """Names of every option, as written in YAML files (underscores)."""
    return set(FIELDS)


def shown_default(key: str) -> str:
    """An option's default as ``--help`` shows it."""
    f = FIELDS[key]
    if f.metadata["shown"]:
        return f.metadata["shown"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def _is_path(key: str, value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and not (key == "weights" and value in ("imagenet", "none"))
            and not (key == "teacher" and value == REFERENCE_NAME))


def _absolute(value: str, base: str | os.PathLike | None) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else Path(os.path.abspath(Path(base or os.getcwd()) / path)))


_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
          "str | None": "text", "int | None": "a whole number"}


def _holds(kind: str, value: Any) -> bool:
    return {"int": type(value) is int, "float": type(value) in (int, float), "bool": type(value) is bool,
            "str": isinstance(value, str), "str | None": value is None or isinstance(value, str),
            "int | None": value is None or type(value) is int}.get(kind, True)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 2, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60


def shown_value(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short (a YAML value may be a huge nested list)."""
    return _short(_SHORT_REPR.repr(value), 120)


def check_type(key: str, value: Any, where: str) -> None:
    """UserError naming ``where`` unless ``value`` holds the type of option ``key``."""
    kind = str(FIELDS[key].type)
    if not _holds(kind, value):
        raise UserError(f"{where} must be {_KINDS.get(kind, kind)}, got {shown_value(value)}")


def coerce_option(key: str, value: Any, source: str) -> Any:
    """A YAML value as its field's type: '1e-5' (PyYAML reads it as text) becomes 1e-05, 64.0 becomes 64.

    Anything that is not cleanly that type (1.5 for an integer, 'maybe' for a switch, 3 for a name) is a
    UserError naming the key and ``source``.
    """
    kind = str(FIELDS[key].type)
    if kind in ("int", "float", "int | None") and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise UserError(f"{key} in {source} must be {_KINDS[kind]}, got {shown_value(value)}") from None
    if kind in ("int", "int | None") and isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    if kind in ("str", "str | None") and isinstance(value, (int, float)) and not isinstance(value, bool):
        raise UserError(f"{key} in {source} must be {_KINDS[kind]}, got {shown_value(value)}")
    check_type(key, value, f"{key} in {source}")
    return float(value) if kind == "float" else value


def upgrade_legacy(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Options in the spelling of earlier versions, renamed with a one-line notice: ``scheduler: onecycle``
    (warm-up then linear decay) is ``linear``, ``none`` is ``constant``; ``compile: true`` is
    ``train_step: compile``."""
    values = dict(values)
    old = values.get("scheduler")
    if isinstance(old, str) and old in LEGACY_SCHEDULERS:
        values["scheduler"] = LEGACY_SCHEDULERS[old]
        log.warning(f"note: scheduler {old!r} in {source} is now called {values['scheduler']!r} (the same schedule)")
    if "compile" in values:
        if values.pop("compile") is True and values.get("train_step", "auto") == "auto":
            values["train_step"] = "compile"
            log.warning(f"note: compile: true in {source} is now train_step: compile")
    return values


RECIPES_DIR = Path(__file__).parents[1] / "recipes"


MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_YAML_VALUES = 10_000  # values in a config once its aliases are expanded (a recipe has about 30)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a document of more than MAX_YAML_VALUES values once its aliases are
    expanded, before building it: a 439-byte alias bomb ("billion laughs") otherwise builds a structure whose
    size, and the text of any message quoting it, is exponential in the file's size."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise yaml.YAMLError(f"it expands to more than {MAX_YAML_VALUES:,} values (aliases, *name, "
                                 "repeating anchors): refused")
        return node


def _expanded_size(node, sizes: dict[int, int], limit: int) -> int:
    """How many nodes ``node`` stands for with every alias expanded (shared nodes counted once each time they
    are used); stops counting past ``limit``. A node met again while it is being counted (a recursive alias)
    counts as over the limit."""
    key = id(node)
    if key in sizes:
        return sizes[key] if sizes[key] >= 0 else limit + 1
    sizes[key] = -1
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, limit)
        if total > limit:
            break
    sizes[key] = total
    return total


def load_yaml_text(path: Path) -> Any:
    """The YAML document of a small text file, or a one-line UserError (too big, not UTF-8 text, not YAML, an
    alias bomb, nesting too deep)."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UserError(f"config file {path} is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.start}); "
                        "give a YAML file of option: value lines") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path} ({err.strerror or err})") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {_short(str(err).splitlines()[0])}") from None
    except RecursionError:
        raise UserError(f"config file {path} nests too deeply to be a config") from None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _read_yaml_options(path: Path, allowed_extra: tuple[str, ...] = ()) -> dict[str, Any]:
    values = load_yaml_text(path) or {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    values = upgrade_legacy({str(key).replace("-", "_"): value for key, value in values.items()}, str(path))
    unknown = sorted(set(values) - field_names() - set(allowed_extra))
    if unknown:
        raise UserError(f"unknown option(s) in {path}: {_short(', '.join(unknown))} (see braintumor train --help)")
    return {key: value if key in allowed_extra else coerce_option(key, value, str(path))
            for key, value in values.items()}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML file; keys may use dashes or underscores. Unknown keys are an error. Relative paths
    in it are relative to the current folder, as on the command line."""
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


def resolve_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults, overridden by the file, overridden by flags that were actually given (not None); validated."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    unknown = sorted(set(merged) - field_names())
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(unknown)}")
    merged = {key: coerce_option(key, value, "the options") for key, value in merged.items()}
    return TrainConfig(**merged).validate()


def from_saved(values: dict[str, Any], source: str, **overrides: Any) -> TrainConfig:
    """The configuration stored in a checkpoint or run folder, from any version: options this version lacks are
    dropped, old names upgraded; ``overrides`` replace stored values. Not validated."""
    values = upgrade_legacy(values or {}, source)
    return TrainConfig(**{key: value for key, value in {**values, **overrides}.items() if key in FIELDS})


def resume_config(saved: dict[str, Any], overrides: dict[str, Any], run_dir: Path) -> TrainConfig:
    """The configuration a resumed run continues with: the saved recipe, the saved launch settings unless
    ``overrides`` change them, and only ``epochs`` and launch settings may be overridden (one-line UserError
    otherwise). Relative data paths of older runs are found from here or from the run folder's parents."""
    given = {key: value for key, value in overrides.items() if value is not None}
    refused = [key for key in given if key not in CHANGEABLE_ON_RESUME]
    if refused:
        allowed = ", ".join("--" + flag_name(key) for key in CHANGEABLE_ON_RESUME)
        raise UserError(f"--resume continues the recipe of {run_dir}, so --{flag_name(refused[0])} cannot be "
                        f"given; only {allowed} may change. Start a new run to change the recipe")
    cfg = from_saved(saved, str(run_dir / "last.pt"), **given, out=str(run_dir))
    # The weights option only initialises a new run, so an old run's relative weights file does not matter.
    paths = {key: _find_saved_path(key, getattr(cfg, key), run_dir) for key in PATH_FIELDS
             if key != "weights" and _is_path(key, getattr(cfg, key))}
    return dataclasses.replace(cfg, **paths).validate()


def _find_saved_path(key: str, value: str, run_dir: Path) -> str:
    """An absolute path as is; a relative one (runs of older versions) from the current folder, else from the
    run folder's parents (``runs/NAME`` sits two levels below the folder it was started in)."""
    if Path(value).expanduser().is_absolute():
        return value
    bases = [Path.cwd(), *Path(os.path.abspath(run_dir)).parents[:2]]
    for base in bases:
        if (base / value).exists():
            return _absolute(value, base)
    raise UserError(f"the run's {key} path {value!r} is relative (an older run) and not found from here: resume "
                    f"from the folder the run was started in")


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Save the recipe (not the launch settings) as YAML: ``--config`` with it trains the same run again."""
    from braintumor.utils.atomic import atomic_write

    header = ("# The recipe of this run: `braintumor train --config config.yaml` trains it again. Launch settings\n"
              "# (device, workers, data cache, ...) are not part of it: see `braintumor train --help`.\n")
    text = header + yaml.safe_dump(cfg.recipe_dict(), sort_keys=False)
    atomic_write(path, lambda handle: handle.write(text), "w")
