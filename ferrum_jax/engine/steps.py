"""Pure step functions: prefill, extend, decode, forward and generate over a static KV cache.

`graphdef` and `params` come from `nnx.split(model)`. Params are always arguments (never
closed over), so new weights with the same shapes reuse the compiled program. Caches are
donated, so each step updates them in place. Prompt lengths are padded to power-of-two
buckets: prefill compiles once per bucket, decode once per (cache shape, batch).

The wrappers validate shapes on the host; token values are checked where they already live
on the host (numpy or lists), since JAX would silently clamp an out-of-range id.
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
from ferrum_jax.errors import FerrumError
from ferrum_jax.models.layers import KVPlan
from ferrum_jax.sampling import SamplingParams, row_keys, sample_step

MIN_BUCKET = 16
"""Smallest prompt bucket: short prompts of different lengths share one program."""

ArrayLike = jax.Array | np.ndarray | Sequence


def bucket_length(length: int, max_len: int) -> int:
    """The power-of-two bucket (at least `MIN_BUCKET`, at most `max_len`) holding `length`."""
    bucket = max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())
    return min(bucket, max_len)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Result of `generate`; row `i` produced `lengths[i]` tokens."""

    tokens: jax.Array
    """`[batch, max_new_tokens]` int32, -1 past each row's length."""
    lengths: jax.Array
    """`[batch]` int32: tokens generated, the stop token included."""
    logprobs: jax.Array
    """`[batch, max_new_tokens]` float32: log-prob of each token under the model, 0 past length."""
    stopped: jax.Array
    """`[batch]` bool: the row ended on a stop token (else it hit its token limit)."""


# ---------------------------------------------------------------------------------------------
# Traced bodies (shared by the jitted entry points and `generate`).


def _prefill_body(model, cache: KVCache, tokens, lengths, slots, all_logits: bool):
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    real = positions < lengths[:, None]
    plan = KVPlan(
        slots=slots,
        write_pos=jnp.where(real, positions, cache.max_len),
        attend_cache=False,
    )
    logits_at = None if all_logits else lengths - 1
    logits, keys, values = model(tokens, positions, cache.keys, cache.values, plan, logits_at)
    if all_logits:
        # Padding positions repeat the row's last real logits, so "the last position" is
        # each row's next-token distribution whatever its length.
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
        logits = jnp.where(real[:, :, None], logits, last)
    new_lengths = cache.lengths.at[slots].set(lengths, mode="drop")
    return logits, KVCache(keys, values, new_lengths)


def _extend_body(model, cache: KVCache, tokens, lengths, slots):
    s = tokens.shape[1]
    start = cache.lengths[slots]
    offsets = jnp.arange(s, dtype=jnp.int32)
    positions = start[:, None] + offsets
    real = offsets < lengths[:, None]
    plan = KVPlan(
        slots=slots, write_pos=jnp.where(real, positions, cache.max_len), attend_cache=True
    )
    logits, keys, values = model(tokens, positions, cache.keys, cache.values, plan)
    new_lengths = cache.lengths.at[slots].set(start + lengths, mode="drop")
    return logits, KVCache(keys, values, new_lengths)


def _decode_body(model, cache: KVCache, tokens, slots, active):
    start = cache.lengths if slots is None else cache.lengths[slots]
    plan = KVPlan(
        slots=slots,
        write_pos=jnp.where(active, start, cache.max_len)[:, None],
        attend_cache=True,
    )
    logits, keys, values = model(
        tokens[:, None],
        start[:, None],
        cache.keys,
        cache.values,
        plan,
        logits_at=jnp.zeros_like(start),
    )
    new = start + active.astype(jnp.int32)
    lengths = new if slots is None else cache.lengths.at[slots].set(new, mode="drop")
    return logits, KVCache(keys, values, lengths)


# ---------------------------------------------------------------------------------------------
# The jitted programs. No validation: token ids in range, prompts padded to a bucket, slots
# in range (a slot equal to the cache's batch marks a padding row whose writes are dropped).
# The executor and the bench call these directly; everyone else wants the wrappers below.


@functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"), donate_argnames="cache")
def prefill_step(graphdef, params, cache, tokens, lengths, slots, all_logits):
    return _prefill_body(nnx.merge(graphdef, params), cache, tokens, lengths, slots, all_logits)


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def extend_step(graphdef, params, cache, tokens, lengths, slots):
    return _extend_body(nnx.merge(graphdef, params), cache, tokens, lengths, slots)


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def decode_step(graphdef, params, cache, tokens, slots, active):
    return _decode_body(nnx.merge(graphdef, params), cache, tokens, slots, active)


@functools.partial(jax.jit, static_argnames="graphdef")
def forward_step(graphdef, params, tokens, lengths):
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1], jnp.dtype(model.dtype))
    slots = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    return _prefill_body(model, cache, tokens, lengths, slots, all_logits=True)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len"))
