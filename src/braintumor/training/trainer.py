"""The training loop: epochs, bf16 autocast on CUDA, checkpoints, exact resume, metrics log, DDP."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from braintumor.training import distributed
from braintumor.training import runstate
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import to_json
from braintumor.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint, save_inference_checkpoint
from braintumor.training.config import TrainConfig, config_warnings, cpu_time_hint, resume_config, write_config
from braintumor.data.augment import batch_mixer
from braintumor.data.index import SplitData, prepare_split
from braintumor.data.pipeline import build_batches
from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_batch
from braintumor.training.distill import Teacher, check_teacher, distillation_loss, training_source_size
from braintumor.training.ema import ModelEma
from braintumor.errors import UserError
from braintumor.visualize.figures import plot_training_curves
from braintumor.evaluation.evaluate import evaluate_classifier, infer_batches, loss_and_correct, view_logits
from braintumor.models.network import build_model
from braintumor.optim.table import build_optimizer
from braintumor.inference.classifier import Classifier
from braintumor.utils.devices import available_cores, resolve_device
from braintumor.utils.locking import exclusive_folder
from braintumor.utils.seeding import seed_epoch
from braintumor.training.step import autocast, choose_precision, choose_step_mode, pad_batch, wrap_network
from braintumor.training.tensorboard import open_log

log = logging.getLogger(__name__)


# (arch, num_classes, weights) -> the network to train; model.build_model by default
ModelFactory = Callable[[str, int, str], nn.Module]


@dataclass
class RunResult:
    """Where a finished run wrote its files, and its headline numbers."""

    run_dir: Path
    best_checkpoint: Path
    best_val_accuracy: float
    report: dict[str, Any] | None


def make_optimizer(cfg: TrainConfig, params, compiled: bool = False) -> torch.optim.Optimizer:
    """``--optimizer`` from the one optimizer table (braintumor.optim.table) at ``--lr`` and ``--weight-decay``;
    ``compiled``: its update fused by torch.compile where it has one (Ranger)."""
    return build_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay, compiled=compiled,
                           options=cfg.to_dict())


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step LR factor: a linear warm-up over --warmup-epochs, then constant (the reference recipe), or a cosine
    or linear decay from --lr to 0 at the end of the run."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)  # linear

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """One training run; rank 0 writes everything, other ranks only compute."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume_from: dict[str, Any] | None = None,
                 model_factory: ModelFactory = build_model):
        self.created_at = time.perf_counter()
        self.cfg, self.run_dir, self.model_factory = cfg, run_dir, model_factory
        self._join_processes()
        self._load_data(resume_from)
        hint = cpu_time_hint(cfg, len(self.split.train_paths), available_cores()) if self.device.type == "cpu" else None
        if hint and self.dist.is_main and resume_from is None:
            log.warning(hint)
        self._plan_steps()
        self._build_model(resumed=resume_from is not None)
        self._build_optimization()
        self._restore(resume_from)
        self._wrap_networks()
        self._choose_precision()

    def _join_processes(self) -> None:
        """The device, the process group (DDP under torchrun) and whether this process shows progress."""
        self.device = resolve_device(self.cfg.device)
        self.dist = distributed.init_from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.show_progress = self.cfg.progress and self.dist.is_main and sys.stderr.isatty()

    def _load_data(self, resume_from: dict[str, Any] | None) -> None:
        """Check and split the files, then the batch iterators (and their cache) over each side."""
        cfg = self.cfg
        # Read once here (its input size sets the data's) and handed to the teacher checks and the Teacher.
        self.teacher_ckpt = load_checkpoint(cfg.teacher) if cfg.teacher else None
        # A teacher larger than the student sees the training batches at its own size (braintumor.training.distill).
        self.source_size = training_source_size(cfg.image_size, self.teacher_ckpt["image_size"] if self.teacher_ckpt
                                                else None)
        if self.source_size > cfg.image_size and self.dist.is_main:
            log.info(f"the teacher runs at {self.source_size} px: training slices are decoded and augmented at "
                     f"{self.source_size} px for it, and resized to the student's size for the student")
        # Rank 0 checks the files and splits (hashing for duplicate groups once, not once per rank).
        # It also picks the data cache for every rank and, in a single process, keeps what it decoded.
        self.split: SplitData = distributed.run_on_main(
            lambda: prepare_split(replace(cfg.split_settings(), image_size=self.source_size),
                                  self.show_progress, device=self.device, keep_images=not self.dist.enabled),
            self.dist)
        self.classes = self.split.classes
        if resume_from is not None and resume_from["classes"] != self.classes:
            raise UserError(f"the data's classes {self.classes} differ from the checkpoint's {resume_from['classes']}")
        self.train_batches, self.val_batches, self.cache_mode = build_batches(
            self.split, replace(cfg.batch_settings(), image_size=self.source_size), self.device,
            self.dist, self.show_progress)
        self.split.train_images = self.split.val_images = None  # the batches hold them (on the device with gpu)
        self.steps_per_epoch = len(self.train_batches)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        # Validation pads its last batch to this size, so compiled steps and cuDNN autotuning see one shape.
        self.val_batch_size = cfg.batch_size // self.dist.world_size

    def _plan_steps(self) -> None:
        """Eager, compiled or CUDA-graph steps (--train-step), with a notice when the one asked for cannot run."""
        self.step_plan = choose_step_mode(self.cfg.train_step, self.device, distributed=self.dist.enabled,
                                          optimizer=self.cfg.optimizer,
                                          total_steps=self.cfg.epochs * self.steps_per_epoch)
        if self.step_plan.notice and self.dist.is_main:
            print(self.step_plan.notice, file=sys.stderr, flush=True)

    def _build_model(self, resumed: bool) -> None:
        """The network (seeded; a resumed run's weights come from its checkpoint), its EMA and the teacher."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model = self.model_factory(cfg.arch, len(self.classes), "none" if resumed else cfg.weights)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # channels_last on every device: faster convolutions on CUDA, and 9-15 % faster training steps on a CPU
        # too (ResNet-18 and -50, 128 px, 2 cores; benchmarks/train_throughput.py --variants eager,eager-contiguous).
        self.model = self.model.to(self.device).to(memory_format=torch.channels_last)
        self.ema = ModelEma(self.model, cfg.ema) if cfg.ema > 0 else None
        self.teacher = None
        if cfg.teacher:
            # Rank 0 compares the teacher's training images with this run's validation images (hashing both).
            distributed.run_on_main(lambda: check_teacher(cfg.teacher, cfg.to_dict(), self.split.val_paths,
                                                          ckpt=self.teacher_ckpt), self.dist)
            self.teacher = Teacher(cfg.teacher, self.classes, self.device, student_config=cfg.to_dict(),
                                   ckpt=self.teacher_ckpt)
        self.teacher_ckpt = None  # the Teacher holds the network; the loaded file is not needed any more

    def _build_optimization(self) -> None:
        """The optimizer of the one table, the lr schedule and the loss."""
        self.optimizer = make_optimizer(self.cfg, self.model.parameters(),
                                        compiled=self.step_plan.compiles_optimizer)
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        self.mixer = batch_mixer(self.cfg.cutmix, self.cfg.mixup, len(self.classes))

    def _restore(self, resume_from: dict[str, Any] | None) -> None:
        """Where the run stands: from scratch, or the weights, optimizer, schedule, EMA and history of last.pt."""
        self.start_epoch, self.best_val_accuracy, self.best_epoch = 0, -1.0, 0
        self.saved_history: list[dict[str, Any]] | None = None
        if resume_from is None:
            return
        try:
            self.model.load_state_dict(resume_from["model"])
            self.optimizer.load_state_dict(resume_from["optimizer"])
            self.scheduler.load_state_dict(resume_from["scheduler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"{self.run_dir / 'last.pt'} does not fit a {self.cfg.arch} run with the "
                            f"{self.cfg.optimizer} optimizer "
                            f"({str(err).strip().splitlines()[0] if str(err).strip() else err!r})") from None
        if self.ema is not None:
            if "ema" not in resume_from:
                raise UserError("--ema cannot be switched on when resuming a run that trained without it")
            self.ema.load_state_dict(resume_from["ema"])
        self.start_epoch = int(resume_from["epoch"])
        self.best_val_accuracy = float(resume_from["best_val_accuracy"])
        self.best_epoch = int(resume_from.get("best_epoch", 0))
        self.saved_history = resume_from.get("history")

    def _wrap_networks(self) -> None:
        """The network training runs (DDP, compiled) and the one validation runs."""
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = wrap_network(self.net, self.step_plan)
        # Validation runs the weights it reports (the EMA's with --ema) the way training runs its network
        # (compiled with --compile), without DDP: each rank validates its own shard.
        self.eval_net = (self.net if self.ema is None and not self.dist.enabled
                         else wrap_network(self.eval_model, self.step_plan))

    def _choose_precision(self) -> None:
        """bf16 autocast (no loss scaling needed) on CUDA, and on a CPU with native bf16 when --precision bf16
        asks; validation on a CPU stays float32, as braintumor evaluate computes."""
        dtype, notice = choose_precision(self.cfg.precision, self.device)
        if notice and self.dist.is_main:
            print(notice, file=sys.stderr, flush=True)
        self.autocast = autocast(self.device, dtype)
        self.eval_autocast = autocast(self.device, dtype if self.device.type == "cuda" else None)

    def _images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor):
        return self._images_to_device(images), labels.to(self.device, non_blocking=True)

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training shard; losses stay on the device until the epoch ends."""
        self.net.train()
        self.train_batches.set_epoch(epoch)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)  # first non-finite loss
        check_each_step = self.device.type == "cpu" and not self.dist.enabled  # free on the CPU: stop at once
        student_size = self.cfg.train_image_size(epoch)
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not self.show_progress, unit="batch")
        for step, (images, labels) in enumerate(self.train_batches):
            if step >= self.steps_per_epoch:
                break
            images, labels = self._to_device(images, labels)
            targets = labels
            if self.mixer is not None:  # class shares (B, classes); accuracy counts the larger share's class
                images, targets = self.mixer(images, labels)
                images, labels = images.contiguous(memory_format=torch.channels_last), targets.argmax(1)
            teacher_images = images  # at a larger teacher's size, the same slices as the student's
            images = resize_batch(images, student_size).contiguous(memory_format=torch.channels_last)
            with self.autocast:
                logits = self.net(images)
                if self.teacher is not None:
                    loss = distillation_loss(logits.float(), self.teacher.logits(teacher_images), targets,
                                             weight=self.cfg.distill_weight,
                                             temperature=self.cfg.distill_temperature,
                                             label_smoothing=self.cfg.label_smoothing)
                else:
                    loss = self.criterion(logits.float(), targets)
            finite = torch.isfinite(loss.detach())
            if check_each_step and not bool(finite):
                raise self.diverged(epoch, step)
            # On a GPU (or with several ranks) no per-step sync: the first bad step is recorded on the device.
            first_bad_step = torch.where((first_bad_step < 0) & ~finite, step, first_bad_step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            with torch.no_grad():
                totals += torch.stack([loss.detach().double() * labels.numel(),
                                       (logits.argmax(1) == labels).sum().double(),
                                       torch.full((), float(labels.numel()), dtype=torch.float64, device=self.device)])
            bar.update(1)
        bar.close()
        distributed.average_buffers(self.model, self.dist)
        if self.ema is not None:  # the averaged BatchNorm statistics, not this rank's last ones
            self.ema.copy_buffers(self.model)
        loss_sum, correct, count = distributed.all_reduce_sum(totals, self.dist).tolist()
        if not math.isfinite(loss_sum):  # reduced over all ranks: every rank stops together
            raise self.diverged(epoch, int(first_bad_step.item()))
        return {"train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
                "train_images": int(count)}

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved for inference: the EMA when --ema is on."""
        return self.ema.module if self.ema is not None else self.model

    def diverged(self, epoch: int, step: int, phase: str = "training") -> UserError:
        """The one-line error for a non-finite loss: where it happened and which checkpoints are still good."""
        if phase == "validation":
            where = f"the validation loss became non-finite after epoch {epoch + 1}"
        else:
            where = (f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}" if step >= 0
                     else f"the loss became non-finite in epoch {epoch + 1} (on another process)")
        last, best = self.run_dir / "last.pt", self.run_dir / "best.pt"
        if epoch > 0 and last.is_file():
            kept = (f"{best} (epoch {self.best_epoch}) and {last} (epoch {epoch}), the last finite ones, are "
                    "unchanged" if best.is_file() else f"{last} (epoch {epoch}) is unchanged")
        else:
            kept = "no checkpoint had been written yet"
        return UserError(f"training diverged: {where}; stopped, and {kept}. Try a lower --lr or a warm-up "
                         "(--warmup-epochs)")

    def validation_views(self, images: torch.Tensor) -> tuple[list[np.ndarray], None]:
        """Logits of each test-time view of a validation batch, padded to one shape for compiled steps."""
        n = images.shape[0]
        padded = self._images_to_device(pad_batch(images, self.val_batch_size))
        with self.eval_autocast:
            views = view_logits(self.eval_net, padded, self.cfg.tta)
        return [view[:n].cpu().numpy() for view in views], None  # the padded rows are not counted

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and accuracy over the whole validation set (each rank its shard, summed), by the evaluation loop
        of ``braintumor evaluate``; with --tta of the mean probabilities of each slice and its mirror."""
        self.net.eval()
        self.eval_model.eval()
        views, _, labels = infer_batches(self.validation_views, self.val_batches, len(self.classes))
        loss, correct = loss_and_correct(views, labels)
        totals = torch.tensor([loss, correct, len(labels)], dtype=torch.float64, device=self.device)
        loss_sum, correct, count = distributed.all_reduce_sum(totals, self.dist).tolist()
        return {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1)}

    def checkpoint_payload(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        spec = ModelSpec(arch=self.cfg.arch, classes=self.classes, image_size=self.cfg.inference_image_size,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, tta=bool(self.cfg.tta))
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                   **spec.to_dict(), "config": self.cfg.to_dict(),
                   "best_val_accuracy": self.best_val_accuracy, "best_epoch": self.best_epoch,
                   "history": [dict(row) for row in history]}
        if self.ema is not None:  # inference (model_from_checkpoint) uses these weights
            payload["ema"] = self.ema.state_dict()
        return payload

    def fit(self) -> RunResult:
        """Train the remaining epochs, checkpointing each; then evaluate best.pt on the validation set."""
        log_path = self.run_dir / "metrics.jsonl"
        history: list[dict[str, Any]] = []
        if self.dist.is_main:
            # The checkpoint's own copy of the metrics is the truth (a kill may have come before or after the
            # metrics file was written); older checkpoints without one fall back to the file.
            history = ([row for row in self.saved_history if row["epoch"] <= self.start_epoch]
                       if self.saved_history is not None else read_metrics(log_path, up_to_epoch=self.start_epoch))
            if self.start_epoch:
                write_metrics(log_path, history)
        if self.dist.is_main and self.start_epoch == 0:
            log.info(f"training {self.cfg.arch} on {len(self.split.train_paths)} images, validating on "
                     f"{len(self.split.val_paths)} ({self.split.val_source}); classes: {', '.join(self.classes)}; "
                     f"device {self.device}, data path: {self.cache_mode}")
        fit_start = time.perf_counter()
        elapsed_before = history[-1].get("elapsed_seconds", 0.0) if history else 0.0
        epochs_bar = tqdm(total=self.cfg.epochs, initial=self.start_epoch, desc="epochs", unit="epoch",
                          disable=not self.show_progress)
        board = open_log(self.run_dir, self.start_epoch) if self.dist.is_main else None
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                seed_epoch(self.cfg.seed, epoch, self.dist.rank)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                train_size = self.cfg.train_image_size(epoch)
                # Batches for a larger teacher keep its size; train_one_epoch resizes the student's copy.
                self.train_batches.set_image_size(self.source_size if self.source_size > self.cfg.image_size
                                                  else train_size)
                row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                                       "image_size": train_size}
                row.update(self.train_one_epoch(epoch))
                train_seconds = time.perf_counter() - start
                row.update(self.validate())
                if not math.isfinite(row["val_loss"]):  # nothing of this epoch is saved; never a report on NaN
                    raise self.diverged(epoch, -1, "validation")
                row["seconds"] = time.perf_counter() - start
                row["images_per_second"] = row["train_images"] / max(train_seconds, 1e-9)
                row["elapsed_seconds"] = elapsed_before + time.perf_counter() - fit_start
                if epoch == 0:  # set-up (file check, split, decode, model) + first epoch: what a user waits for
                    row["seconds_to_first_epoch"] = time.perf_counter() - self.created_at
                improved = row["val_accuracy"] > self.best_val_accuracy
                if improved:
                    self.best_val_accuracy, self.best_epoch = row["val_accuracy"], epoch + 1
                if self.dist.is_main:
                    # Metrics first, then last.pt (which holds them too), then best.pt: runstate repairs a kill
                    # between any two of these writes on resume.
                    history.append(row)
                    write_metrics(log_path, history)
                    payload = self.checkpoint_payload(epoch + 1, history)
                    save_checkpoint(payload, self.run_dir / "last.pt")
                    if improved:  # best.pt: the validated weights and the spec only, for inference
                        save_inference_checkpoint(payload, self.run_dir / "best.pt")
                    plot_training_curves(history, self.run_dir / "training_curves.png", loss_title(self.cfg))
                    if board is not None:
                        board.log_epoch(row)
                    # the CLI's handler keeps bars intact
                    log.info(format_epoch(row, self.cfg.epochs, improved, self.cfg.image_size))
                epochs_bar.update(1)
        except BaseException:
            epochs_bar.close()
            if board is not None:  # what the stopped run logged stays readable
                board.close()
            raise
        epochs_bar.close()
        if self.dist.is_main and history and not (self.run_dir / "training_curves.png").is_file():
            plot_training_curves(history, self.run_dir / "training_curves.png", loss_title(self.cfg))
        distributed.barrier(self.dist)
        report = None
        if self.dist.is_main:
            report = self.final_report()
            if board is not None:
                board.log_confusion_matrix(self.run_dir / "confusion_matrix.png", self.cfg.epochs)
                board.log_augmented_batch(self.train_batches, IMAGENET_MEAN, IMAGENET_STD, self.cfg.epochs)
                board.close()
        distributed.barrier(self.dist)
        return RunResult(self.run_dir, self.run_dir / "best.pt", self.best_val_accuracy, report)

    def final_report(self) -> dict[str, Any]:
        """Fit the OOD detector and temperature into best.pt, then evaluate it on the validation set."""
        from braintumor.trust.fitting import describe_trust, fit_trust, store_trust

        best = self.run_dir / "best.pt"
        trust = fit_trust(self.best_classifier(), self.split.train_paths, self.split.train_labels,
                          self.split.val_paths, self.split.val_labels, batch_size=self.cfg.batch_size,
                          workers=self.cfg.workers)
        store_trust(best, trust)  # last.pt stays as trained
        log.info("fitted into best.pt: %s", describe_trust(trust))

        extra = {"validation data": self.split.val_source,
                 "note": "best.pt was selected on this validation set, so these figures are optimistic; "
                         "evaluate on a separate test folder with `braintumor evaluate` for an unbiased estimate"}
        if self.split.skipped:
            extra["skipped unreadable files"] = [f"{path} ({reason})" for path, reason in self.split.skipped]
        return evaluate_classifier(self.best_classifier(), self.split.val_paths, self.split.val_labels,
                                   self.run_dir, batch_size=self.cfg.batch_size, workers=self.cfg.workers,
                                   title="Validation report (best.pt)", extra=extra)

    def best_classifier(self) -> Classifier:
        """best.pt as it is on disk, its network rebuilt by this run's model factory."""
        return Classifier.from_checkpoint(self.run_dir / "best.pt", device=str(self.device),
                                          model_factory=self.model_factory)


