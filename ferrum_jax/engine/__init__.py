"""The pure engine: jitted steps over params and a KV cache, generation, batch packing.

`graphdef` and `params` come from `nnx.split(model)` (or a `ferrum_jax.Model`). Params are
always arguments, never closed over, so new weights with the same shapes reuse the compiled
programs; caches are donated, so each step updates them in place.
"""

from ferrum_jax.cache import KVCache, init_cache, init_pages
from ferrum_jax.engine.batch import (
    RowBatch,
    TokenBatch,
    check_token_ids,
    pack_rows,
    pack_tokens,
    pad_slot,
    padding_rows,
    padding_tokens,
)
from ferrum_jax.engine.buckets import MIN_BUCKET, bucket, bucket_length, buckets
from ferrum_jax.engine.generate import GenerateOutput, generate, generate_step
from ferrum_jax.engine.greedy import MIN_PENALTY_BUCKET, GreedyRows, greedy_argmax, pack_greedy
from ferrum_jax.engine.limits import check_context_length
from ferrum_jax.engine.ragged import (
    MIN_TOKEN_BUCKET,
    RaggedBatch,
    RaggedItem,
    pack_ragged,
    ragged_forward,
    ragged_step,
    run_ragged,
)
from ferrum_jax.engine.score import (
    Score,
    rolling_loglikelihood,
    rolling_windows,
    score,
    score_step,
)
from ferrum_jax.engine.steps import (
    decode,
    decode_step,
    extend,
    extend_step,
    forward,
    forward_step,
    prefill,
    prefill_step,
    set_lengths,
)


def compile_counts() -> dict[str, int]:
    """Programs compiled so far per entry point (for tests and `warmup` reports)."""
    fns = {
        "prefill": prefill_step,
        "extend": extend_step,
        "decode": decode_step,
        "forward": forward_step,
        "generate": generate_step,
        "ragged": ragged_step,
        "score": score_step,
    }
    return {name: fn._cache_size() for name, fn in fns.items()}


__all__ = [
    "MIN_BUCKET",
    "MIN_PENALTY_BUCKET",
    "MIN_TOKEN_BUCKET",
    "GenerateOutput",
    "GreedyRows",
    "KVCache",
    "RaggedBatch",
    "RaggedItem",
    "RowBatch",
    "Score",
    "TokenBatch",
    "bucket",
    "bucket_length",
    "buckets",
    "check_context_length",
    "check_token_ids",
    "compile_counts",
    "decode",
    "decode_step",
    "extend",
    "extend_step",
    "forward",
    "forward_step",
    "generate",
    "generate_step",
    "greedy_argmax",
    "init_cache",
    "init_pages",
    "pack_greedy",
    "pack_ragged",
    "pack_rows",
    "pack_tokens",
    "pad_slot",
    "padding_rows",
    "padding_tokens",
    "prefill",
    "prefill_step",
    "ragged_forward",
    "ragged_step",
    "rolling_loglikelihood",
    "rolling_windows",
    "run_ragged",
    "score",
    "score_step",
    "set_lengths",
]
