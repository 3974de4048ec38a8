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
from ferrum_jax.cache import KVCache, init_cache
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig
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

_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        # XLA's compile, or the read from the compilation cache that replaces it.
        "/jax/core/compile/backend_compile_duration",
    }
)
_compile_seconds = 0.0
"""Seconds this process has spent making programs: tracing, lowering, compiling."""


def _count_compile(event: str, duration: float, **_: object) -> None:
    global _compile_seconds
    if event in _COMPILE_EVENTS:
        _compile_seconds += duration


# Always on: a stream's timings split compiling from running. A cold 16-token `generate`
# of SmolLM2 on a busy 2-core AMD EPYC: first token after 7.51 s, 7.45 s of it compiling;
# the decode step then compiled for 6.06 s, which counted as decoding gave ~2 tokens/s
# instead of the 15.4 it runs at. Compiles in other threads during a stream count too.
jax.monitoring.register_event_duration_secs_listener(_count_compile)


def clock() -> tuple[float, float]:
    """`(wall seconds, compile seconds so far)`: where a stream's timings start."""
    return time.perf_counter(), _compile_seconds


def cache_length(tokens: int, config: ModelConfig) -> int:
    """Cache positions for `tokens` tokens: a power of two, so prompts and budgets of
    different sizes share one decode program, but never more than the model's context."""
    return min(engine.bucket(tokens, minimum=_MIN_CACHE), config.max_position_embeddings)


def stream_tokens(
    model: Model | nnx.GraphDef,
    *args: nnx.State | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    timings: dict[str, float] | None = None,
    attention_impl: str = "auto",
) -> Iterator[StreamedToken]:
    """Yields tokens as they are generated, with the same per-step keys as `engine.generate`.

    Called as `stream_tokens(model, prompt, ...)` with a `Model`, or as
    `stream_tokens(graphdef, params, prompt, ...)`. `stop_tokens` default to the model's EOS
    ids, as in `engine.generate`; the stop token is yielded (with `stop=True`), then the
    stream ends. The prompt plus `max_new_tokens` must fit the model's context
    (`max_position_embeddings`), checked before anything is allocated. `timings`, if given,
    holds `prefill_s` (time to the first token), `compile_s` (the part of it spent compiling),
    `decode_s` (first to latest token) and `decode_compile_s` (the part of it spent
    compiling), updated as each token is yielded, so they are right however early the caller
    stops.
    `attention_impl`: see `models.attention.IMPLEMENTATIONS` (`"auto"`: by platform).
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
    engine.check_context_length(len(prompt), max_new_tokens, config.max_position_embeddings)
    keys = row_keys(seed, 1)  # checks the seed before the cache is allocated
    cache = init_cache(
        config,
        1,
        cache_length(len(prompt) + max_new_tokens, config),
        dtype,
        attention_impl=attention_impl,
    )
    start = clock()
    logits, cache = engine.prefill(graphdef, params, cache, np.asarray([prompt], np.int32))
    for token, _ in continue_stream(
        graphdef,
        params,
        cache,
        logits,
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingParams.greedy(1),
        keys=keys,
        stop_tokens=config.eos_token_ids if stop_tokens is None else stop_tokens,
        timings={} if timings is None else timings,
        start=start,
    ):
        yield token


def continue_stream(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    logits: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    keys: jax.Array,
    stop_tokens: Sequence[int],
    timings: dict[str, float],
    start: tuple[float, float],
) -> Iterator[tuple[StreamedToken, KVCache]]:
    """Samples from a one-row cache's next-token `logits`, feeding each token back.

    Yields each token with the cache holding every token before it (the prompt and the
    tokens already yielded): a caller that keeps the last cache it saw can continue the
    sequence later (a chat session). That cache is donated to the next decode step, so it
    stays valid only while the stream is not resumed. `start` is the `clock()` when the prefill
    began (for `prefill_s` and `compile_s`, see `stream_tokens`).
    """
    stops = set(stop_tokens)
    first = start
    for step in range(max_new_tokens):
        token, logprob = _pick(logits, sampling, keys, jnp.int32(step))
        token_id = int(token[0])
        now = clock()
        if step == 0:
            timings["prefill_s"] = now[0] - start[0]
            timings["compile_s"] = now[1] - start[1]
            first = now
        timings["decode_s"] = now[0] - first[0]
        timings["decode_compile_s"] = now[1] - first[1]
        stop = token_id in stops
        yield StreamedToken(token_id, float(logprob[0]), stop), cache
        if stop or step == max_new_tokens - 1:
            return
        logits, cache = engine.decode(graphdef, params, cache, token)
