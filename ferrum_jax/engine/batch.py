"""Host-side packing of requests into bucketed device batches: the engine's row rules.

A batch of rows is padded to power-of-two buckets of rows and tokens (`buckets.py`).
Padding rows carry the slot `pad_slot(pool_rows)`, one past the cache's last row: the jitted
steps drop every write aimed there (`mode="drop"`), so a padding row never touches a live
sequence. Token ids are checked here, on the host, because JAX would silently clamp an
out-of-range id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.engine.buckets import bucket, bucket_length
from ferrum_jax.errors import FerrumError
from ferrum_jax.tensor import as_numpy


def pad_slot(pool_rows: int) -> int:
    """The slot of a padding row: writes to it are dropped."""
    return pool_rows


def check_token_ids(tokens, vocab: int, what: str = "token ids") -> np.ndarray | jax.Array:
    """`tokens` as an integer array, every id in `[0, vocab)`.

    Host arrays (numpy, lists, `TensorLike`) are range-checked directly; a concrete
    `jax.Array` by reading back its min and max (a small sync: an out-of-range id would
    otherwise be clamped into NaN logits, or a negative one wrap silently). Only a traced
    array, inside a caller's own jit, is checked for its dtype alone.
    """
    if isinstance(tokens, jax.Array):
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise FerrumError.invalid_parameter(f"{what} must be integers, got {tokens.dtype}")
        if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
            return tokens
        low, high = (int(v) for v in jax.device_get((tokens.min(), tokens.max())))
        _check_range(low, high, vocab, what)
        return tokens
    try:
        ids = as_numpy(tokens)
    except (ValueError, TypeError, OverflowError) as e:
        raise FerrumError.invalid_parameter(f"{what} is not a rectangular array: {e}") from e
    if ids.dtype.kind not in "iu":
        raise FerrumError.invalid_parameter(f"{what} must be integers, got {ids.dtype}")
    if ids.size:
        _check_range(int(ids.min()), int(ids.max()), vocab, what)
    return ids


def _check_range(low: int, high: int, vocab: int, what: str) -> None:
    if low < 0 or high >= vocab:
        raise FerrumError.invalid_parameter(f"{what} must be in [0, {vocab}), got [{low}, {high}]")


def host_values(x) -> np.ndarray | None:
    """`x` read back to the host, or None when it is traced (inside a caller's own jit)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(jax.device_get(x))


@dataclasses.dataclass(frozen=True)
class RowBatch:
    """Rows padded to a (rows, tokens) bucket, ready for `prefill_step` / `extend_step`."""

    tokens: np.ndarray
    """`[rows_bucket, len_bucket]` int32, zeros past each row's length."""
    lengths: np.ndarray
    """`[rows_bucket]` int32; padding rows hold 1."""
    slots: np.ndarray
    """`[rows_bucket]` int32 cache rows; padding rows hold `pad_slot`."""
    rows: int
    """Real rows (the first `rows` of the arrays)."""
    seq: int
    """Longest real row."""


def pack_rows(
    rows: Sequence[np.ndarray], slots: Sequence[int], *, pool_rows: int, max_len: int
) -> RowBatch:
    """Right-pads `rows` (1-D token arrays) into one bucketed batch aimed at cache `slots`."""
    n = len(rows)
    if n == 0 or n != len(slots):
        raise FerrumError.internal(f"pack_rows got {n} rows for {len(slots)} slots")
    seq = max(len(r) for r in rows)
    tokens = np.zeros((bucket(n, pool_rows), bucket_length(seq, max_len)), np.int32)
    lengths = np.ones((tokens.shape[0],), np.int32)
    row_slots = np.full((tokens.shape[0],), pad_slot(pool_rows), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        lengths[i] = len(row)
    row_slots[:n] = slots
    return RowBatch(tokens, lengths, row_slots, n, seq)


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """One token per row, padded to a row bucket, ready for `decode_step`."""

    tokens: np.ndarray
    """`[rows_bucket]` int32."""
    slots: np.ndarray | None
    """`[rows_bucket]` int32 cache rows (`pad_slot` for padding), or None: row i is slot i."""
    active: np.ndarray
    """`[rows_bucket]` bool: real rows."""
    order: np.ndarray
    """`[rows]`: position of each input row in the batch (undoes the slot ordering)."""


def pack_tokens(tokens: np.ndarray, slots: Sequence[int], *, pool_rows: int) -> TokenBatch:
    """Decode tokens for `slots`; a batch holding every slot runs without a gather.

    The whole-pool batch is put in slot order and passed with `slots=None`, so the step reads
    the cache rows in place instead of gathering (copying) them.
    """
    n = len(slots)
    if n == pool_rows:
        order = np.argsort(slots)
        return TokenBatch(
            np.asarray(tokens, np.int32)[order], None, np.ones((n,), bool), np.argsort(order)
        )
    rows = bucket(n, pool_rows)
    padded = np.zeros((rows,), np.int32)
    padded[:n] = tokens
    row_slots = np.full((rows,), pad_slot(pool_rows), np.int32)
    row_slots[:n] = slots
    return TokenBatch(padded, row_slots, np.arange(rows) < n, np.arange(n))


def padding_rows(rows: int, length: int, *, pool_rows: int) -> RowBatch:
    """A `(rows, length)`-bucket batch of padding rows only: compiles a program, writes nothing."""
    return RowBatch(
        np.zeros((rows, length), np.int32),
        np.ones((rows,), np.int32),
        np.full((rows,), pad_slot(pool_rows), np.int32),
        0,
        0,
    )


def padding_tokens(rows: int, *, pool_rows: int, gather: bool = True) -> TokenBatch:
    """A decode batch that compiles the `rows` bucket's program and writes nothing.

    `gather=False` (with `rows == pool_rows`) gives the whole-pool program that reads cache
    rows in place, with every row inactive.
    """
    slots = np.full((rows,), pad_slot(pool_rows), np.int32) if gather else None
    return TokenBatch(np.zeros((rows,), np.int32), slots, np.zeros((rows,), bool), np.arange(0))
