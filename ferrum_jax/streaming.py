"""Token-by-token generation for streaming: one jitted decode + sample per token."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax import engine
from ferrum_jax.cache import init_cache
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.llama import graph_facts
from ferrum_jax.sampling import SamplingParams, row_keys, sample_step

_MIN_CACHE = 256
"""Smallest cache: short prompts and budgets share one decode program."""


@dataclasses.dataclass(frozen=True)
class StreamedToken:
    """One generated token."""

    token_id: int
    """The sampled token."""
    logprob: float
    """Its log-probability under the model."""
    stop: bool
    """It is a stop token (generation ends after it)."""


_pick = jax.jit(sample_step)


def stream_tokens(
    model: Model | nnx.GraphDef,
    *args: nnx.State | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    timings: dict[str, float] | None = None,
) -> Iterator[StreamedToken]:
    """Yields tokens as they are generated, with the same per-step keys as `engine.generate`.

    Called as `stream_tokens(model, prompt, ...)` with a `Model`, or as
    `stream_tokens(graphdef, params, prompt, ...)`. `stop_tokens` default to the model's EOS
    ids, as in `engine.generate`. `timings`, if given, receives `prefill_s` (time to first
    token) and `decode_s`.
    """
    if isinstance(model, Model):
        graphdef, params, (prompt,) = model.graphdef, model.params, args
    else:
        graphdef, (params, prompt) = model, args
    if not prompt:
        raise FerrumError.request_validation("empty prompt")
    if max_new_tokens < 1:
        raise FerrumError.invalid_parameter(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config, dtype = graph_facts(graphdef)
    # Power-of-two cache lengths: prompts and token budgets of different sizes share one
    # decode program instead of compiling one per length.
    needed = engine.bucket(len(prompt), minimum=engine.MIN_BUCKET) + max_new_tokens
    cache = init_cache(config, 1, engine.bucket(needed, minimum=_MIN_CACHE), dtype)
    sampling = sampling or SamplingParams.greedy(1)
    keys = row_keys(seed, 1)
    stops = set(config.eos_token_ids if stop_tokens is None else stop_tokens)
    timings = {} if timings is None else timings
    start = time.perf_counter()
    logits, cache = engine.prefill(graphdef, params, cache, np.asarray([prompt], np.int32))
    for step in range(max_new_tokens):
        token, logprob = _pick(logits, sampling, keys, jnp.int32(step))
        token_id = int(token[0])
        if step == 0:
            timings["prefill_s"] = time.perf_counter() - start
            start = time.perf_counter()
        stop = token_id in stops
        yield StreamedToken(token_id, float(logprob[0]), stop)
        if stop or step == max_new_tokens - 1:
            break
        logits, cache = engine.decode(graphdef, params, cache, token)
    timings["decode_s"] = time.perf_counter() - start
