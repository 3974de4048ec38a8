"""Continuous batching of many generation requests over a `JaxModelExecutor`.

The loop keeps up to `max_batch_size` sequences running. Each iteration decodes one token
for every running sequence in one `batch_decode`, then fills the slots that finished with
new prompts in one `batch_prefill`. New prompts are admitted up to `prefill_tokens` prompt
tokens per iteration, so a burst of long prompts cannot stall the running sequences for
long (a prompt longer than that is admitted alone; the executor itself splits a prefill
into chunks when one step would not fit the device). Results come back as each sequence
finishes, not in input order.

Only the executor's public API is used (`batch_prefill`, `batch_decode`, `release_cache`),
so the loop can move to Ferrum's unified step without changing its callers. Sampling runs
here, on each row's last logits, with the keys `stream_tokens` uses: a request with seed
`s` draws the tokens `ferrum-jax generate --seed s` draws.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.engine.batch import check_token_ids
from ferrum_jax.engine.buckets import bucket
from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.interfaces import (
    DecodeInput,
    LogitsReturnPolicy,
    PrefillInput,
    TokenSelectionMask,
)
from ferrum_jax.sampling import SamplingParams, check_seed, row_keys, sample, token_logprobs
from ferrum_jax.tensor import as_jax_array
from ferrum_jax.text.answer import AnswerText
from ferrum_jax.text.grammar import Constraint
from ferrum_jax.text.tokenizer import Tokenizer

T = TypeVar("T")

DEFAULT_PREFILL_TOKENS = 2048
"""Prompt tokens admitted per iteration (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete."""

    prompt_ids: Sequence[int]
    """The prompt's token ids (chat template already applied, if any)."""
    max_new_tokens: int
    """Most tokens to generate; the prompt plus this must fit the executor's sequences."""
    temperature: float = 0.0
    """0 is greedy."""
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    """Seeds this request's own key: its tokens do not depend on the other requests."""
    stop: Sequence[str] = ()
    """Stop strings: the answer ends before the first one that appears."""
    stop_token_ids: Sequence[int] | None = None
    """Tokens that end generation (kept in `token_ids`); None: the tokenizer's EOS ids."""
    key: Any = None
    """The caller's name for the request, returned with its result."""
    constraint: Constraint | None = None
    """The answer must match this JSON schema or regex (`Constraint.json_schema`,
    `Constraint.regex`): every token is picked among the ones it allows, and once it is
    complete only EOS is."""


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A finished request."""

    key: Any
    """`GenerationRequest.key`."""
    index: int
    """Position of the request in the input."""
    text: str
    """The answer: generated text with special tokens skipped, cut before the first stop
    string."""
    token_ids: list[int]
    """Every generated token, the stop token (or the token completing a stop string)
    included."""
    finish_reason: str
    """`"stop"` (a stop token or stop string) or `"length"` (`max_new_tokens`)."""
    prompt_tokens: int


def check_request(request: GenerationRequest, *, vocab: int, max_sequence_length: int) -> None:
    """Raises a `FerrumError` naming what is wrong with `request` (nothing is allocated)."""
    if not isinstance(request, GenerationRequest):
        raise FerrumError.invalid_parameter(f"expected a GenerationRequest, got {request!r}")
    if len(request.prompt_ids) == 0:
        raise FerrumError.request_validation("empty prompt: prompt_ids has no tokens")
    ids = np.asarray(check_token_ids(list(request.prompt_ids), vocab, "prompt_ids"))
    if ids.ndim != 1:
        raise FerrumError.invalid_parameter(f"prompt_ids must be 1-D, got shape {ids.shape}")
    if isinstance(request.max_new_tokens, bool) or not isinstance(request.max_new_tokens, int):
        raise FerrumError.invalid_parameter(
            f"max_new_tokens must be an integer, got {request.max_new_tokens!r}"
        )
    if request.max_new_tokens < 1:
        raise FerrumError.invalid_parameter(
            f"max_new_tokens must be >= 1, got {request.max_new_tokens}"
        )
    if ids.size + request.max_new_tokens > max_sequence_length:
        raise FerrumError.invalid_parameter(
            f"the prompt is {ids.size} tokens and max_new_tokens is {request.max_new_tokens}: "
            f"{ids.size + request.max_new_tokens} tokens exceed the {max_sequence_length} "
            "a sequence may hold"
        )
    check_seed(request.seed)
    # Ranges of the sampling parameters, in SamplingParams' own words.
    SamplingParams.make(
        1,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        min_p=request.min_p,
    )
    if request.constraint is not None and not isinstance(request.constraint, Constraint):
        raise FerrumError.invalid_parameter(
            f"constraint must be a Constraint, got {request.constraint!r}"
        )
    if any(not isinstance(s, str) or not s for s in request.stop):
        raise FerrumError.invalid_parameter(
            f"stop strings must be non-empty strings, got {list(request.stop)!r}"
        )


@jax.jit
def _sample_rows(
    logits: jax.Array,
    sampling: SamplingParams,
    keys: jax.Array,
    steps: jax.Array,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Row `i` draws with `fold_in(keys[i], steps[i])`: each row at its own step, the keys
    `sample_step` folds for a one-row stream. `mask` (`[rows, vocab]` bool, None: all
    allowed) sends forbidden ids to -inf before any filter, greedy rows included."""
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    token = sample(logits, sampling, step_keys)
    return token, token_logprobs(logits, token)


class _Row:
    """A running sequence: its request, cache handle and answer so far."""

    def __init__(
        self, index: int, request: GenerationRequest, tokenizer: Tokenizer, vocab_size: int
    ) -> None:
        self.index = index
        self.request = request
        self.handle: Any = None
        self.tokens: list[int] = []
        self.answer = AnswerText(tokenizer, request.stop)
        stops = request.stop_token_ids
        self.stop_ids = frozenset(tokenizer.eos_token_ids if stops is None else stops)
        # The key `stream_tokens(seed=s)` starts from, as raw data so rows stack.
        self.key = np.asarray(jax.random.key_data(row_keys(request.seed, 1))[0])
        self.finish: str | None = None
        constraint = request.constraint
        self.matcher = None if constraint is None else constraint.matcher(tokenizer, vocab_size)
        self.mask = None if self.matcher is None else self.matcher.allowed()
        """The ids the constraint allows next, `[vocab]` bool; None: unconstrained."""

    def policy(self) -> LogitsReturnPolicy:
        """A constrained greedy row's token is picked on the device, under its mask."""
        if self.mask is None or self.request.temperature > 0:
            return LogitsReturnPolicy.FullLogits
        return LogitsReturnPolicy.GreedyArgmax(token_mask=TokenSelectionMask.new(self.mask))

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.matcher is not None:
            self.matcher.accept(token)
        if token in self.stop_ids:
            self.finish = "stop"
            return
        self.answer.push(token)
        # A matcher stops on EOS, or after a token past which its grammar allows nothing.
        if self.answer.matched is not None or (self.matcher and self.matcher.is_stopped()):
            self.finish = "stop"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish = "length"
        if self.finish is None and self.matcher is not None:
            self.mask = self.matcher.allowed()

    def result(self) -> GenerationResult:
        self.answer.finish()
        return GenerationResult(
            key=self.request.key,
            index=self.index,
            text=self.answer.text,
            token_ids=list(self.tokens),
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.request.prompt_ids),
        )


