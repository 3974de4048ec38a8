"""Pure step functions: prefill, extend, decode and forward over a static KV cache.

`graphdef` and `params` come from `nnx.split(model)`. Params are always arguments (never
closed over), so new weights with the same shapes reuse the compiled program. Caches are
donated, so each step updates them in place. Prompt lengths are padded to power-of-two
buckets: prefill compiles once per bucket, decode once per (cache shape, batch).

The wrappers validate on the host before any device work: shapes, token ids (JAX would
silently clamp an out-of-range id), slots, lengths, and that no row is written past the
cache's `max_len` (the write would be dropped and the logits wrong). Values given as
concrete jax arrays are read back for this (a small sync); only traced values, inside a
caller's own jit, go unchecked.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.cache import KVCache, init_cache
from ferrum_jax.engine.batch import check_token_ids, host_values
from ferrum_jax.engine.buckets import MIN_BUCKET, bucket, bucket_length
from ferrum_jax.errors import FerrumError
from ferrum_jax.models import attention

ArrayLike = jax.Array | np.ndarray | Sequence


# ---------------------------------------------------------------------------------------------
# Traced bodies (shared by the jitted entry points and `generate.generate_step`).


def rows_forward(
    model, cache: KVCache, tokens, lengths, slots, start, all_logits: bool, differentiable=False
):
    """Right-padded rows `tokens: [b, s]` (row i: `lengths[i]` tokens continuing at position
    `start[i]` of cache row `slots[i]`) as one ragged step.

    Returns logits `[b, s, vocab]` (padding positions repeat the row's last real logits, so
    "the last position" is each row's next-token distribution) or `[b, vocab]` at each
    row's last token, and the updated pages.
    """
    b, s = tokens.shape
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths, dtype=jnp.int32)])
    t = jnp.arange(b * s, dtype=jnp.int32)
    row = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, b - 1)
    col = jnp.clip(t - cu[row], 0, s - 1)
    flat = jnp.where(t < cu[-1], tokens[row, col], 0)
    meta = attention.metadata(
        cu,
        start + lengths,
        cache.page_table(slots),
        num_tokens=b * s,
        page_size=cache.page_size,
        num_pages=cache.num_pages,
        differentiable=differentiable,
    )
    if not all_logits:
        logits, pages = model(flat, meta, cache.pages, cu[1:] - 1, cache.attention_impl)
        return logits, pages
    logits, pages = model(flat, meta, cache.pages, None, cache.attention_impl)
    index = cu[:-1, None] + jnp.minimum(jnp.arange(s), lengths[:, None] - 1)
    return logits[index], pages


def prefill_body(model, cache: KVCache, tokens, lengths, slots, all_logits: bool):
    start = jnp.zeros_like(lengths)
    logits, pages = rows_forward(model, cache, tokens, lengths, slots, start, all_logits)
    new_lengths = cache.lengths.at[slots].set(lengths, mode="drop")
    return logits, dataclasses.replace(cache, pages=pages, lengths=new_lengths)


def extend_body(model, cache: KVCache, tokens, lengths, slots):
    start = cache.lengths.at[slots].get(mode="fill", fill_value=0)
    logits, pages = rows_forward(model, cache, tokens, lengths, slots, start, True)
    new_lengths = cache.lengths.at[slots].set(start + lengths, mode="drop")
    return logits, dataclasses.replace(cache, pages=pages, lengths=new_lengths)


def decode_body(model, cache: KVCache, tokens, slots, active):
    b = tokens.shape[0]
    if slots is None:  # the whole cache in row order: no gather, lengths keep their sharding
        rows, start = jnp.arange(b, dtype=jnp.int32), cache.lengths
    else:
        rows, start = slots, cache.lengths.at[slots].get(mode="fill", fill_value=0)
    meta = attention.metadata(
        jnp.arange(b + 1, dtype=jnp.int32),
        start + 1,
        cache.page_table(rows),
        num_tokens=b,
        page_size=cache.page_size,
        num_pages=cache.num_pages,
        writes=active,
    )
    logits, pages = model(tokens, meta, cache.pages, None, cache.attention_impl)
    new = start + active.astype(jnp.int32)
    lengths = new if slots is None else cache.lengths.at[slots].set(new, mode="drop")
    return logits, dataclasses.replace(cache, pages=pages, lengths=lengths)


# ---------------------------------------------------------------------------------------------
# The jitted programs. No validation: token ids in range, prompts padded to a bucket, slots
# in range (a slot equal to the cache's batch marks a padding row whose writes are dropped).
# The executor and the bench call these directly; everyone else wants the wrappers below.


@functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"), donate_argnames="cache")
def prefill_step(graphdef, params, cache, tokens, lengths, slots, all_logits):
    return prefill_body(nnx.merge(graphdef, params), cache, tokens, lengths, slots, all_logits)


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def extend_step(graphdef, params, cache, tokens, lengths, slots):
    return extend_body(nnx.merge(graphdef, params), cache, tokens, lengths, slots)


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def decode_step(graphdef, params, cache, tokens, slots, active):
    return decode_body(nnx.merge(graphdef, params), cache, tokens, slots, active)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention_impl"))
def forward_step(graphdef, params, tokens, lengths, attention_impl="xla"):
    model = nnx.merge(graphdef, params)
    b, s = tokens.shape
    cache = init_cache(model.config, b, s, model.dtype, attention_impl=attention_impl)
    rows = jnp.arange(b, dtype=jnp.int32)
    start = jnp.zeros_like(lengths)
    # Rows hold exactly their sequences: a fixed-length block loop costs nothing extra and
    # keeps `forward` differentiable (training loops take its gradient).
    return rows_forward(model, cache, tokens, lengths, rows, start, True, differentiable=True)[0]


# ---------------------------------------------------------------------------------------------
# Public wrappers: host-side validation, bucketing, defaults.


def vocab_size(params: nnx.State) -> int:
    return params["embed"].get_value().shape[0]  # a quantized QArray has a shape too


def token_ids(tokens: ArrayLike, vocab: int, ndim: int) -> jax.Array | np.ndarray:
    tokens = check_token_ids(tokens, vocab)
    if tokens.ndim != ndim or tokens.shape[-1] == 0:
        want = "[batch, seq] with seq >= 1" if ndim == 2 else "[batch]"
        raise FerrumError.invalid_parameter(
            f"tokens must be {want}, got shape {tuple(tokens.shape)}"
        )
    return tokens


def row_lengths(lengths: ArrayLike | None, batch: int, seq: int) -> jax.Array:
    if lengths is None:
        return jnp.full((batch,), seq, jnp.int32)
    values = host_values(lengths)
    if values is not None and (
        values.shape != (batch,)
        or values.dtype.kind not in "iu"
        or np.any(values < 1)
        or np.any(values > seq)
    ):
        raise FerrumError.invalid_parameter(
            f"lengths must be [{batch}] integers in [1, {seq}], got {values.tolist()}"
        )
    return jnp.asarray(lengths, jnp.int32)


def _slots(slots: ArrayLike | None, batch: int, cache: KVCache) -> jax.Array:
    if slots is None:
        if batch > cache.batch:
            raise FerrumError.invalid_parameter(
                f"batch {batch} exceeds the cache's {cache.batch} rows"
            )
        return jnp.arange(batch, dtype=jnp.int32)
    values = host_values(slots)
    if values is not None and values.shape != (batch,):
        raise FerrumError.invalid_parameter(
            f"slots must be [{batch}] rows of a {cache.batch}-row cache, got {values.tolist()}"
        )
    _check_slots(values, cache, f"[{batch}]")
    return jnp.asarray(slots, jnp.int32)


def _check_slots(values: np.ndarray | None, cache: KVCache, shape: str) -> None:
    if values is None:
        return
    if (
        values.ndim != 1
        or values.dtype.kind not in "iu"
        or np.any(values < 0)
        or np.any(values >= cache.batch)
    ):
        raise FerrumError.invalid_parameter(
            f"slots must be {shape} rows of a {cache.batch}-row cache, got {values.tolist()}"
        )
    if len(set(values.tolist())) != len(values):
        raise FerrumError.invalid_parameter(f"slots must be distinct, got {values.tolist()}")


def _check_room(cache: KVCache, rows: ArrayLike, added: ArrayLike, what: str) -> None:
    """Refuses a step that would write cache `rows` past `max_len` (the write would be
    dropped and the logits silently wrong)."""
    lengths, rows, added = host_values(cache.lengths), host_values(rows), host_values(added)
    if lengths is None or rows is None or added is None:
        return
    end = lengths[rows] + added
    over = end > cache.max_len
    if np.any(over):
        raise FerrumError.request_validation(
            f"{what}: cache row(s) {rows[over].tolist()} would hold {end[over].tolist()} "
            f"tokens, past the cache's max_len {cache.max_len}"
        )


def pad_to(tokens, length: int):
    pad = length - tokens.shape[1]
    if pad == 0:
        return jnp.asarray(tokens, jnp.int32)
    return jnp.pad(jnp.asarray(tokens, jnp.int32), ((0, 0), (0, pad)))


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    tokens: ArrayLike,
    lengths: ArrayLike | None = None,
    slots: ArrayLike | None = None,
    *,
    all_logits: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Writes right-padded prompts `tokens: [b, s]` into cache rows `slots: [b]` from position 0.

    Returns logits `[b, s, vocab]` (`all_logits`; padding positions repeat the row's last
    real logits) or `[b, vocab]` at each row's last real token, and the updated cache (the
    argument cache is consumed).
    """
    tokens = token_ids(tokens, vocab_size(params), 2)
    b, s = tokens.shape
    if s > cache.max_len:
        raise FerrumError.invalid_parameter(
            f"prompt of {s} tokens does not fit a cache of {cache.max_len}"
        )
    lengths = row_lengths(lengths, b, s)
    slots = _slots(slots, b, cache)
    padded = pad_to(tokens, bucket_length(s, cache.max_len))
    logits, cache = prefill_step(graphdef, params, cache, padded, lengths, slots, all_logits)
    return (logits[:, :s] if all_logits else logits), cache


def extend(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    tokens: ArrayLike,
    lengths: ArrayLike | None = None,
    slots: ArrayLike | None = None,
) -> tuple[jax.Array, KVCache]:
    """Appends `tokens: [b, k]` after each row's cached tokens in one forward.

    Scores k draft tokens for speculative decoding (or a prompt chunk). Returns logits
    `[b, k, vocab]`; a row that would pass `max_len` is refused. Rows may be rolled back
    with `set_lengths`.
    """
    tokens = token_ids(tokens, vocab_size(params), 2)
    b, k = tokens.shape
    lengths = row_lengths(lengths, b, k)
    slots = _slots(slots, b, cache)
    _check_room(cache, slots, lengths, "extend")
    padded = pad_to(tokens, bucket_length(k, cache.max_len))
    logits, cache = extend_step(graphdef, params, cache, padded, lengths, slots)
    return logits[:, :k], cache


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    tokens: ArrayLike,
    slots: ArrayLike | None = None,
    active: ArrayLike | None = None,
) -> tuple[jax.Array, KVCache]:
    """One token per row: `tokens: [b]` into cache rows `slots: [b]` (default: all rows).

    Each row continues at its own length. Rows with `active` False write nothing and keep
    their length; an active row already holding `max_len` tokens is refused. Returns logits
    `[b, vocab]` and the updated cache.
    """
    tokens = jnp.asarray(token_ids(tokens, vocab_size(params), 1), jnp.int32)
    b = tokens.shape[0]
    if slots is None:
        if b != cache.batch:
            raise FerrumError.invalid_parameter(
                f"decode without slots needs one token per cache row ({cache.batch}), got {b}"
            )
    else:
        slots = _slots(slots, b, cache)
    active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
    if active.shape != (b,):
        raise FerrumError.invalid_parameter(f"active must be [{b}], got {active.shape}")
    rows = jnp.arange(b) if slots is None else slots
    _check_room(cache, rows, active.astype(jnp.int32), "decode")
    return decode_step(graphdef, params, cache, tokens, slots, active)