def loss_title(cfg: TrainConfig) -> str:
    """What a run's ``train_loss`` and ``val_loss`` measure, as the title of its loss curves: validation is always
    the plain cross-entropy; training's loss is what the run optimised (distillation, label smoothing, the mixed
    labels of CutMix / MixUp), so the two curves are not the same quantity when any of these is on."""
    if cfg.teacher and cfg.distill_weight > 0:
        train = (f"{1 - cfg.distill_weight:g} × cross-entropy + {cfg.distill_weight:g} × distillation "
                 f"(T {cfg.distill_temperature:g})")
    else:
        train = "cross-entropy"
    extras = ([f"label smoothing {cfg.label_smoothing:g}"] if cfg.label_smoothing else []) + \
        (["CutMix / MixUp labels"] if cfg.cutmix or cfg.mixup else [])
    if train == "cross-entropy" and not extras:
        return "Cross-entropy loss"
    return f"Loss\ntrain: {train}{''.join(', ' + extra for extra in extras)}\nvalidation: cross-entropy"


def format_epoch(row: dict[str, Any], epochs: int, improved: bool, image_size: int | None = None) -> str:
    """One console line per epoch; the lr is the one the epoch started with (warm-up and decay step per batch),
    and the training size is shown while progressive resizing keeps it below ``image_size``."""
    size = row.get("image_size")
    at = f" at {size} px" if size and image_size and size != image_size else ""
    return (f"epoch {row['epoch']}/{epochs}  train{at} loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}  start lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f} s  {row['images_per_second']:.0f} img/s{'  *best' if improved else ''}")


