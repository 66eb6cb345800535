"""Output folders are never overwritten silently, and a failed command leaves nothing new behind.

``evaluate``, ``explain`` and ``audit`` write into ``--out DIR``. Without ``--out`` they create a fresh
``<command folder>/<YYYYmmdd-HHMMSS>`` (e.g. ``evaluation/20261130-141502``; ``-2``, ``-3``, ... when two runs
start in the same second). An ``--out`` folder that already holds files is refused unless ``--overwrite`` is
given; then files of the same name are replaced and other files are left as they are.

:func:`staged_output_dir` makes this all-or-nothing: the command writes into a hidden folder beside the target
(``.NAME.XXXX.partial``), which becomes the target by one rename when the command succeeds (or, with
``--overwrite`` into a folder that holds files, whose files each replace theirs by an atomic rename). A command
that fails leaves no folder, no partial file, and an overwritten folder as it was.

A single output file (an export, a calibrated checkpoint, a benchmark's ``--json`` or figure) that exists is
refused the same way unless ``--overwrite`` is given (:func:`refuse_overwrite`), and checked before the work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from braintumor.errors import UserError

PathOrNone = str | os.PathLike | None


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} entries)" if len(names) > limit else "")


def refuse_overwrite(path: str | os.PathLike, overwrite: bool, option: str = "--out") -> None:
    """A one-line UserError when the file ``path`` exists (a dangling link too) and ``overwrite`` was not asked
    for; ``option`` names the flag that gave the path, for the message."""
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise UserError(f"{path} already exists; pass --overwrite to replace it, or choose another {option}")


def refuse_overwrites(paths: Mapping[str, PathOrNone] | Iterable[tuple[str, PathOrNone]], overwrite: bool) -> None:
    """:func:`refuse_overwrite` for each ``{option: path}`` (or ``(option, path)`` pair) given (None: not asked
    for; "-": stdout), checked before a command starts its work, so that a long run never ends by refusing to
    write its result."""
    for option, path in (paths.items() if isinstance(paths, Mapping) else paths):
        if path is not None and str(path) != "-":
            refuse_overwrite(path, overwrite, option)


def prepare_output_dir(out: str | os.PathLike | None, default_parent: str | os.PathLike, *,
                       overwrite: bool = False, now: datetime | None = None) -> Path:
    """The folder to write into, created; see the module docstring for the rules."""
    folder = _target(out, default_parent, overwrite, now)
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=out is not None)
            return folder
        except FileExistsError:  # another run took the time-stamped name meanwhile
            folder = _free_name(folder)


class StagedFolder:
    """Where a command writes (``path``, the hidden staging folder) and where its files end up (``target``,
    final once the ``with`` block has ended)."""

    def __init__(self, path: Path, target: Path):
        self.path, self.target = path, target

    def final(self, written: str | os.PathLike) -> Path:
        """The path a file written under ``path`` has after the commit (other paths are returned as they are)."""
        written = Path(written)
        try:
            return self.target / written.relative_to(self.path)
        except ValueError:
            return written


def _target(out: str | os.PathLike | None, default_parent: str | os.PathLike, overwrite: bool,
            now: datetime | None, option: str = "--out") -> Path:
    """The folder a command's files are for, checked as :func:`prepare_output_dir` checks it; not created.
    ``option`` names the flag that gave ``out``, for the messages."""
    if out is None:
        stamp = f"{(now or datetime.now()):%Y%m%d-%H%M%S}"
        return _free_name(Path(default_parent) / stamp)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder; choose another {option}")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        default = f" (without {option} a new time-stamped folder is made)" if option == "--out" else ""
        raise UserError(f"output folder {folder} already holds files ({_listing(folder)}); pass --overwrite to "
                        f"write into it anyway, or choose another {option}{default}")
    return folder


def _free_name(folder: Path) -> Path:
    candidate, counter = folder, 1
    while candidate.exists():
        counter += 1
        candidate = folder.with_name(f"{folder.name}-{counter}")
    return candidate


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder``'s missing parents; returns them, deepest first (removed again on failure)."""
    missing = [parent for parent in folder.parents if not parent.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _commit(staging: Path, target: Path, stamped: bool) -> Path:
    """Move the staged files into ``target``: the folder itself by one rename when ``target`` is new or empty,
    else each file by an atomic rename over its namesake."""
    if stamped and target.exists():  # another run took the time-stamped name meanwhile
        target = _free_name(target)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staging, target)  # rename(2) replaces an empty folder
        return target
    for source in sorted(staging.rglob("*")):
        if source.is_dir():
            continue
        destination = target / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_output_dir(out: str | os.PathLike | None, default_parent: str | os.PathLike, *,
                      overwrite: bool = False, now: datetime | None = None,
                      option: str = "--out") -> Iterator[StagedFolder]:
    """Write a command's output folder all-or-nothing (see the module docstring); the folder rules are
    :func:`prepare_output_dir`'s and are checked before the block runs (``option``: the flag named in refusals)."""
    target = _target(out, default_parent, overwrite, now, option)
    created = _make_parents(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())  # the folder's usual permissions, not mkdtemp's private 0700
    except OSError as err:
        _remove_empty(created)
        raise OSError(err.errno, f"cannot create output folder {target} ({err.strerror})") from err
    folder = StagedFolder(staging, target)
    try:
        yield folder
        folder.target = _commit(staging, target, stamped=out is None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break