class _Loop:
    """An event loop on a thread of its own: the executor's coroutines run on it whether or
    not the caller is inside an event loop already (a notebook)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def generate_batch(
    executor: JaxModelExecutor,
    requests: Iterable[GenerationRequest],
    *,
    tokenizer: Tokenizer | None = None,
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
    on_tokens: Callable[[int], None] | None = None,
) -> Iterator[GenerationResult]:
    """Runs every request through `executor` with continuous batching; yields each result
    as its sequence finishes.

    Every request is checked (`check_request`) before any runs: one bad request raises a
    `FerrumError` naming its index and nothing is generated. `tokenizer` defaults to the
    executor's. `on_tokens(n)` is told how many tokens each step generated (progress bars).
    Sequences still running when the caller stops iterating are released.
    """
    tokenizer = tokenizer or executor.tokenizer
    if tokenizer is None:
        raise FerrumError.tokenizer("batch generation needs a tokenizer; the model ships none")
    if prefill_tokens < 1:
        raise FerrumError.invalid_parameter(f"prefill_tokens must be >= 1, got {prefill_tokens}")
    vocab = executor.model.config.vocab_size
    pending: collections.deque[_Row] = collections.deque()
    for i, request in enumerate(requests):
        try:
            check_request(request, vocab=vocab, max_sequence_length=executor.max_sequence_length)
        except FerrumError as e:
            raise type(e)(e.kind, f"request {i}: {e.message}") from None
        pending.append(_Row(i, request, tokenizer, vocab))
    return _run(executor, pending, prefill_tokens, on_tokens)


def _run(
    executor: JaxModelExecutor,
    pending: collections.deque[_Row],
    prefill_tokens: int,
    on_tokens: Callable[[int], None] | None,
) -> Iterator[GenerationResult]:
    loop = _Loop()
    running: list[_Row] = []
    try:
        while pending or running:
            if running:
                inputs = [
                    DecodeInput(
                        np.asarray([[row.tokens[-1]]], np.int32),
                        row.handle,
                        logits_policy=row.policy(),
                    )
                    for row in running
                ]
                outputs = loop.run(executor.batch_decode(inputs))
                _step(running, [as_jax_array(o.logits) for o in outputs], on_tokens)
            admitted = _admit(pending, executor.max_batch_size - len(running), prefill_tokens)
            if admitted:
                inputs = [
                    PrefillInput(np.asarray([row.request.prompt_ids], np.int32)) for row in admitted
                ]
                outputs = loop.run(executor.batch_prefill(inputs))
                for row, output in zip(admitted, outputs, strict=True):
                    row.handle = output.kv_cache
                # Each prompt's last position: the distribution of its first new token.
                last = [as_jax_array(o.logits)[:, -1] for o in outputs]  # [1, vocab] each
                _step(admitted, last, on_tokens)
                running.extend(admitted)
            still = []
            for row in running:
                if row.finish is None:
                    still.append(row)
                    continue
                executor.release_cache(row.handle.cache_id())
                yield row.result()
            running = still
    finally:
        for row in running:
            executor.release_cache(row.handle.cache_id())
        loop.close()


def _admit(pending: collections.deque[_Row], free: int, budget: int) -> list[_Row]:
    admitted: list[_Row] = []
    while pending and len(admitted) < free:
        n = len(pending[0].request.prompt_ids)
        if admitted and n > budget:
            break
        admitted.append(pending.popleft())
        budget -= n
    return admitted


def _step(
    rows: list[_Row], logits: list[jax.Array], on_tokens: Callable[[int], None] | None
) -> None:
    """Picks one token for each row from its `[1, vocab]` logits, or takes the `[token_id]`
    the device already picked (a constrained greedy row's `GreedyArgmax`).

    Unconstrained greedy rows take their argmax on the host (one `[rows, vocab]` copy, no
    program per batch shape); sampled and constrained rows run the jitted sampler on the
    logits where they are, under their masks, padded to a power of two of rows.
    """
    tokens = np.zeros(len(rows), np.int64)
    on_host: list[int] = []
    on_device: list[int] = []
    for i, (row, x) in enumerate(zip(rows, logits, strict=True)):
        if x.size == 1:
            tokens[i] = int(np.asarray(jax.device_get(x)).reshape(-1)[0])
        elif row.request.temperature > 0 or row.mask is not None:
            on_device.append(i)
        else:
            on_host.append(i)
    if on_host:
        host = np.concatenate([np.asarray(jax.device_get(logits[i]), np.float32) for i in on_host])
        tokens[on_host] = np.argmax(host, axis=-1)
    if on_device:
        tokens[on_device] = _sample([logits[i] for i in on_device], [rows[i] for i in on_device])
    for row, token in zip(rows, tokens.tolist(), strict=True):
        row.add(int(token))
    if on_tokens is not None:
        on_tokens(len(rows))


def _sample(logits: list[jax.Array], rows: list[_Row]) -> np.ndarray:
    n = len(rows)
    padded = bucket(n)
    every = [*rows, *[rows[0]] * (padded - n)]  # padding rows repeat row 0
    r = [row.request for row in every]
    sampling = SamplingParams.make(
        padded,
        temperature=np.array([q.temperature for q in r], np.float32),
        top_k=np.array([q.top_k for q in r], np.int32),
        top_p=np.array([q.top_p for q in r], np.float32),
        min_p=np.array([q.min_p for q in r], np.float32),
    )
    keys = jax.random.wrap_key_data(jnp.asarray(np.stack([row.key for row in every])))
    steps = jnp.asarray([len(row.tokens) for row in every], jnp.int32)
    stacked = jnp.concatenate([*logits, *[logits[0]] * (padded - n)]).astype(jnp.float32)
    mask = None
    if any(row.mask is not None for row in rows):
        vocab = stacked.shape[-1]
        mask = np.stack(
            [np.ones(vocab, np.bool_) if row.mask is None else row.mask for row in every]
        )
    tokens, _ = _sample_rows(stacked, sampling, keys, steps, mask)
    return np.asarray(jax.device_get(tokens))[:n]
