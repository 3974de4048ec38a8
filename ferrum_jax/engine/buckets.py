"""Power-of-two buckets: the one rule that pads batch rows, prompt lengths and cache lengths.

A jitted program compiles once per input shape, so sizes are rounded up to a bucket: the
number of programs grows with log2 of the largest size, not with every size seen.
"""

from __future__ import annotations

MIN_BUCKET = 16
"""Smallest prompt bucket: short prompts of different lengths share one program."""


def bucket(n: int, limit: int | None = None, *, minimum: int = 1) -> int:
    """The smallest power of two >= `max(n, minimum)`, capped at `limit` (if given)."""
    size = 1 << (max(n, minimum) - 1).bit_length()
    return size if limit is None else min(size, limit)


def bucket_length(length: int, max_len: int) -> int:
    """The prompt bucket (at least `MIN_BUCKET`, at most `max_len`) holding `length`."""
    return bucket(length, max_len, minimum=MIN_BUCKET)


def buckets(limit: int, *, minimum: int = 1) -> list[int]:
    """Every bucket `bucket` returns for sizes 1..`limit`, ascending (what warmup compiles)."""
    out = []
    size = bucket(1, limit, minimum=minimum)
    while True:
        out.append(size)
        if size >= limit:
            return out
        size = bucket(size + 1, limit, minimum=minimum)