def generate_step(
    graphdef,
    params,
    tokens,
    lengths,
    row_max_new,
    stop_tokens,
    sampling,
    keys,
    max_new_tokens,
    cache_len,
):
    model = nnx.merge(graphdef, params)
    batch = tokens.shape[0]
    cache = init_cache(model.config, batch, cache_len, jnp.dtype(model.dtype))
    rows = jnp.arange(batch, dtype=jnp.int32)
    logits, cache = _prefill_body(model, cache, tokens, lengths, rows, all_logits=False)

    def emit(state, logits, step):
        cache, last, done, out, logps, count = state
        token, logp = sample_step(logits, sampling, keys, step)
        write = ~done
        out = out.at[:, step].set(jnp.where(write, token, -1))
        logps = logps.at[:, step].set(jnp.where(write, logp, 0.0))
        count = count + write.astype(jnp.int32)
        stopped_now = write & jnp.any(token[:, None] == stop_tokens, axis=-1)
        done = done | stopped_now | (count >= row_max_new)
        return cache, jnp.where(write, token, last), done, out, logps, count

    out = jnp.full((batch, max_new_tokens), -1, jnp.int32)
    logps = jnp.zeros((batch, max_new_tokens), jnp.float32)
    count = jnp.zeros((batch,), jnp.int32)
    done = row_max_new <= 0
    state = emit((cache, jnp.zeros((batch,), jnp.int32), done, out, logps, count), logits, 0)

    def cond(carry):
        step, state = carry
        return (step < max_new_tokens) & ~jnp.all(state[2])

    def body(carry):
        step, (cache, last, done, out, logps, count) = carry
        logits, cache = _decode_body(model, cache, last, None, ~done)
        return step + 1, emit((cache, last, done, out, logps, count), logits, step)

    _, (_, _, _, out, logps, count) = jax.lax.while_loop(cond, body, (1, state))
    last = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    stopped = (count > 0) & jnp.any(last[:, None] == stop_tokens, axis=-1)
    return GenerateOutput(tokens=out, lengths=count, logprobs=logps, stopped=stopped)


def compile_counts() -> dict[str, int]:
    """Programs compiled so far per entry point (for tests and `warmup` reports)."""
    fns = {
        "prefill": prefill_step,
        "extend": extend_step,
        "decode": decode_step,
        "forward": forward_step,
        "generate": generate_step,
    }
    return {name: fn._cache_size() for name, fn in fns.items()}


# ---------------------------------------------------------------------------------------------
# Public wrappers: host-side validation, bucketing, defaults.


def _vocab_size(params: nnx.State) -> int:
    return params["embed"][...].shape[0]


def _token_ids(tokens: ArrayLike, vocab: int, ndim: int) -> jax.Array | np.ndarray:
    if not isinstance(tokens, jax.Array):
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise FerrumError.invalid_parameter(f"token ids must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise FerrumError.invalid_parameter(
                f"token ids must be in [0, {vocab}), got [{tokens.min()}, {tokens.max()}]"
            )
    elif not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise FerrumError.invalid_parameter(f"token ids must be integers, got {tokens.dtype}")
    if tokens.ndim != ndim or tokens.shape[-1] == 0:
        want = "[batch, seq] with seq >= 1" if ndim == 2 else "[batch]"
        raise FerrumError.invalid_parameter(
            f"tokens must be {want}, got shape {tuple(tokens.shape)}"
        )
    return tokens


def _lengths(lengths: ArrayLike | None, batch: int, seq: int) -> jax.Array:
    if lengths is None:
        return jnp.full((batch,), seq, jnp.int32)
    if not isinstance(lengths, jax.Array):
        lengths = np.asarray(lengths)
        if lengths.shape != (batch,) or np.any(lengths < 1) or np.any(lengths > seq):
            raise FerrumError.invalid_parameter(
                f"lengths must be [{batch}] with values in [1, {seq}], got {lengths}"
            )
    return jnp.asarray(lengths, jnp.int32)


def _slots(slots: ArrayLike | None, batch: int, cache: KVCache) -> jax.Array:
    if slots is None:
        if batch > cache.batch:
            raise FerrumError.invalid_parameter(
                f"batch {batch} exceeds the cache's {cache.batch} rows"
            )
        return jnp.arange(batch, dtype=jnp.int32)
    if not isinstance(slots, jax.Array):
        slots = np.asarray(slots)
        if slots.shape != (batch,) or np.any(slots < 0) or np.any(slots >= cache.batch):
            raise FerrumError.invalid_parameter(
                f"slots must be [{batch}] rows of a {cache.batch}-row cache, got {slots}"
            )
        if len(set(slots.tolist())) != batch:
            raise FerrumError.invalid_parameter(f"slots must be distinct, got {slots}")
    return jnp.asarray(slots, jnp.int32)


