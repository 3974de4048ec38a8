"""Page allocator and prefix cache: refcount bookkeeping, all-or-nothing failures, LRU eviction."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random

import numpy as np
import pytest

from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.paging import PageAllocator, PrefixCache, page_hashes, prefix_cache


def make(num_pages: int = 8, page_size: int = 2) -> tuple[PageAllocator, PrefixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, PrefixCache(alloc, page_size)


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def snapshot(alloc: PageAllocator, cache: PrefixCache | None = None) -> tuple:
    """Everything a failed call must leave as it was."""
    refs = tuple(alloc.refcount(p) for p in range(alloc.num_pages))
    state = (refs, alloc.num_free, alloc.num_used)
    if cache is None:
        return state
    return (*state, cache.cached_pages(), cache.metrics())


def assert_error(excinfo, kind: ErrorKind) -> None:
    assert excinfo.value.kind is kind, excinfo.value


# --- PageAllocator -------------------------------------------------------------------------


def test_allocate_gives_lowest_ids_first_with_one_reference():
    alloc = PageAllocator(4)
    assert alloc.allocate(3) == [0, 1, 2]
    assert [alloc.refcount(p) for p in range(4)] == [1, 1, 1, 0]
    assert (alloc.num_pages, alloc.num_free, alloc.num_used) == (4, 1, 3)
    assert alloc.allocate(0) == []
    alloc.check()


def test_released_pages_return_to_the_free_list_in_order():
    alloc = PageAllocator(4)
    alloc.allocate(2)
    alloc.release([1])
    alloc.check()
    assert alloc.refcount(1) == 0
    assert alloc.allocate(3) == [2, 3, 1]
    alloc.check()
    assert alloc.num_free == 0


def test_retained_page_lives_until_its_last_release():
    alloc = PageAllocator(2)
    (page,) = alloc.allocate(1)
    alloc.retain([page, page])
    assert alloc.refcount(page) == 3
    alloc.release([page, page])
    alloc.check()
    assert alloc.refcount(page) == 1
    assert alloc.num_used == 1
    alloc.release([page])
    alloc.check()
    assert (alloc.refcount(page), alloc.num_free) == (0, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_constructor_rejects_a_bad_page_count(bad):
    with pytest.raises(FerrumError) as e:
        PageAllocator(bad)
    assert_error(e, ErrorKind.INVALID_PARAMETER)


def test_numpy_integers_are_page_ids():
    alloc = PageAllocator(np.int64(3))
    pages = alloc.allocate(np.int32(2))
    alloc.retain(np.asarray(pages))
    alloc.release(np.asarray(pages))
    assert [alloc.refcount(p) for p in pages] == [1, 1]


def test_allocate_is_all_or_nothing():
    alloc = PageAllocator(4)
    alloc.allocate(3)
    before = snapshot(alloc)
    with pytest.raises(
        FerrumError, match=r"asked for 2 KV pages, 1 free \+ 0 reclaimable of 4"
    ) as e:
        alloc.allocate(2)
    assert_error(e, ErrorKind.RESOURCE_EXHAUSTED)
    assert e.value.is_retryable()
    assert snapshot(alloc) == before
    assert alloc.can_allocate(1)
    assert not alloc.can_allocate(2)
    alloc.check()


@pytest.mark.parametrize("bad", [[0, 0], [0, 1, 1], [2], [1, 2]])
def test_over_release_is_rejected_without_change(bad):
    alloc = PageAllocator(4)
    alloc.allocate(2)
    before = snapshot(alloc)
    with pytest.raises(FerrumError, match=r"cannot release page \d \d time\(s\): it holds") as e:
        alloc.release(bad)
    assert_error(e, ErrorKind.INVALID_PARAMETER)
    assert snapshot(alloc) == before
    alloc.check()


@pytest.mark.parametrize(
    ("method", "pages", "match"),
    [
        ("retain", [0, 4], r"page 4 is out of range \[0, 4\)"),
        ("retain", [-1], "page must be an integer >= 0"),
        ("retain", [0, 3], "cannot retain page 3: it is free"),
        ("release", [0, 4], r"page 4 is out of range \[0, 4\)"),
        ("release", ["0"], "page must be an integer"),
        ("refcount", 7, r"page 7 is out of range \[0, 4\)"),
    ],
)
def test_unknown_pages_are_rejected_without_change(method, pages, match):
    alloc = PageAllocator(4)
    alloc.allocate(2)
    before = snapshot(alloc)
    with pytest.raises(FerrumError, match=match) as e:
        getattr(alloc, method)(pages)
    assert_error(e, ErrorKind.INVALID_PARAMETER)
    assert snapshot(alloc) == before


def test_check_reports_corruption():
    alloc = PageAllocator(3)
    alloc.allocate(1)
    alloc._refs[2] = 1  # a free page that claims a reference
    with pytest.raises(FerrumError, match=r"free pages \[2\] hold references") as e:
        alloc.check()
    assert_error(e, ErrorKind.INTERNAL)


def test_one_reclaimer_per_allocator():
    alloc, _ = make()
    with pytest.raises(FerrumError, match="already has a reclaimer"):
        PrefixCache(alloc, 2)


def test_reclaimer_that_frees_less_than_it_promised_is_an_internal_error():
    alloc = PageAllocator(2)
    alloc.allocate(2)
    alloc.set_reclaimer(lambda n: 0, lambda: 1)
    assert alloc.can_allocate(1)
    with pytest.raises(FerrumError, match="reported 1 reclaimable pages but freed 0") as e:
        alloc.allocate(1)
    assert_error(e, ErrorKind.INTERNAL)


# --- page_hashes ---------------------------------------------------------------------------


def test_page_hashes_chain_over_full_pages_only():
    keys = page_hashes([1, 2, 3, 4, 5], 2)
    first = hashlib.blake2b(np.array([1, 2], "<i8").tobytes(), digest_size=16).digest()
    second = hashlib.blake2b(first + np.array([3, 4], "<i8").tobytes(), digest_size=16).digest()
    assert keys == [first, second]
    assert page_hashes(np.array([1, 2, 3, 4], np.int32), 2) == keys
    assert page_hashes([1], 2) == []
    head_changed = page_hashes([9, 2, 3, 4], 2)
    assert head_changed[0] != keys[0] and head_changed[1] != keys[1]
    tail_changed = page_hashes([1, 2, 9, 4], 2)
    assert tail_changed[0] == keys[0] and tail_changed[1] != keys[1]


@pytest.mark.parametrize("tokens", [[1.5, 2.0], [[1, 2]], ["a"]])
def test_page_hashes_rejects_non_integer_tokens(tokens):
    with pytest.raises(FerrumError, match="1-D sequence of integers"):
        page_hashes(tokens, 2)


# --- PrefixCache: lookup and insert --------------------------------------------------------


def test_lookup_returns_the_longest_full_page_prefix():
    alloc, cache = make(16, 2)
    tokens = toks(7)  # three full pages and a partial one
    pages = alloc.allocate(4)
    cache.insert(tokens, pages)
    cache.check()
    assert cache.cached_pages() == set(pages[:3])
    assert cache.lookup(tokens) == pages[:3]
    assert [alloc.refcount(p) for p in pages] == [3, 3, 3, 1]  # sequence + cache + lookup
    assert cache.lookup([0, 1, 2, 3, 99, 5, 6, 7]) == pages[:2]
    assert cache.lookup(toks(5)) == pages[:2]
    assert cache.lookup(tokens, max_pages=1) == pages[:1]
    assert cache.lookup(tokens, max_pages=0) == []
    assert cache.lookup([5, 5, 5, 5]) == []
    assert cache.lookup([0]) == []
    alloc.release(pages[:3] + pages[:2] + pages[:2] + pages[:1])
    assert [alloc.refcount(p) for p in pages] == [2, 2, 2, 1]
    alloc.check()
    cache.check()


def test_partial_last_page_is_never_shared():
    alloc, cache = make(8, 4)
    pages = alloc.allocate(2)
    cache.insert(toks(7), pages)
    assert cache.cached_pages() == {pages[0]}
    assert cache.lookup(toks(8)) == [pages[0]]
    alloc.check()
    cache.check()


def test_hash_collision_cannot_return_wrong_pages(monkeypatch):
    monkeypatch.setattr(
        prefix_cache, "page_hashes", lambda tokens, page_size: [b"k"] * (len(tokens) // page_size)
    )
    alloc, cache = make(8, 2)
    a = alloc.allocate(2)
    cache.insert([1, 2, 3, 4], a)
    # Page 1's key collides with page 0's: insertion stops there rather than chain off it.
    assert cache.cached_pages() == {a[0]}
    assert cache.lookup([5, 6, 7, 8]) == []  # same key, other tokens
    assert cache.lookup([1, 2, 1, 2]) == [a[0]]  # same key and tokens, but another parent
    b = alloc.allocate(2)
    cache.insert([5, 6, 7, 8], b)
    assert cache.cached_pages() == {a[0]}
    assert cache.lookup([1, 2, 3, 4]) == [a[0]]
    assert cache.metrics()["hits"] == 2
    alloc.check()
    cache.check()


def test_insert_of_a_cached_prefix_keeps_the_canonical_page():
    alloc, cache = make(16, 2)
    a = alloc.allocate(2)
    cache.insert(toks(4), a)
    b = alloc.allocate(3)  # computed the same two pages privately, then one more
    cache.insert(toks(6), b)
    cache.check()
    assert cache.cached_pages() == {a[0], a[1], b[2]}
    assert [alloc.refcount(p) for p in b] == [1, 1, 2]
    assert [alloc.refcount(p) for p in a] == [2, 2]
    assert cache.metrics()["inserts"] == 3
    alloc.release(b)
    assert alloc.refcount(b[0]) == 0
    assert cache.lookup(toks(6)) == [a[0], a[1], b[2]]
    cache.insert(toks(6), [a[0], a[1], b[2]])  # re-inserting what lookup gave changes nothing
    assert cache.metrics()["inserts"] == 3
    assert [alloc.refcount(p) for p in (a[0], a[1], b[2])] == [3, 3, 2]
    alloc.check()


@pytest.mark.parametrize(
    ("tokens", "pages", "match"),
    [
        (toks(6), [0, 1], "6 tokens fill 3 pages of 2, got 2 page ids"),
        (toks(4, start=50), [2, 5], "cannot retain page 5: it is free"),
        (toks(4, start=50), [1, 0], r"would cache a page twice \(already cached: \[0, 1\]\)"),
        (toks(4, start=50), [2, 2], "would cache a page twice"),
        (toks(2, start=50), [1.0], "page must be an integer"),
    ],
)
def test_insert_rejects_bad_pages_without_change(tokens, pages, match):
    alloc, cache = make(8, 2)
    cache.insert(toks(4), alloc.allocate(2))
    alloc.allocate(1)
    before = snapshot(alloc, cache)
    with pytest.raises(FerrumError, match=match) as e:
        cache.insert(tokens, pages)
    assert_error(e, ErrorKind.INVALID_PARAMETER)
    assert snapshot(alloc, cache) == before
    cache.check()


# --- PrefixCache: eviction -----------------------------------------------------------------


def cache_and_drop(alloc: PageAllocator, cache: PrefixCache, tokens: list[int]) -> list[int]:
    """A finished sequence: its full pages stay cached, its own references are gone."""
    pages = alloc.allocate(-(-len(tokens) // cache.page_size))
    cache.insert(tokens, pages)
    alloc.release(pages)
    return pages


def test_eviction_happens_only_under_pressure_lru_and_tail_first():
    alloc, cache = make(6, 2)
    a = cache_and_drop(alloc, cache, toks(6))
    b = cache_and_drop(alloc, cache, toks(4, start=100))
    assert (alloc.num_free, cache.reclaimable()) == (1, 5)
    alloc.release(cache.lookup(toks(6)))  # chain a is now the most recently used
    alloc.allocate(1)  # fits in the free list: nothing evicted
    assert cache.metrics()["pages_evicted"] == 0
    assert alloc.allocate(1) == [b[1]]  # b's tail goes first
    assert cache.cached_pages() == {*a, b[0]}
    assert alloc.allocate(2) == [b[0], a[2]]  # then b's head, then a's tail
    assert cache.metrics()["pages_evicted"] == 3
    assert cache.lookup(toks(6)) == a[:2]
    alloc.check()
    cache.check()


def test_eviction_never_takes_referenced_pages():
    alloc, cache = make(4, 2)
    a = cache_and_drop(alloc, cache, toks(6))
    held = cache.lookup(toks(4))
    assert cache.reclaimable() == 1
    before = snapshot(alloc, cache)
    with pytest.raises(FerrumError, match=r"asked for 3 KV pages, 1 free \+ 1 reclaimable of 4"):
        alloc.allocate(3)
    assert snapshot(alloc, cache) == before  # no eviction when it could not be enough
    assert cache.evict(10) == 1
    assert cache.cached_pages() == set(held)
    assert cache.evict(10) == 0
    alloc.release(held)
    assert cache.reclaimable() == 2
    assert cache.evict(1) == 1
    assert cache.lookup(toks(6)) == [a[0]]
    alloc.check()
    cache.check()


def test_a_referenced_middle_page_pins_its_ancestors_not_its_descendants():
    alloc, cache = make(4, 2)
    a = cache_and_drop(alloc, cache, toks(6))
    alloc.retain([a[1]])
    assert cache.reclaimable() == 1
    assert cache.evict(3) == 1
    assert cache.cached_pages() == {a[0], a[1]}
    alloc.check()
    cache.check()


def test_can_allocate_counts_reclaimable_pages():
    alloc, cache = make(4, 2)
    cache_and_drop(alloc, cache, toks(8))
    assert alloc.num_free == 0
    assert alloc.can_allocate(4)
    assert not alloc.can_allocate(5)
    assert len(alloc.allocate(4)) == 4
    assert cache.metrics()["pages_cached"] == 0
    alloc.check()
    cache.check()


# --- PrefixCache: metrics and clear --------------------------------------------------------


def test_metrics_add_up():
    alloc, cache = make(8, 2)
    assert cache.metrics() == dict.fromkeys(
        ["hits", "misses", "tokens_reused", "pages_cached", "pages_evicted", "lookups", "inserts"],
        0,
    )
    assert cache.lookup(toks(5)) == []
    cache_and_drop(alloc, cache, toks(5))
    alloc.release(cache.lookup(toks(5)))
    alloc.release(cache.lookup(toks(3)))
    cache.evict(1)
    assert cache.metrics() == {
        "hits": 2,
        "misses": 1,
        "tokens_reused": 6,
        "pages_cached": 1,
        "pages_evicted": 1,
        "lookups": 3,
        "inserts": 2,
    }


def test_clear_drops_only_the_cache_references():
    alloc, cache = make(8, 2)
    live = alloc.allocate(3)
    cache.insert(toks(6), live)
    done = cache_and_drop(alloc, cache, toks(4, start=50))
    cache.clear()
    alloc.check()
    cache.check()
    assert cache.cached_pages() == frozenset()
    assert [alloc.refcount(p) for p in live] == [1, 1, 1]
    assert [alloc.refcount(p) for p in done] == [0, 0]
    assert cache.lookup(toks(6)) == []
    assert cache.metrics()["pages_evicted"] == 5
    cache.insert(toks(6), live)
    assert cache.lookup(toks(6)) == live


# --- Randomized soak -----------------------------------------------------------------------


@dataclasses.dataclass
class _Seq:
    """A modelled sequence: it holds one reference on each of its pages."""

    tokens: list[int]
    pages: list[int]


def test_randomized_soak_keeps_refcounts_exact():
    rng = random.Random(0)
    num_pages, ps = 28, 4
    alloc, cache = make(num_pages, ps)
    prompts = [[rng.randrange(4) for _ in range(rng.randrange(8, 25))] for _ in range(4)]
    seqs: list[_Seq] = []
    # What each full page's KV was computed from: the whole prefix up to its end.
    content: dict[int, tuple[int, ...]] = {}
    stats = collections.Counter()

    def verify() -> None:
        alloc.check()
        cache.check()
        cached = cache.cached_pages()
        held = collections.Counter(p for s in seqs for p in s.pages)
        for p in range(num_pages):
            assert alloc.refcount(p) == held[p] + (p in cached), p
        assert alloc.num_free + alloc.num_used == num_pages
        assert alloc.num_used == len(set(held) | cached)
        m = cache.metrics()
        assert m["hits"] + m["misses"] == m["lookups"]
        assert m["pages_cached"] == len(cached) == m["inserts"] - m["pages_evicted"]

    def check_reused(tokens: list[int], pages: list[int]) -> None:
        for j, page in enumerate(pages):
            assert content[page] == tuple(tokens[: (j + 1) * ps])

    def write(seq: _Seq, start: int) -> None:
        """Computes KV for tokens[start:]; only a private page may be written."""
        for i in range(start, len(seq.tokens)):
            page = seq.pages[i // ps]
            assert alloc.refcount(page) == 1 and page not in cache.cached_pages()
            if i % ps == ps - 1:
                content[page] = tuple(seq.tokens[: i + 1])

    def start() -> None:
        base = rng.choice(prompts)
        tokens = base[: rng.randrange(1, len(base) + 1)] + [
            rng.randrange(4) for _ in range(rng.randrange(7))
        ]
        reused = cache.lookup(tokens, max_pages=(len(tokens) - 1) // ps)
        check_reused(tokens, reused)
        need = -(-len(tokens) // ps) - len(reused)
        if not alloc.can_allocate(need):
            before = snapshot(alloc, cache)
            with pytest.raises(FerrumError) as e:
                alloc.allocate(need)
            assert_error(e, ErrorKind.RESOURCE_EXHAUSTED)
            assert snapshot(alloc, cache) == before
            alloc.release(reused)
            stats["rejected"] += 1
            return
        evicted = cache.metrics()["pages_evicted"]
        seq = _Seq(tokens, reused + alloc.allocate(need))
        stats["pressure_evictions"] += cache.metrics()["pages_evicted"] - evicted
        seqs.append(seq)
        write(seq, len(reused) * ps)
        stats["reused_pages"] += len(reused)

    def extend(seq: _Seq) -> None:
        for _ in range(rng.randrange(1, 6)):
            if len(seq.tokens) % ps == 0:
                if not alloc.can_allocate(1):
                    return
                seq.pages += alloc.allocate(1)
            seq.tokens.append(rng.randrange(4))
            write(seq, len(seq.tokens) - 1)

    def fork(seq: _Seq) -> None:
        full = len(seq.tokens) // ps
        shared = seq.pages[:full]
        partial = len(seq.tokens) % ps != 0
        if partial and not alloc.can_allocate(1):
            return
        alloc.retain(shared)
        child = _Seq(list(seq.tokens), shared + (alloc.allocate(1) if partial else []))
        seqs.append(child)
        write(child, full * ps)  # the copy of the partial page

    def finish(seq: _Seq) -> None:
        seqs.remove(seq)
        alloc.release(seq.pages)

    def probe() -> None:
        tokens = rng.choice(prompts)[: rng.randrange(1, 25)]
        pages = cache.lookup(tokens, max_pages=rng.choice([None, 1, 3]))
        check_reused(tokens, pages)
        alloc.release(pages)

    ops = ["start"] * 6 + ["extend"] * 6 + ["insert"] * 4 + ["finish"] * 4
    ops += ["fork", "evict", "probe", "probe"]
    for step in range(3000):
        op = rng.choice(ops) if step % 500 != 499 else "clear"
        seq = rng.choice(seqs) if seqs else None
        if op == "start" and len(seqs) < 7:
            start()
        elif op == "clear":
            cache.clear()
        elif op == "evict":
            cache.evict(rng.randrange(4))
        elif op == "probe":
            probe()
        elif seq is not None and op == "extend":
            extend(seq)
        elif seq is not None and op == "insert":
            cache.insert(seq.tokens, seq.pages)
        elif seq is not None and op == "finish":
            finish(seq)
        elif seq is not None and op == "fork" and len(seqs) < 7:
            fork(seq)
        stats[op] += 1
        verify()

    m = cache.metrics()
    assert m["hits"] > 100 and m["misses"] > 100
    assert stats["reused_pages"] > 100
    assert stats["pressure_evictions"] > 50
    assert stats["rejected"] > 5
    assert stats["fork"] > 50 and stats["clear"] == 6


def test_lookup_past_held_pages_continues_a_chunked_prompt():
    """`held`: the caller holds the chain's first pages already (a chunked prompt): only
    the pages past them are retained, returned and counted as reused."""
    allocator = PageAllocator(8)
    cache = PrefixCache(allocator, 4)
    tokens = list(range(3, 15))  # 3 full pages
    pages = allocator.allocate(3)
    cache.insert(tokens, pages)
    first = cache.lookup(tokens[:4], max_pages=1)
    assert first == pages[:1] and allocator.refcount(pages[0]) == 3
    rest = cache.lookup(tokens, max_pages=3, held=1)
    assert rest == pages[1:] and allocator.refcount(pages[0]) == 3
    assert [allocator.refcount(p) for p in pages[1:]] == [3, 3]
    assert cache.metrics()["tokens_reused"] == 3 * 4
    assert cache.lookup(tokens, max_pages=3, held=3) == []
    assert cache.metrics()["misses"] == 1
