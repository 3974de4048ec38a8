"""`PageAllocator`: a free list plus reference counts over the pages of a paged KV pool.

Pages are shared (a cached prefix, a forked sequence), so a page is freed only when its last
holder releases it. Every call validates its whole argument before changing anything, so a
failed call leaves the pool exactly as it was: the scheduler can catch the error and retry
later without having to repair the bookkeeping.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Iterable

from ferrum_jax.errors import FerrumError


def _no_reclaim(n: int) -> int:
    """The reclaimer of an allocator nobody caches pages for: it frees nothing."""
    return 0


def _nothing_reclaimable() -> int:
    return 0


def _as_int(value: object, name: str, minimum: int) -> int:
    """`value` as an int >= `minimum`; numpy integers pass, bools and floats do not."""
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise FerrumError.invalid_parameter(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or n < minimum:
        raise FerrumError.invalid_parameter(
            f"{name} must be an integer >= {minimum}, got {value!r}"
        )
    return n


class PageAllocator:
    """Hands out page ids in `[0, num_pages)` with reference counts; O(pages touched) per call.

    The free list is FIFO and starts in id order, so every replica that makes the same calls
    gets the same pages (multi-host runs must agree on page tables without talking).
    """

    def __init__(self, num_pages: int) -> None:
        self._num_pages = _as_int(num_pages, "num_pages", 1)
        self._free: collections.deque[int] = collections.deque(range(self._num_pages))
        self._refs = [0] * self._num_pages
        self._reclaim: Callable[[int], int] = _no_reclaim
        self._reclaimable: Callable[[], int] = _nothing_reclaimable

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        """References held on `page`; 0 means it is free."""
        return self._refs[self._page_ids([page])[0]]

    def set_reclaimer(self, reclaim: Callable[[int], int], reclaimable: Callable[[], int]) -> None:
        """Installs the hook `allocate` calls for room: `reclaim(n)` releases up to n pages."""
        if self._reclaim is not _no_reclaim:
            raise FerrumError.invalid_parameter("this allocator already has a reclaimer")
        self._reclaim = reclaim
        self._reclaimable = reclaimable

    def can_allocate(self, n: int) -> bool:
        """Whether `allocate(n)` would succeed, counting pages the reclaimer could free."""
        n = _as_int(n, "n", 0)
        # Counting what is reclaimable scans the cache: only ask when the free list is short.
        return n <= len(self._free) or n <= len(self._free) + self._reclaimable()

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages with one reference each, or `resource_exhausted` and no change."""
        n = _as_int(n, "n", 0)
        if n > len(self._free):
            self._make_room(n)
        pages = [self._free.popleft() for _ in range(n)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def retain(self, pages: Iterable[int]) -> None:
        """Adds one reference to each page (a page listed twice gets two); all must be in use."""
        ids = self._page_ids(pages)
        for page in ids:
            if self._refs[page] == 0:
                raise FerrumError.invalid_parameter(f"cannot retain page {page}: it is free")
        for page in ids:
            self._refs[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drops one reference per listing; a page left with none returns to the free list."""
        counts = collections.Counter(self._page_ids(pages))
        for page, count in counts.items():
            if self._refs[page] < count:
                raise FerrumError.invalid_parameter(
                    f"cannot release page {page} {count} time(s): it holds "
                    f"{self._refs[page]} reference(s)"
                )
        for page, count in counts.items():
            self._refs[page] -= count
            if self._refs[page] == 0:
                self._free.append(page)

    def check(self) -> None:
        """Raises `internal` unless free + used == total, free pages hold 0 refs, used >= 1."""
        free = set(self._free)
        used = sum(1 for refs in self._refs if refs > 0)
        problems = []
        if len(free) != len(self._free):
            problems.append(f"{len(self._free) - len(free)} duplicate(s) in the free list")
        if bad := sorted(page for page in free if self._refs[page] != 0):
            problems.append(f"free pages {bad} hold references")
        if bad := [p for p, refs in enumerate(self._refs) if p not in free and refs < 1]:
            problems.append(f"pages {bad} are neither free nor referenced")
        if len(free) + used != self._num_pages:
            problems.append(f"{len(free)} free + {used} used != {self._num_pages} pages")
        if problems:
            raise FerrumError.internal("page allocator corrupt: " + "; ".join(problems))

    def _make_room(self, n: int) -> None:
        """Reclaims the shortfall for `allocate(n)`, only when that is enough to succeed."""
        free = len(self._free)
        reclaimable = self._reclaimable()
        if n > free + reclaimable:
            raise FerrumError.resource_exhausted(
                f"asked for {n} KV pages, {free} free + {reclaimable} reclaimable "
                f"of {self._num_pages}"
            )
        freed = self._reclaim(n - free)
        if len(self._free) < n:
            raise FerrumError.internal(
                f"reclaimer reported {reclaimable} reclaimable pages but freed {freed}; "
                f"{len(self._free)} free, {n} needed"
            )

    def _page_ids(self, pages: Iterable[int]) -> list[int]:
        """Validated page ids; raises `invalid_parameter` on a non-integer or out-of-range id."""
        ids = []
        for page in pages:
            pid = _as_int(page, "page", 0)
            if pid >= self._num_pages:
                raise FerrumError.invalid_parameter(
                    f"page {pid} is out of range [0, {self._num_pages})"
                )
            ids.append(pid)
        return ids