def _pad_to(tokens, length: int):
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
    tokens = _token_ids(tokens, _vocab_size(params), 2)
    b, s = tokens.shape
    if s > cache.max_len:
        raise FerrumError.invalid_parameter(
            f"prompt of {s} tokens does not fit a cache of {cache.max_len}"
        )
    lengths = _lengths(lengths, b, s)
    slots = _slots(slots, b, cache)
    padded = _pad_to(tokens, bucket_length(s, cache.max_len))
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
    `[b, k, vocab]`; the caller keeps rows within `max_len` and may roll rows back with
    `set_lengths`.
    """
    tokens = _token_ids(tokens, _vocab_size(params), 2)
    b, k = tokens.shape
    lengths = _lengths(lengths, b, k)
    slots = _slots(slots, b, cache)
    padded = _pad_to(tokens, bucket_length(k, cache.max_len))
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
    their length. Returns logits `[b, vocab]` and the updated cache.
    """
    tokens = jnp.asarray(_token_ids(tokens, _vocab_size(params), 1), jnp.int32)
    b = tokens.shape[0]
    if slots is None:
        if b != cache.batch:
            raise FerrumError.invalid_parameter(
                f"decode without slots needs one token per cache row ({cache.batch}), got {b}"
            )
    else:
        slots = _slots(slots, b, cache)
    active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
    return decode_step(graphdef, params, cache, tokens, slots, active)


def set_lengths(cache: KVCache, slots: ArrayLike, lengths: ArrayLike) -> KVCache:
    """Sets the token count of rows `slots` (rolls back rejected speculative tokens)."""
    lengths = cache.lengths.at[jnp.asarray(slots, jnp.int32)].set(jnp.asarray(lengths, jnp.int32))
    return dataclasses.replace(cache, lengths=lengths)


def forward(
    graphdef: nnx.GraphDef, params: nnx.State, tokens: ArrayLike, lengths: ArrayLike | None = None
) -> jax.Array:
    """Full-sequence logits `[b, s, vocab]` of right-padded `tokens: [b, s]`, no cache kept."""
    tokens = _token_ids(tokens, _vocab_size(params), 2)
    b, s = tokens.shape
    lengths = _lengths(lengths, b, s)
    padded = _pad_to(tokens, max(bucket_length(s, 1 << 30), s))
    return forward_step(graphdef, params, padded, lengths)[:, :s]


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: ArrayLike,
    lengths: ArrayLike | None = None,
    *,
    max_new_tokens: int,
    row_max_new_tokens: ArrayLike | None = None,
    stop_tokens: ArrayLike | None = None,
    sampling: SamplingParams | None = None,
    keys: jax.Array | None = None,
    seed: int = 0,
) -> GenerateOutput:
    """Prefill and the whole token loop in one jitted program (`lax.while_loop`).

    `stop_tokens` is `[n]` for every row or `[b, n]` per row (pad with -1); default: the
    model's EOS ids. `row_max_new_tokens: [b]` caps rows below `max_new_tokens`. `keys: [b]`
    are per-row PRNG keys (default: split from `seed`); step t of row i draws with
    `fold_in(keys[i], t)`, so rows are independent of each other.
    """
    tokens = _token_ids(tokens, _vocab_size(params), 2)
    b, s = tokens.shape
    if max_new_tokens < 1:
        raise FerrumError.invalid_parameter(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = _lengths(lengths, b, s)
    bucket = bucket_length(s, 1 << 30)
    if row_max_new_tokens is None:
        row_max = jnp.full((b,), max_new_tokens, jnp.int32)
    else:
        row_max = jnp.minimum(jnp.asarray(row_max_new_tokens, jnp.int32), max_new_tokens)
    if stop_tokens is None:
        stop_tokens = nnx.merge(graphdef, params).config.eos_token_ids
    stop = jnp.asarray(stop_tokens, jnp.int32)
    if stop.ndim == 1:
        stop = jnp.broadcast_to(stop, (b, stop.shape[0]))
    if stop.ndim != 2 or stop.shape[0] != b:
        raise FerrumError.invalid_parameter(
            f"stop_tokens must be [n] or [{b}, n], got {stop.shape}"
        )
    if stop.shape[1] == 0:
        stop = jnp.full((b, 1), -1, jnp.int32)  # -1 never matches a token
    sampling = SamplingParams.greedy(b) if sampling is None else sampling
    keys = row_keys(seed, b) if keys is None else keys
    return generate_step(
        graphdef,
        params,
        _pad_to(tokens, bucket),
        lengths,
        row_max,
        jnp.asarray(stop, jnp.int32),
        sampling,
        keys,
        max_new_tokens=max_new_tokens,
        cache_len=bucket + max_new_tokens,
    )
