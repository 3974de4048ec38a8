"""`generate`: prefill and the whole sampling loop as one jitted program (`lax.while_loop`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.cache import init_cache
from ferrum_jax.engine.buckets import MIN_BUCKET, bucket
from ferrum_jax.engine.limits import check_context_length
from ferrum_jax.engine.steps import (
    ArrayLike,
    decode_body,
    pad_to,
    prefill_body,
    row_lengths,
    token_ids,
    vocab_size,
)
from ferrum_jax.errors import FerrumError
from ferrum_jax.models import attention
from ferrum_jax.models.llama import graph_facts
from ferrum_jax.sampling import SamplingParams, row_keys, sample_step


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


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "attention_impl")
)
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
    attention_impl="xla",
):
    model = nnx.merge(graphdef, params)
    batch = tokens.shape[0]
    cache = init_cache(model.config, batch, cache_len, model.dtype, attention_impl=attention_impl)
    rows = jnp.arange(batch, dtype=jnp.int32)
    logits, cache = prefill_body(model, cache, tokens, lengths, rows, all_logits=False)

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
        logits, cache = decode_body(model, cache, last, None, ~done)
        return step + 1, emit((cache, last, done, out, logps, count), logits, step)

    _, (_, _, _, out, logps, count) = jax.lax.while_loop(cond, body, (1, state))
    last = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    stopped = (count > 0) & jnp.any(last[:, None] == stop_tokens, axis=-1)
    return GenerateOutput(tokens=out, lengths=count, logprobs=logps, stopped=stopped)


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
    attention_impl: str = "auto",
) -> GenerateOutput:
    """Prefill and the whole token loop in one jitted program (`lax.while_loop`).

    `stop_tokens` is `[n]` for every row or `[b, n]` per row (pad with -1); default: the
    model's EOS ids. `row_max_new_tokens: [b]` caps rows below `max_new_tokens`. `keys: [b]`
    are per-row PRNG keys (default: split from `seed`); step t of row i draws with
    `fold_in(keys[i], t)`, so rows are independent of each other. The padded prompt width
    plus `max_new_tokens` must fit the model's context (`max_position_embeddings`).
    """
    tokens = token_ids(tokens, vocab_size(params), 2)
    b, s = tokens.shape
    if max_new_tokens < 1:
        raise FerrumError.invalid_parameter(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = row_lengths(lengths, b, s)
    check_context_length(s, max_new_tokens, graph_facts(graphdef)[0].max_position_embeddings)
    prompt_bucket = bucket(s, minimum=MIN_BUCKET)
    if row_max_new_tokens is None:
        row_max = jnp.full((b,), max_new_tokens, jnp.int32)
    else:
        row_max = jnp.minimum(jnp.asarray(row_max_new_tokens, jnp.int32), max_new_tokens)
    if stop_tokens is None:
        stop_tokens = graph_facts(graphdef)[0].eos_token_ids
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
    if not isinstance(sampling, SamplingParams) or sampling.temperature.shape != (b,):
        raise FerrumError.invalid_parameter(
            f"sampling must be SamplingParams for {b} rows, got "
            f"{getattr(getattr(sampling, 'temperature', None), 'shape', sampling)}"
        )
    keys = row_keys(seed, b) if keys is None else keys
    if np.shape(keys) != (b,):
        raise FerrumError.invalid_parameter(f"keys must be [{b}] PRNG keys, got {np.shape(keys)}")
    return generate_step(
        graphdef,
        params,
        pad_to(tokens, prompt_bucket),
        lengths,
        row_max,
        jnp.asarray(stop, jnp.int32),
        sampling,
        keys,
        max_new_tokens=max_new_tokens,
        cache_len=prompt_bucket + max_new_tokens,
        attention_impl=attention.resolve_implementation(attention_impl),
    )
