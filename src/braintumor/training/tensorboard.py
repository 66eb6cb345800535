"""TensorBoard event files in every run folder (``tensorboard --logdir runs``); ``metrics.jsonl`` stays the record.

Per epoch (step = epoch number): ``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``, ``lr``
(at the start of the epoch), ``speed/images_per_second`` and ``speed/epoch_seconds``. At the end of the run:
the validation confusion matrix of ``best.pt`` (the report's PNG) and a grid of augmented training images
as the model sees them (after flips/rotations, normalisation undone). A resumed run purges the steps after
its checkpoint, so TensorBoard shows each epoch once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_accuracy": "accuracy/train",
           "val_accuracy": "accuracy/val", "lr": "lr", "images_per_second": "speed/images_per_second",
           "seconds": "speed/epoch_seconds"}
GRID_IMAGES = 16


class TensorBoardLog:
    """A SummaryWriter on the run folder, called from the training loop on the main process only."""

    def __init__(self, run_dir: str | os.PathLike, start_epoch: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run wrote after the checkpoint it resumes from.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch + 1 if start_epoch else None)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """The epoch's scalars from its ``metrics.jsonl`` row."""
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), int(row["epoch"]))
        self.writer.flush()

    def log_confusion_matrix(self, png_path: str | os.PathLike, step: int) -> None:
        """The report's confusion-matrix PNG as an image."""
        from PIL import Image

        path = Path(png_path)
        if path.is_file():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image("validation/confusion_matrix", pixels, step, dataformats="HWC")

    def log_augmented_batch(self, batches, mean, std, step: int) -> None:
        """A grid of up to GRID_IMAGES images from the first training batch, de-normalised to 0..1."""
        from torchvision.utils import make_grid

        try:
            images, _ = next(iter(batches))
        except StopIteration:
            return
        images = images[:GRID_IMAGES].detach().float().cpu()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        grid = make_grid((images * std_t + mean_t).clamp(0, 1), nrow=int(np.ceil(np.sqrt(len(images)))), padding=2)
        self.writer.add_image("train/augmented_images", grid, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def open_log(run_dir: str | os.PathLike, start_epoch: int = 0) -> TensorBoardLog | None:
    """A TensorBoardLog, or None (with a warning) when TensorBoard is not importable."""
    try:
        return TensorBoardLog(run_dir, start_epoch)
    except ImportError as error:
        log.warning("no TensorBoard event files for this run (%s); pip install 'braintumor[tensorboard]'", error)
        return None
