"""Scoring: log-probabilities of continuations given contexts, and rolling-window perplexity.

What evaluation harnesses ask of a model besides generation: for each `(context,
continuation)` pair, the summed log-probability of the continuation's tokens, whether greedy
decoding would have produced exactly that continuation, and each token's log-probability.

Pairs are packed as items of one flat ragged step (no per-row padding), sorted longest first
so a batch holds similar lengths, at most `max_tokens` tokens per step. The step runs the
model, the log-softmax and the gather in one jitted program (`score_step`), so only `[T]`
log-probs and greedy flags come back to the host, never `[T, vocab]` logits. It compiles
once per (token bucket, item bucket); the LM head runs on every token row rather than only
the continuation's, which keeps one bucket dimension fewer (fewer programs) at the cost of
the head on context rows (about a fifth of a small model's work per token). Params are
arguments: new weights of the same shapes reuse the programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.cache import PAGE_SIZE, init_pages
from ferrum_jax.engine.batch import check_token_ids
from ferrum_jax.engine.buckets import bucket
from ferrum_jax.engine.ragged import MIN_TOKEN_BUCKET, RaggedItem, pack_ragged
from ferrum_jax.errors import FerrumError
from ferrum_jax.models import attention
from ferrum_jax.models.llama import graph_facts

DEFAULT_MAX_TOKENS = 2048
"""Tokens per scoring step: bounds the step's `[T, vocab]` float32 logits (400 MB for a
50k vocabulary). A single pair longer than this gets a step of its own."""


@dataclasses.dataclass(frozen=True)
class Score:
    """The score of one continuation (or of one whole text, for `rolling_loglikelihood`)."""

    logprob: float
    """Sum of `token_logprobs`."""
    is_greedy: bool
    """Every token is the argmax of the model's distribution at its position."""
    token_logprobs: np.ndarray
    """`[n]` float32: log-probability of each scored token given everything before it."""