def read_metrics(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """Earlier epochs of a resumed run (later lines, from epochs after the checkpoint, are dropped)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["epoch"] <= up_to_epoch]


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(to_json(row, indent=None) for row in rows)  # one JSON object per line, each parses
    atomic_write(path, lambda handle: handle.write(text), "w")


def new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.name}"


def train(cfg: TrainConfig, *, model_factory: ModelFactory = build_model) -> RunResult:
    """Train a model as ``cfg`` says; the Python entry point behind ``braintumor train``.

    ``model_factory(arch, num_classes, weights)`` builds the network (default :func:`~braintumor.models.network.build_model`);
    pass another to train a variant, e.g. ``functools.partial(build_model, norm_layer=...)``.
    """
    cfg = cfg.validate().with_absolute_paths()  # the run resumes from any folder
    run_dir = new_run_dir(cfg)
    created = not run_dir.exists() and int(os.environ.get("RANK", "0")) == 0  # rank 0 owns the folder
    with own_run_folder(run_dir):
        try:
            if (run_dir / "last.pt").exists():
                raise UserError(f"{run_dir} already holds a run (last.pt); use --resume {run_dir} or another --out")
            runstate.remove_stale_temp_files(run_dir)
            trainer = Trainer(cfg, run_dir, model_factory=model_factory)
            for warning in config_warnings(cfg):  # after the data checks: a user error stays one line
                log.warning(warning)
            return _fit(trainer)
        except BaseException:
            if created and not (run_dir / "last.pt").exists():  # a run that wrote no epoch leaves nothing behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def own_run_folder(run_dir: Path):
    """The run folder's exclusive lock (utils.locking), taken by the process that writes it (rank 0 under
    torchrun) before anything is written; a second run into the folder stops with the holder's PID."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext(run_dir)
    return exclusive_folder(run_dir, "braintumor train")


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None, *,
           model_factory: ModelFactory = build_model) -> RunResult:
    """Continue a run from its last.pt with its recipe; ``overrides`` may change the epochs and the launch settings
    (device, workers, ...; see ``config.CHANGEABLE_ON_RESUME``), anything else is a UserError."""
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").is_file():
        raise UserError(f"nothing to resume: {run_dir / 'last.pt'} not found")
    with own_run_folder(run_dir):
        return _resume(run_dir, overrides, model_factory)


