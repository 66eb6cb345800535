"""Atomic file writes: a crash or kill leaves the previous file or the complete new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it into place, fsync the folder.

    ``mode`` is "wb" (bytes) or "w" (UTF-8 text). The file gets the usual permissions (0666 minus the umask),
    not mkstemp's private 0600, so reports and checkpoints stay readable to the user's group as usual.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # name the file the caller asked for, not our temporary one
        raise OSError(err.errno, f"cannot write {path} ({err.strerror})") from err
    handle = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as raw:
            handle = _WriteErrors(raw, path)
            write(handle)
            handle.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        # torch.save, savefig, ... turn the OSError of a full disk into their own errors ("unexpected pos"):
        # report the write error itself, naming the file the caller asked for, not our temporary one.
        cause = err if isinstance(err, OSError) else getattr(handle, "error", None)
        if cause is not None and not isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise OSError(cause.errno, f"cannot write {path} ({cause.strerror or cause}); "
                                       "the previous file, if any, is unchanged") from err
        raise
    _fsync_dir(path.parent)
    return path


class _WriteErrors:
    """A file wrapper that remembers the first OSError its write/flush raised (writers may hide it)."""

    def __init__(self, file: IO, target: Path):
        self._file = file
        self.target = target  # the file being replaced (a seam for tests that simulate a full disk)
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        try:
            return self._file.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
