"""What a run folder says about how far a run got, and repairs after a crash at any write boundary.

A run writes, per epoch: ``metrics.jsonl`` (the history so far, also stored in the checkpoint), then ``last.pt``,
then (when validation improved) ``best.pt`` (its weights and spec); after the last epoch, the report, ``report.json``
last. A kill between any two of these leaves a state this module recognises and repairs on resume: a stale
``best.pt`` is rewritten, metrics are taken from the checkpoint, a missing report is made, temp files removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from braintumor.models.checkpoint import load_checkpoint, save_inference_checkpoint
from braintumor.errors import UserError

def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in the run folder (``.NAME.*.tmp``)."""
    removed = []
    if run_dir.is_dir():
        for path in run_dir.glob(".*.tmp"):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def repair_best(run_dir: Path, ckpt: dict[str, Any]) -> None:
    """Rewrite best.pt from last.pt when the kill came between writing last.pt and best.pt of a new best epoch."""
    best = run_dir / "best.pt"
    best_epoch = ckpt.get("best_epoch")
    if best_epoch is not None and best_epoch == ckpt.get("epoch"):
        if not best.exists() or _epoch_of(best) != best_epoch:
            save_inference_checkpoint(ckpt, best)
    elif not best.exists():
        raise UserError(f"{best} is missing and cannot be rebuilt (its epoch {best_epoch} is no longer "
                        f"last.pt); start a new run")


def _epoch_of(path: Path) -> int | None:
    """The epoch a checkpoint file was written at (None when unreadable: it is rewritten)."""
    try:
        return load_checkpoint(path).get("epoch")
    except UserError:
        return None


def report_is_current(run_dir: Path) -> bool:
    """True when report.json (written last) was written after the final last.pt."""
    report, last = run_dir / "report.json", run_dir / "last.pt"
    return report.is_file() and last.is_file() and report.stat().st_mtime_ns >= last.stat().st_mtime_ns
