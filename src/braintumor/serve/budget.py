"""A weighted semaphore over decode memory: concurrent large uploads queue instead of multiplying memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_DECODE_BUDGET_BYTES = 1 * 2**30
_TRIM_ABOVE_BYTES = 64 * 2**20


def _malloc_trim() -> None:
    """Hand freed heap pages back to the system (glibc); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class DecodeBudget:
    """At most ``capacity`` bytes of estimated decode memory in flight; larger single items take it all.

    Waiters are served first come, first served, so one large item is not starved by a stream of small ones.
    """

    def __init__(self, capacity: int = DEFAULT_DECODE_BUDGET_BYTES):
        if capacity < 1:
            raise ValueError("the decode budget must be at least 1 byte")
        self.capacity = int(capacity)
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._queue: list[object] = []

    @contextmanager
    def hold(self, weight: int) -> Iterator[None]:
        weight = max(0, min(int(weight), self.capacity))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self.in_use + weight > self.capacity:
                self._cond.wait()
            self._queue.pop(0)
            self.in_use += weight
            self.peak = max(self.peak, self.in_use)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= weight
                self._cond.notify_all()
            if weight >= _TRIM_ABOVE_BYTES:
                _malloc_trim()