def set_lengths(cache: KVCache, slots: ArrayLike, lengths: ArrayLike) -> KVCache:
    """Sets the token count of rows `slots` (rolls back rejected speculative tokens)."""
    rows, counts = host_values(slots), host_values(lengths)
    _check_slots(rows, cache, "distinct")
    if counts is not None and (
        (rows is not None and counts.shape != rows.shape)
        or counts.dtype.kind not in "iu"
        or np.any(counts < 0)
        or np.any(counts > cache.max_len)
    ):
        raise FerrumError.invalid_parameter(
            f"lengths must be one integer in [0, {cache.max_len}] per slot, got "
            f"{counts.tolist()} for slots {None if rows is None else rows.tolist()}"
        )
    lengths = cache.lengths.at[jnp.asarray(slots, jnp.int32)].set(jnp.asarray(lengths, jnp.int32))
    return dataclasses.replace(cache, lengths=lengths)


def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: ArrayLike,
    lengths: ArrayLike | None = None,
    *,
    attention_impl: str = "xla",
) -> jax.Array:
    """Full-sequence logits `[b, s, vocab]` of right-padded `tokens: [b, s]`, no cache kept.

    Differentiable (`jax.grad` through it trains the model) with the default pure-JAX
    attention; the Pallas kernels have no gradients.
    """
    tokens = token_ids(tokens, vocab_size(params), 2)
    b, s = tokens.shape
    lengths = row_lengths(lengths, b, s)
    padded = pad_to(tokens, bucket(s, minimum=MIN_BUCKET))
    impl = attention.resolve_implementation(attention_impl)
    return forward_step(graphdef, params, padded, lengths, impl)[:, :s]
