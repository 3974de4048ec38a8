"""`ChatSession`: a multi-turn conversation whose tokens stay in one KV cache row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from ferrum_jax import engine
from ferrum_jax.cache import KVCache, init_cache
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.attention import resolve_implementation
from ferrum_jax.sampling import SamplingParams, row_keys
from ferrum_jax.streaming import StreamedToken, cache_length, clock, continue_stream
from ferrum_jax.text.tokenizer import Tokenizer


class ChatSession:
    """A conversation with `model` through its chat template, kept in a KV cache between turns.

    Each turn renders the whole conversation with the template and prefills only what the
    cache does not already hold: the cached tokens are kept up to where they agree with the
    rendered ones (a template that rewrites history, or an answer whose text re-tokenises
    differently, only rolls the cache back to that point). So every answer is the one
    `stream_tokens` gives for the whole rendered conversation, and a turn costs a prefill of
    the new message, not of the history.
    """

    def __init__(
        self,
        model: Model,
        *,
        tokenizer: Tokenizer | None = None,
        system: str | None = None,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_tokens: Sequence[int] | None = None,
        attention_impl: str = "auto",
    ) -> None:
        """`tokenizer` defaults to the model's; it must have a chat template. `stop_tokens`
        default to the tokenizer's end-of-generation ids, else the config's EOS ids.
        `attention_impl`: see `models.attention.IMPLEMENTATIONS` (`"auto"`: by platform)."""
        self.model = model
        self.tokenizer = tokenizer or model.tokenizer
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise FerrumError.tokenizer(f"{model.source} has no chat template; cannot chat")
        self.messages: list[dict[str, Any]] = (
            [{"role": "system", "content": system}] if system else []
        )
        """The conversation so far (system, user and assistant messages)."""
        self.sampling = sampling or SamplingParams.greedy(1)
        self.stop_tokens = tuple(
            stop_tokens
            if stop_tokens is not None
            else self.tokenizer.eos_token_ids or model.config.eos_token_ids
        )
        self._keys = row_keys(seed, 1)
        self._attention_impl = resolve_implementation(attention_impl)
        self._cache: KVCache | None = None
        self._cached: list[int] = []  # the tokens whose keys/values the cache row holds
        self._turns = 0

    @property
    def context(self) -> int:
        """The model's context length: the whole conversation plus an answer must fit."""
        return self.model.config.max_position_embeddings

    def prompt_ids(self, text: str) -> list[int]:
        """The tokens the model sees for the next turn if the user says `text`."""
        return self.tokenizer.encode_chat([*self.messages, {"role": "user", "content": text}])

    def send(
        self, text: str, *, max_new_tokens: int, timings: dict[str, float] | None = None
    ) -> Iterator[StreamedToken]:
        """Adds the user message `text` and streams the answer (the stop token included).

        Record what was answered with `add_answer`. Raises before anything runs when the
        conversation plus `max_new_tokens` does not fit the model's context.
        """
        ids = self.prompt_ids(text)
        engine.check_context_length(len(ids), max_new_tokens, self.context, prompt="conversation")
        self.messages.append({"role": "user", "content": text})
        start = clock()
        logits = self._prefill(ids, max_new_tokens)
        # Each turn draws from its own keys: the same step of two turns must not share one.
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(self._keys, self._turns)
        self._turns += 1
        previous: int | None = None
        for token, cache in continue_stream(
            self.model.graphdef,
            self.model.params,
            self._cache,
            logits,
            max_new_tokens=max_new_tokens,
            sampling=self.sampling,
            keys=keys,
            stop_tokens=self.stop_tokens,
            timings={} if timings is None else timings,
            start=start,
        ):
            # `cache` holds every token before this one: kept before yielding, so a caller
            # that stops early leaves the session consistent.
            if previous is not None:
                self._cached.append(previous)
            self._cache, previous = cache, token.token_id
            yield token

    def add_answer(self, text: str) -> None:
        """Appends the assistant's answer (the text shown for the last `send`)."""
        self.messages.append({"role": "assistant", "content": text})

    def _prefill(self, ids: list[int], max_new_tokens: int) -> jax.Array:
        """Writes what the cache lacks of `ids`; returns the logits after the last of them."""
        graphdef, params = self.model.graphdef, self.model.params
        needed = len(ids) + max_new_tokens
        if self._cache is None or self._cache.max_len < needed:
            # A bigger cache starts empty: growing it re-prefills the conversation once,
            # and doubling sizes keep that rare.
            config = self.model.runtime_config
            self._cache = init_cache(
                config,
                1,
                cache_length(needed, config),
                self.model.dtype,
                attention_impl=self._attention_impl,
            )
            self._cached = []
        keep = _common_prefix(self._cached, ids)
        keep = min(keep, len(ids) - 1)  # at least one token runs, for its logits
        self._cached = ids[:]
        if keep == 0:
            logits, self._cache = engine.prefill(
                graphdef, params, self._cache, np.asarray([ids], np.int32), slots=[0]
            )
            return logits
        cache = engine.set_lengths(self._cache, [0], [keep])
        logits, self._cache = engine.extend(
            graphdef, params, cache, np.asarray([ids[keep:]], np.int32), slots=[0]
        )
        return logits[:, -1]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
