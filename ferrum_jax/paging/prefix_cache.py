"""`PrefixCache`: reuse of the KV pages of full, page-aligned token prefixes across sequences.

Contract with the executor: a page handed out by `lookup` (or inserted) is shared and is
never written again. Only FULL pages are cached, and a page's KV depends only on the tokens up
to its end, so a sequence that reuses a prefix writes its next tokens into fresh pages of its
own: the partial last page is always private, and no copy-on-write is needed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from ferrum_jax.errors import FerrumError
from ferrum_jax.paging.allocator import PageAllocator, _as_int

_DIGEST_BYTES = 16


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """`tokens` as a 1-D little-endian int64 array: the byte form keys and comparisons use."""
    array = np.asarray(tokens)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise FerrumError.invalid_parameter(
            f"tokens must be a 1-D sequence of integers, got shape {array.shape} of {array.dtype}"
        )
    return array.astype("<i8", copy=False)


def page_hashes(tokens: Sequence[int] | np.ndarray, page_size: int) -> list[bytes]:
    """One key per FULL page: blake2b of the previous key + the page's int64 LE token bytes.

    Chaining makes a key name the whole prefix up to its page's end, and the fixed byte form
    makes keys equal across processes and runs (Python's `hash` is salted per process).
    """
    page_size = _as_int(page_size, "page_size", 1)
    data = _token_bytes(tokens)
    keys = []
    previous = b""
    for start in range(0, len(data) - page_size + 1, page_size):
        previous = hashlib.blake2b(
            previous + data[start : start + page_size].tobytes(), digest_size=_DIGEST_BYTES
        ).digest()
        keys.append(previous)
    return keys


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One cached page: what it holds, so a hash collision is caught instead of served."""

    parent: bytes | None
    """Key of the page before it in the prefix, None for a first page."""
    tokens: bytes
    """The page's own tokens, int64 little-endian."""
    page: int


def _holds(entry: _Entry, parent: bytes | None, tokens: bytes) -> bool:
    """Whether `entry` is exactly this page after this parent: the check that defeats collisions.

    By induction from the first page, a verified parent key names this exact prefix, so parent
    and page tokens together pin the whole prefix, whatever the hash did.
    """
    return entry.parent == parent and entry.tokens == tokens


class PrefixCache:
    """Full-page prefix cache over a `PageAllocator`; evicts LRU pages only under pressure.

    The cache holds one reference on every cached page, so a page outlives the sequence that
    computed it and is evictable exactly when that reference is the only one (refcount 1).
    Entries are kept in an LRU order in which every page comes before its ancestors (a use
    touches a whole chain, deepest page first), so evicting oldest-first frees a chain's tail
    before its head and a single pass finds every evictable page.
    """

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        if not isinstance(allocator, PageAllocator):
            raise FerrumError.invalid_parameter(
                f"allocator must be a PageAllocator, got {type(allocator).__name__}"
            )
        self._allocator = allocator
        self._page_size = _as_int(page_size, "page_size", 1)
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._children: dict[bytes, int] = {}
        self._key_of_page: dict[int, bytes] = {}
        self._hits = 0
        self._misses = 0
        self._tokens_reused = 0
        self._pages_evicted = 0
        self._lookups = 0
        self._inserts = 0
        allocator.set_reclaimer(self.evict, self.reclaimable)

    @property
    def page_size(self) -> int:
        return self._page_size

    def cached_pages(self) -> frozenset[int]:
        """The pages the cache holds a reference on."""
        return frozenset(self._key_of_page)

    def lookup(
        self, tokens: Sequence[int] | np.ndarray, max_pages: int | None = None, held: int = 0
    ) -> list[int]:
        """Pages of the longest cached full-page prefix of `tokens`, each retained for the caller.

        Pass `max_pages=(len(tokens) - 1) // page_size` to keep at least one token to compute
        (its logits are needed to sample). The caller must `release` the returned pages.
        `held`: the caller already holds the first `held` pages of this prefix (a chunked
        prompt continuing): only pages past them are retained, returned and counted.
        """
        limit = None if max_pages is None else _as_int(max_pages, "max_pages", 0)
        held = _as_int(held, "held", 0)
        data = _token_bytes(tokens)
        keys = page_hashes(
            data if limit is None else data[: limit * self._page_size], self._page_size
        )
        chain: list[bytes] = []
        for j, key in enumerate(keys):
            known = self._entries.get(key)
            if known is None or not _holds(
                known, chain[-1] if chain else None, self._page_tokens(data, j)
            ):
                break
            chain.append(key)
        pages = [self._entries[key].page for key in chain][held:]
        self._allocator.retain(pages)
        self._touch(chain)
        self._lookups += 1
        if pages:
            self._hits += 1
            self._tokens_reused += len(pages) * self._page_size
        else:
            self._misses += 1
        return pages

    def insert(self, tokens: Sequence[int] | np.ndarray, pages: Sequence[int]) -> None:
        """Caches the full pages of a computed sequence; `pages[j]` holds page j of `tokens`.

        A prefix already cached keeps its canonical page (the caller's copy stays the caller's).
        Insertion stops at a key held by a different prefix (a hash collision), since pages
        after it could not be told apart from that prefix's descendants.
        """
        data = _token_bytes(tokens)
        keys = page_hashes(data, self._page_size)
        if len(pages) < len(keys):
            raise FerrumError.invalid_parameter(
                f"{len(data)} tokens fill {len(keys)} pages of {self._page_size}, "
                f"got {len(pages)} page ids"
            )
        chain: list[bytes] = []
        new: dict[bytes, _Entry] = {}
        for j, key in enumerate(keys):
            parent = chain[-1] if chain else None
            page_tokens = self._page_tokens(data, j)
            known = self._entries.get(key, new.get(key))
            if known is None:
                new[key] = _Entry(parent, page_tokens, _as_int(pages[j], "page", 0))
            elif not _holds(known, parent, page_tokens):
                break
            chain.append(key)
        new_pages = [entry.page for entry in new.values()]
        if len(set(new_pages)) != len(new_pages) or self._key_of_page.keys() & set(new_pages):
            raise FerrumError.invalid_parameter(
                f"inserting pages {new_pages} would cache a page twice (already cached: "
                f"{sorted(self._key_of_page.keys() & set(new_pages))})"
            )
        self._allocator.retain(new_pages)
        for key, entry in new.items():
            self._entries[key] = entry
            self._children[key] = 0
            self._key_of_page[entry.page] = key
            if entry.parent is not None:
                self._children[entry.parent] += 1
        self._touch(chain)
        self._inserts += len(new)

    def reclaimable(self) -> int:
        """How many pages `evict` could free now: those whose whole subtree only the cache holds."""
        blocked: set[bytes] = set()
        count = 0
        for key, entry in self._entries.items():
            if key in blocked or self._allocator.refcount(entry.page) > 1:
                if entry.parent is not None:
                    blocked.add(entry.parent)
            else:
                count += 1
        return count

    def evict(self, n: int) -> int:
        """Frees up to `n` pages only the cache holds, least recently used and tail first."""
        n = _as_int(n, "n", 0)
        victims: list[bytes] = []
        evicted_children: collections.Counter[bytes] = collections.Counter()
        for key, entry in self._entries.items():
            if len(victims) == n:
                break
            leaf = self._children[key] == evicted_children[key]
            if leaf and self._allocator.refcount(entry.page) == 1:
                victims.append(key)
                if entry.parent is not None:
                    evicted_children[entry.parent] += 1
        self._drop(victims)
        return len(victims)

    def clear(self) -> None:
        """Drops every cached page (e.g. when the weights change); sequences keep their own."""
        self._drop(list(self._entries))

    def metrics(self) -> dict[str, int]:
        """Counters; `pages_evicted` includes `clear`, so pages_cached == inserts - evicted."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "tokens_reused": self._tokens_reused,
            "pages_cached": len(self._entries),
            "pages_evicted": self._pages_evicted,
            "lookups": self._lookups,
            "inserts": self._inserts,
        }

    def check(self) -> None:
        """Raises `internal` unless parents, child counts, page map and LRU order agree."""
        problems = []
        seen: set[bytes] = set()
        children: collections.Counter[bytes] = collections.Counter()
        for key, entry in self._entries.items():
            if entry.parent is not None:
                children[entry.parent] += 1
                if entry.parent not in self._entries:
                    problems.append(f"cached page {entry.page} has no cached parent")
                elif entry.parent in seen:
                    problems.append(f"page {entry.page} is not before its parent in LRU order")
            if self._key_of_page.get(entry.page) != key:
                problems.append(f"page {entry.page} is missing from the page map")
            if self._allocator.refcount(entry.page) < 1:
                problems.append(f"cached page {entry.page} is free")
            seen.add(key)
        if any(self._children[key] != children[key] for key in self._entries):
            problems.append("child counts disagree with the entries")
        if len(self._key_of_page) != len(self._entries) or self._children.keys() != seen:
            problems.append(
                f"{len(self._key_of_page)} mapped pages, {len(self._children)} child counts, "
                f"{len(self._entries)} entries"
            )
        if problems:
            raise FerrumError.internal("prefix cache corrupt: " + "; ".join(problems))

    def _page_tokens(self, data: np.ndarray, j: int) -> bytes:
        return data[j * self._page_size : (j + 1) * self._page_size].tobytes()

    def _touch(self, chain: list[bytes]) -> None:
        """Marks a root-first chain most recently used, deepest first, so parents stay after."""
        for key in reversed(chain):
            self._entries.move_to_end(key)

    def _drop(self, keys: list[bytes]) -> None:
        """Removes entries (children before parents) and releases the cache's references."""
        pages = []
        for key in keys:
            entry = self._entries.pop(key)
            del self._children[key]
            del self._key_of_page[entry.page]
            if entry.parent is not None:
                self._children[entry.parent] -= 1
            pages.append(entry.page)
        self._allocator.release(pages)
        self._pages_evicted += len(pages)
