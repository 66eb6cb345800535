"""Locks: a folder's one owner across processes (an OS file lock), and a readers-writer lock between threads
(many plain forward passes at once, or one Grad-CAM, which hooks the shared model)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from braintumor.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; folders go unlocked there
    fcntl = None

LOCK_NAME = ".lock"


@contextmanager
def exclusive_folder(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Own ``folder`` (created if needed) while the block runs: an exclusive ``flock`` on ``folder/.lock``, which
    holds the owner's PID. A second owner gets a one-line UserError naming that PID instead of waiting. The OS
    drops the lock when the owner exits, however it ends (even by SIGKILL), so a stale lock file is harmless.

    The owner removes the lock file before it lets go (a finished or failed command leaves no ``.lock`` behind).
    Whoever locked a file that was removed meanwhile (it opened the old file just before the removal) finds that
    the path no longer names its file and tries again, so there is never more than one owner."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield folder
        return
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"{folder} is in use by another {what} ({holder}); wait for it to end, or "
                            "choose another --out") from None
        if _names(path, fd):
            break
        os.close(fd)  # locked a file its owner had just removed: lock the one the path names now
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        try:
            os.unlink(path)  # while still holding the lock (see the docstring)
        except FileNotFoundError:  # the block removed the folder (a failed run that wrote nothing)
            pass
        os.close(fd)  # releases the lock


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> str:
    """'PID n' of the lock's holder (which writes it just after locking: retried briefly), else 'PID unknown'."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"PID {text}"
        time.sleep(0.05)
    return "PID unknown"


class ReadWriteLock:
    """Many readers or one writer; waiting writers go first, so a stream of readers cannot starve them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
