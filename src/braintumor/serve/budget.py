"""One process-wide memory budget for the server: upload bytes in flight and decode work, across all requests.

Every request's upload bytes are counted as they stream in, and every decode reserves its estimated peak
memory before it starts, in the same budget. When the budget is full a request is refused with 503 and a
Retry-After header instead of multiplying memory. Items larger than a "small" threshold share at most
``large_share`` of the budget: the rest stays free for ordinary slices, so a flood of large uploads or bombs can
delay and refuse each other but never refuses an ordinary slice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_BUDGET_BYTES = 1 * 2**30
DEFAULT_DECODE_BUDGET_BYTES = DEFAULT_BUDGET_BYTES  # the name older callers use
SMALL_ITEM_BYTES = 32 * 2**20  # an upload or decode above this is "large" and uses the large share only
LARGE_SHARE = 0.75
RETRY_AFTER_SECONDS = 2
_TRIM_ABOVE_BYTES = 64 * 2**20


def malloc_trim() -> None:
    """Hand freed heap pages back to the system (glibc); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations above ``mmap_threshold`` with mmap, so that freeing them returns the memory (glibc; a
    no-op elsewhere). A fixed threshold also stops glibc from raising it after a large block is freed, after
    which uploads of the same size would come from the heap, where freed memory stays resident."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    except (OSError, AttributeError):
        return False


class BudgetFull(Exception):
    """The memory budget cannot take this item now (``too_large``: nor ever, it exceeds the whole share)."""

    def __init__(self, needed: int, available: int, too_large: bool = False):
        super().__init__(f"needs {needed} bytes, {available} free")
        self.needed, self.available, self.too_large = needed, available, too_large


class MemoryBudget:
    """At most ``capacity`` bytes held at once; large items (over ``small_item`` bytes) at most
    ``large_share * capacity`` of it. Thread-safe; waiters of each size class are served first come, first served.
    """

    def __init__(self, capacity: int = DEFAULT_BUDGET_BYTES, *, large_share: float = LARGE_SHARE,
                 small_item: int = SMALL_ITEM_BYTES):
        if capacity < 1:
            raise ValueError("the memory budget must be at least 1 byte")
        if not 0.0 < large_share <= 1.0:
            raise ValueError("large_share must be in (0, 1]")
        self.capacity = int(capacity)
        self.large_capacity = max(1, int(capacity * large_share))
        self.small_item = int(small_item)
        self.in_use = 0
        self.in_use_large = 0
        self.peak = 0
        self.refused = 0
        self._cond = threading.Condition()
        self._queues: dict[bool, list[object]] = {False: [], True: []}

    def is_large(self, size: int) -> bool:
        return size > self.small_item

    def limit_for(self, size: int) -> int:
        """The most a single item of this size class may ever hold."""
        return self.large_capacity if self.is_large(size) else self.capacity

    def _fits(self, size: int, large: bool) -> bool:
        if self.in_use + size > self.capacity:
            return False
        return not large or self.in_use_large + size <= self.large_capacity

    def _add(self, size: int, large: bool) -> None:
        self.in_use += size
        if large:
            self.in_use_large += size
        self.peak = max(self.peak, self.in_use)

    def acquire(self, size: int, *, large: bool | None = None, timeout: float | None = 0.0) -> None:
        """Take ``size`` bytes, waiting at most ``timeout`` seconds (None: for ever); BudgetFull when it cannot."""
        size = max(0, int(size))
        large = self.is_large(size) if large is None else large
        limit = self.large_capacity if large else self.capacity
        if size > limit:
            with self._cond:
                self.refused += 1
            raise BudgetFull(size, limit, too_large=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = object()
        queue = self._queues[large]
        with self._cond:
            queue.append(ticket)
            try:
                while queue[0] is not ticket or not self._fits(size, large):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        self.refused += 1
                        raise BudgetFull(size, self.capacity - self.in_use)
                    self._cond.wait(remaining)
                self._add(size, large)
            finally:
                queue.remove(ticket)
                self._cond.notify_all()

    def release(self, size: int, *, large: bool) -> None:
        with self._cond:
            self.in_use -= size
            if large:
                self.in_use_large -= size
            self._cond.notify_all()
        if size >= _TRIM_ABOVE_BYTES:
            malloc_trim()

    @contextmanager
    def hold(self, size: int, *, timeout: float | None = 0.0) -> Iterator[None]:
        """Hold ``size`` bytes for the duration of the block (see :meth:`acquire`)."""
        size = max(0, int(size))
        large = self.is_large(size)
        self.acquire(size, large=large, timeout=timeout)
        try:
            yield
        finally:
            self.release(size, large=large)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"capacity_bytes": self.capacity, "in_use_bytes": self.in_use, "peak_bytes": self.peak,
                    "refused": self.refused}


class Reservation:
    """The bytes one request holds in a :class:`MemoryBudget` (its uploads as they stream in); grows without
    waiting (BudgetFull when the budget is full) and is given back all at once by :meth:`close`.

    A request becomes large once its total passes the budget's small-item size: its bytes then move to the
    large share.
    """

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.held = 0
        self.large = False

    def add(self, size: int) -> None:
        if size <= 0:
            return
        budget = self.budget
        if not self.large and budget.is_large(self.held + size):
            # Crossing into the large class: take the whole new total there, then drop the small holding.
            budget.acquire(self.held + size, large=True)
            budget.release(self.held, large=False)
            self.held, self.large = self.held + size, True
            return
        budget.acquire(size, large=self.large)
        self.held += size

    def give_back(self, size: int) -> None:
        size = min(max(0, int(size)), self.held)
        if size:
            self.budget.release(size, large=self.large)
            self.held -= size

    def close(self) -> None:
        large = self.large
        self.give_back(self.held)
        if large:
            malloc_trim()  # a large request's buffers are free now: hand them back

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecodeBudget(MemoryBudget):
    """The queueing form of earlier releases: :meth:`hold` waits for its turn, and an item larger than the
    budget takes all of it instead of being refused."""

    @contextmanager
    def hold(self, size: int, *, timeout: float | None = None) -> Iterator[None]:
        with super().hold(min(max(0, int(size)), self.limit_for(size)), timeout=timeout):
            yield