def _resume(run_dir: Path, overrides: dict[str, Any] | None, model_factory: ModelFactory) -> RunResult:
    runstate.remove_stale_temp_files(run_dir)
    ckpt = load_checkpoint(run_dir / "last.pt")
    cfg = resume_config(ckpt["config"], overrides or {}, run_dir)
    if ckpt["epoch"] > cfg.epochs:
        raise UserError(f"{run_dir} already trained {ckpt['epoch']} epochs; --epochs must be at least that")
    runstate.repair_best(run_dir, ckpt)
    if ckpt["epoch"] == cfg.epochs:
        if runstate.report_is_current(run_dir):
            raise UserError(f"{run_dir} already finished {ckpt['epoch']} epochs and its report; "
                            f"pass --epochs N with N > {ckpt['epoch']} to train longer")
        log.info("%s finished training but not its report: making the report", run_dir)
    return _fit(Trainer(cfg, run_dir, resume_from=ckpt, model_factory=model_factory))


def _fit(trainer: Trainer) -> RunResult:
    """Save the resolved config (rank 0), train, and leave the process group however training ends."""
    try:
        if trainer.dist.is_main:
            write_config(trainer.cfg, trainer.run_dir / "config.yaml")
        return trainer.fit()
    finally:
        distributed.shutdown(trainer.dist)