@functools.partial(jax.jit, static_argnames=("graphdef", "page_size", "attention_impl"))
def score_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    targets: jax.Array,
    page_size: int = PAGE_SIZE,
    attention_impl: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """Log-prob `[T]` of `targets[t]` after flat token `t`, and whether it is the argmax.

    Items are whole sequences from position 0 over fresh pages of their own (the pool lives
    only inside the program): `page_table` rows from `pack_ragged`.
    """
    model = nnx.merge(graphdef, params)
    config, dtype = graph_facts(graphdef)
    num_pages = -(-tokens.shape[0] // page_size) + kv_lens.shape[0]
    pages = init_pages(config, num_pages, page_size, dtype, attention_impl)
    meta = attention.metadata(
        cu_q_lens,
        kv_lens,
        page_table,
        num_tokens=tokens.shape[0],
        page_size=page_size,
        num_pages=num_pages,
    )
    logits, _ = model(tokens, meta, pages, None, attention_impl)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    logprobs = picked - jax.nn.logsumexp(logits, axis=-1)
    return logprobs, jnp.argmax(logits, axis=-1) == targets


def _ids(seq: Sequence[int], vocab: int, what: str) -> np.ndarray:
    # Emptiness first: an empty list reads as float64, which the id check would name instead.
    try:
        empty = len(seq) == 0
    except TypeError:  # a scalar has no length; the shape check below names it
        empty = False
    if empty:
        raise FerrumError.invalid_parameter(f"{what} is empty: it needs at least one token id")
    ids = np.asarray(check_token_ids(seq, vocab, what))
    if ids.ndim != 1:
        raise FerrumError.invalid_parameter(
            f"{what} must be a 1-D sequence of token ids, got shape {ids.shape}"
        )
    return ids.astype(np.int32)


def _count(value: object, name: str) -> int:
    """`value` when it is an integer >= 1; bools and floats are refused (1.5 tokens, or
    True read as 1, would otherwise pass a `< 1` check)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise FerrumError.invalid_parameter(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def score(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    attention_impl: str = "auto",
) -> list[Score]:
    """Scores each continuation after its context: one `Score` per pair, in input order.

    `contexts[i]` and `continuations[i]` are token ids, each at least one token (a text with
    no context scores from a prefix token, e.g. BOS: the caller's choice). Their total minus
    one must fit the model's context (`max_position_embeddings`); truncating is the caller's
    policy. Pairs run `max_tokens` tokens per step (one longer pair runs alone).
    """
    if len(contexts) != len(continuations):
        raise FerrumError.invalid_parameter(
            f"{len(contexts)} contexts but {len(continuations)} continuations"
        )
    max_tokens = _count(max_tokens, "max_tokens")
    config, _ = graph_facts(graphdef)
    vocab, context = config.vocab_size, config.max_position_embeddings
    pairs = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
        ctx_ids = _ids(ctx, vocab, f"context {i}")
        cont_ids = _ids(cont, vocab, f"continuation {i}")
        whole = np.concatenate([ctx_ids, cont_ids])
        if len(whole) - 1 > context:
            raise FerrumError.invalid_parameter(
                f"pair {i}: context ({len(ctx_ids)} tokens) and continuation "
                f"({len(cont_ids)} tokens) need {len(whole) - 1} positions, more than the "
                f"model's context of {context}; truncate the context"
            )
        pairs.append((whole, len(cont_ids)))
    impl = attention.resolve_implementation(attention_impl)
    results: list[Score | None] = [None] * len(pairs)
    # Longest first, as lm-eval sorts: a step holds similar lengths, and the largest program
    # (the likeliest to fail for memory) runs first.
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    batch: list[int] = []
    tokens = 0
    for i in order:
        n = len(pairs[i][0]) - 1
        if batch and tokens + n > max_tokens:
            _score_batch(graphdef, params, [pairs[j] for j in batch], batch, results, impl)
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        _score_batch(graphdef, params, [pairs[j] for j in batch], batch, results, impl)
    return results  # type: ignore[return-value]


def _score_batch(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    pairs: list[tuple[np.ndarray, int]],
    where: list[int],
    results: list[Score | None],
    attention_impl: str,
) -> None:
    total = sum(len(whole) - 1 for whole, _ in pairs)
    tokens_bucket = bucket(total, minimum=MIN_TOKEN_BUCKET)
    items_bucket = bucket(len(pairs))
    pages_per_item = -(-tokens_bucket // PAGE_SIZE)
    num_pages = pages_per_item + items_bucket  # `score_step`'s pool: what its items use
    items, first_page = [], 0
    for whole, _ in pairs:
        n = len(whole) - 1
        used = -(-n // PAGE_SIZE)
        items.append(RaggedItem(whole[:-1], 0, range(first_page, first_page + used), "none"))
        first_page += used
    packed = pack_ragged(items, pages_per_item=pages_per_item, num_pages=num_pages)
    if len(packed.tokens) != tokens_bucket or len(packed.kv_lens) != items_bucket:
        raise FerrumError.internal("score: pack_ragged chose other buckets than the pool's")
    targets = np.zeros_like(packed.tokens)
    for k, (whole, _) in enumerate(pairs):
        targets[packed.cu_q_lens[k] : packed.cu_q_lens[k + 1]] = whole[1:]
    logprobs, greedy = jax.device_get(
        score_step(
            graphdef,
            params,
            jnp.asarray(packed.tokens),
            jnp.asarray(packed.cu_q_lens),
            jnp.asarray(packed.kv_lens),
            jnp.asarray(packed.page_table),
            jnp.asarray(targets),
            attention_impl=attention_impl,
        )
    )
    for k, (_, cont_len) in enumerate(pairs):
        end = int(packed.cu_q_lens[k + 1])
        token_logprobs = np.asarray(logprobs[end - cont_len : end], np.float32)
        results[where[k]] = Score(
            logprob=float(token_logprobs.sum(dtype=np.float64)),
            is_greedy=bool(np.all(greedy[end - cont_len : end])),
            token_logprobs=token_logprobs,
        )


def rolling_windows(
    tokens: Sequence[int], *, prefix_token: int, max_length: int, context_len: int = 1
) -> list[tuple[list[int], list[int]]]:
    """`(context, continuation)` windows scoring every token of `tokens` exactly once.

    lm-eval's `get_rolling_token_windows` + `make_disjoint_window`: the first window predicts
    from `prefix_token` (e.g. BOS/EOS) up to `max_length` tokens; each later window predicts
    the next `max_length - context_len + 1` tokens with a full `max_length`-token input, the
    tokens before its first prediction as context.
    """
    if not 1 <= context_len <= max_length:
        raise FerrumError.invalid_parameter(
            f"context_len must be in [1, max_length {max_length}], got {context_len}"
        )
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_length - context_len + 1
    first = min(max_length, len(tokens))
    windows = [([prefix_token, *tokens[: first - 1]], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        windows.append((tokens[end - max_length - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    # Disjoint: the input's last len(continuation) - 1 tokens are the continuation's head.
    return [(inp[: len(inp) - (len(pred) - 1)], pred) for inp, pred in windows]


def rolling_loglikelihood(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    texts: Sequence[Sequence[int]],
    *,
    prefix_token: int,
    max_length: int | None = None,
    context_len: int = 1,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    attention_impl: str = "auto",
) -> list[Score]:
    """Log-likelihood of each whole token sequence, however long: one `Score` per text.

    Texts longer than `max_length` (default: the model's context) are cut into the windows
    of `rolling_windows`, as lm-eval's `loglikelihood_rolling` does; every token is scored
    once, conditioned on up to `max_length` tokens before it (the first on `prefix_token`).
    `token_logprobs` covers every token of the text (at least one: an empty text is
    refused). Windows of all texts share steps.
    """
    config, _ = graph_facts(graphdef)
    max_length = config.max_position_embeddings if max_length is None else max_length
    _count(max_length, "max_length")
    _count(max_tokens, "max_tokens")  # before any window is cut, not at the first step
    if max_length > config.max_position_embeddings:
        raise FerrumError.invalid_parameter(
            f"max_length must be in [1, {config.max_position_embeddings}] (the model's "
            f"context), got {max_length}"
        )
    check_token_ids([prefix_token], config.vocab_size, "prefix_token")
    contexts, continuations, owner = [], [], []
    for i, text in enumerate(texts):
        ids = _ids(text, config.vocab_size, f"text {i}")
        for ctx, cont in rolling_windows(
            ids.tolist(), prefix_token=prefix_token, max_length=max_length, context_len=context_len
        ):
            contexts.append(ctx)
            continuations.append(cont)
            owner.append(i)
    scores = score(
        graphdef,
        params,
        contexts,
        continuations,
        max_tokens=max_tokens,
        attention_impl=attention_impl,
    )
    parts: list[list[Score]] = [[] for _ in texts]
    for i, s in zip(owner, scores, strict=True):
        parts[i].append(s)
    return [
        Score(
            logprob=float(sum(w.logprob for w in windows)),
            is_greedy=all(w.is_greedy for w in windows),
            token_logprobs=np.concatenate([w.token_logprobs for w in windows]),
        )
        for windows in parts
    ]
