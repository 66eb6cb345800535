"""Output folders are never overwritten silently: a new time-stamped folder by default, ``--overwrite`` to reuse.

``evaluate``, ``explain`` and ``audit`` write into ``--out DIR``. Without ``--out`` they create a fresh
``<command folder>/<YYYYmmdd-HHMMSS>`` (e.g. ``evaluation/20261130-141502``; ``-2``, ``-3``, ... when two runs
start in the same second). An ``--out`` folder that already holds files is refused unless ``--overwrite`` is
given; then files of the same name are replaced and other files are left as they are.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from braintumor.errors import UserError


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} entries)" if len(names) > limit else "")


def prepare_output_dir(out: str | os.PathLike | None, default_parent: str | os.PathLike, *,
                       overwrite: bool = False, now: datetime | None = None) -> Path:
    """The folder to write into, created; see the module docstring for the rules."""
    if out is None:
        stamp = f"{(now or datetime.now()):%Y%m%d-%H%M%S}"
        parent = Path(default_parent)
        folder, counter = parent / stamp, 1
        while folder.exists():
            counter += 1
            folder = parent / f"{stamp}-{counter}"
        folder.mkdir(parents=True)
        return folder
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder; choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"output folder {folder} already holds files ({_listing(folder)}); pass --overwrite to "
                        "write into it anyway, or choose another --out (without --out a new time-stamped "
                        "folder is made)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
