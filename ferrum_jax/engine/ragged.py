"""The ragged step: one forward over a flat batch of items that read and write KV pages.

An item is a prompt, a prompt chunk continuing at any offset, one decode token, or a run of
draft tokens to verify; all of them are the same thing to the step: `q` new tokens at
positions `start .. start + q - 1` of a sequence whose pages are listed in its page-table
row. Projections and MLPs run once over all `T` tokens; attention runs per item over its
own pages (`ferrum_jax.models.attention`); the LM head runs only on the rows asked for.

Shapes are bucketed (`buckets.py`): tokens and items each to a power of two, so a step
compiles once per (token bucket, item bucket, logits rows) and any mix of items inside a
bucket reuses the program. Padding items hold no tokens; padding tokens write nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.engine.buckets import bucket
from ferrum_jax.errors import FerrumError
from ferrum_jax.models import attention

MIN_TOKEN_BUCKET = 8
"""Smallest token bucket: a few decode rows share one program."""


@dataclasses.dataclass(frozen=True)
class RaggedItem:
    """One item of a ragged step, as the host knows it."""

    tokens: np.ndarray
    """`[q]` int32 new tokens (q >= 1)."""
    start: int
    """Position of the first new token (tokens already in the sequence's pages)."""
    pages: Sequence[int]
    """The sequence's pages in order, covering at least `start + q` tokens."""
    logits: str = "last"
    """`"last"`: logits of the last token; `"all"`: of every token; `"none"`."""


@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """Items packed into bucketed host arrays, ready for `ragged_step`."""

    tokens: np.ndarray
    """`[T]` int32 flat tokens, items in order, zeros after the last."""
    cu_q_lens: np.ndarray
    """`[I + 1]` int32 item boundaries in `tokens`."""
    kv_lens: np.ndarray
    """`[I]` int32: each item's sequence length after the step (0: padding item)."""
    page_table: np.ndarray
    """`[I, pages_per_item]` int32."""
    logits_at: np.ndarray
    """`[R]` int32 token rows whose logits the step returns."""
    logit_rows: list[list[int]]
    """Per real item, its rows in the returned logits (empty for `"none"`)."""

    @property
    def num_items(self) -> int:
        return len(self.logit_rows)


def pack_ragged(
    items: Sequence[RaggedItem],
    *,
    pages_per_item: int,
    num_pages: int,
    min_items: int = 1,
    all_rows: bool = False,
) -> RaggedBatch:
    """Packs `items` into one bucketed batch. Items are trusted (the caller validated ids,
    positions and pages); `pages_per_item` is the page table's width.

    The logits rows are one per item (`[I]`, each item's last token) unless an item asks for
    all its rows or `all_rows` is set; then every token row (`[T]`).
    """
    if not items:
        raise FerrumError.internal("pack_ragged got no items")
    total = sum(len(item.tokens) for item in items)
    tokens_bucket = bucket(total, minimum=MIN_TOKEN_BUCKET)
    items_bucket = bucket(len(items), minimum=min_items)
    tokens = np.zeros((tokens_bucket,), np.int32)
    cu = np.full((items_bucket + 1,), total, np.int32)
    kv_lens = np.zeros((items_bucket,), np.int32)
    table = np.full((items_bucket, pages_per_item), num_pages, np.int32)
    every = all_rows or any(item.logits == "all" for item in items)
    at, rows, offset = [], [], 0
    for i, item in enumerate(items):
        n = len(item.tokens)
        cu[i] = offset
        tokens[offset : offset + n] = item.tokens
        kv_lens[i] = item.start + n
        table[i, : len(item.pages)] = item.pages
        if every:
            rows.append(
                list(range(offset, offset + n))
                if item.logits == "all"
                else ([offset + n - 1] if item.logits == "last" else [])
            )
        else:
            at.append(offset + n - 1)
            rows.append([i] if item.logits != "none" else [])
        offset += n
    cu[len(items)] = offset
    if every:
        logits_at = np.arange(tokens_bucket, dtype=np.int32)
    else:
        logits_at = np.zeros((items_bucket,), np.int32)
        logits_at[: len(at)] = at
    return RaggedBatch(tokens, cu, kv_lens, table, logits_at, rows)


def _forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    pages: tuple[attention.Pool, ...],
    tokens: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    logits_at: jax.Array,
    attention_impl: str,
) -> tuple[jax.Array, jax.Array, tuple[attention.Pool, ...]]:
    model = nnx.merge(graphdef, params)
    layout = attention.IMPLEMENTATIONS[attention_impl].layout
    num_pages, page_size, _, _ = layout.geometry(pages[0])
    meta = attention.metadata(
        cu_q_lens,
        kv_lens,
        page_table,
        num_tokens=tokens.shape[0],
        page_size=page_size,
        num_pages=num_pages,
    )
    hidden, pages = model.hidden(tokens, meta, pages, attention_impl)
    return model.head(hidden[logits_at]), hidden, pages


@functools.partial(jax.jit, static_argnames=("graphdef", "attention_impl"), donate_argnames="pages")
def ragged_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    pages: tuple[attention.Pool, ...],
    tokens: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    logits_at: jax.Array,
    attention_impl: str = "xla",
) -> tuple[jax.Array, tuple[attention.Pool, ...]]:
    """One forward over a packed ragged batch (see `pack_ragged`): logits `[R, vocab]` of the
    token rows `logits_at`, and the pages with this step's keys/values written (donated)."""
    logits, _, pages = _forward(
        graphdef, params, pages, tokens, cu_q_lens, kv_lens, page_table, logits_at, attention_impl
    )
    return logits, pages


@functools.partial(jax.jit, static_argnames=("graphdef", "attention_impl"), donate_argnames="pages")
def ragged_forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    pages: tuple[attention.Pool, ...],
    tokens: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    logits_at: jax.Array,
    attention_impl: str = "xla",
) -> tuple[jax.Array, jax.Array, tuple[attention.Pool, ...]]:
    """`ragged_step` that also returns the final hidden states `[T, embed]` of every token,
    so the LM head can run on other rows later (the executor's lazily read prefill logits)
    without a second forward."""
    return _forward(
        graphdef, params, pages, tokens, cu_q_lens, kv_lens, page_table, logits_at, attention_impl
    )


def run_ragged(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    pages: tuple[attention.Pool, ...],
    batch: RaggedBatch,
    attention_impl: str = "xla",
) -> tuple[list[jax.Array], tuple[attention.Pool, ...]]:
    """`ragged_step` on a packed batch: per real item its logits `[rows, vocab]` (rows as
    asked for), and the updated pages."""
    logits, pages = ragged_step(
        graphdef,
        params,
        pages,
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.cu_q_lens),
        jnp.asarray(batch.kv_lens),
        jnp.asarray(batch.page_table),
        jnp.asarray(batch.logits_at),
        attention_impl,
    )
    return [logits[np.asarray(rows, np.int32)] for rows in batch.logit_rows], pages
