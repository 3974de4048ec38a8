"""Pure, jittable sampling: greedy, temperature, top-k, top-p, min-p with per-row parameters."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.errors import FerrumError

TOP_K_MAX = 2**31 - 1
"""Largest `top_k`: the sampler holds it as int32 (any k >= the vocabulary keeps all)."""
SEED_LIMIT = 2**63
"""Seeds are integers in `[0, SEED_LIMIT)`."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling parameters; all arrays `[batch]`, so changing them never recompiles."""

    temperature: jax.Array
    """float32; 0 means greedy (argmax)."""
    top_k: jax.Array
    """int32; keep the k most likely tokens, 0 keeps all."""
    top_p: jax.Array
    """float32; keep the smallest set of tokens whose mass reaches p, 1 keeps all."""
    min_p: jax.Array
    """float32; drop tokens less likely than `min_p` times the most likely one, 0 keeps all."""

    @classmethod
    def make(
        cls,
        batch: int,
        *,
        temperature: float | np.ndarray = 0.0,
        top_k: int | np.ndarray = 0,
        top_p: float | np.ndarray = 1.0,
        min_p: float | np.ndarray = 0.0,
    ) -> SamplingParams:
        """Broadcasts scalars or `[batch]` sequences; validates ranges on the host."""
        t = np.broadcast_to(np.asarray(temperature, np.float32), (batch,))
        k = np.broadcast_to(_integers(top_k, "top_k", TOP_K_MAX), (batch,))
        p = np.broadcast_to(np.asarray(top_p, np.float32), (batch,))
        m = np.broadcast_to(np.asarray(min_p, np.float32), (batch,))
        if not np.all(np.isfinite(t)) or np.any(t < 0):
            raise FerrumError.invalid_parameter(f"temperature must be finite and >= 0, got {t}")
        if np.any(~(p > 0)) or np.any(p > 1):
            raise FerrumError.invalid_parameter(f"top_p must be in (0, 1], got {p}")
        if np.any(~(m >= 0)) or np.any(m > 1):
            raise FerrumError.invalid_parameter(f"min_p must be in [0, 1], got {m}")
        return cls(
            temperature=jnp.asarray(t),
            top_k=jnp.asarray(k, jnp.int32),
            top_p=jnp.asarray(p),
            min_p=jnp.asarray(m),
        )

    @classmethod
    def greedy(cls, batch: int) -> SamplingParams:
        return cls.make(batch)


def _integer(value: Any, name: str, high: int) -> int:
    """The one rule for integer sampling values, at every entry point (flags, JSONL lines,
    lm-eval, the API) and before any device work: an integer (not a bool, not a float, not an
    array) in `[0, high]`."""
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Integral)
        or not 0 <= value <= high
    ):
        raise FerrumError.invalid_parameter(
            f"{name} must be an integer in [0, {high}], got {value!r}"
        )
    return int(value)


def _integers(value: Any, name: str, high: int) -> np.ndarray:
    """`value`, a scalar or a sequence, as int64 once `_integer` accepts each entry."""
    for entry in np.asarray(value, dtype=object).reshape(-1):
        _integer(entry, name, high)
    return np.asarray(value, dtype=np.int64)


def check_top_k(top_k: Any) -> int:
    """`top_k` as an int once it is an integer in `[0, TOP_K_MAX]`."""
    return _integer(top_k, "top_k", TOP_K_MAX)


def check_seed(seed: Any) -> int:
    """`seed` as an int once it is an integer in `[0, SEED_LIMIT)`."""
    return _integer(seed, "seed", SEED_LIMIT - 1)


def sample(logits: jax.Array, params: SamplingParams, keys: jax.Array) -> jax.Array:
    """Draws one token per row: `logits: [batch, vocab]`, `keys: [batch]` -> `[batch]` int32.

    Filters apply in HF's order: temperature, top-k, top-p, min-p. Rows with temperature 0
    take the argmax. The vocab sort runs only when some sampled row uses top-k or top-p.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled_rows = params.temperature > 0

    def draw() -> jax.Array:
        scaled = logits / jnp.where(sampled_rows, params.temperature, 1.0)[:, None]
        needs_sort = jnp.any(sampled_rows & ((params.top_k > 0) | (params.top_p < 1)))
        scaled = jax.lax.cond(needs_sort, _top_k_top_p, lambda x, _: x, scaled, params)
        probs = jax.nn.softmax(scaled, axis=-1)
        too_small = probs < params.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
        scaled = jnp.where(too_small, -jnp.inf, scaled)
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampled_rows), draw, lambda: greedy)
    return jnp.where(sampled_rows, drawn, greedy)


def sample_step(
    logits: jax.Array, params: SamplingParams, keys: jax.Array, step: jax.Array | int
) -> tuple[jax.Array, jax.Array]:
    """Token `[batch]` and its log-prob for generation step `step`.

    Row `i` draws with `fold_in(keys[i], step)`: its tokens depend only on its own key and
    position, never on the other rows of the batch.
    """
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    token = sample(logits, params, step_keys)
    return token, token_logprobs(logits, token)


def _top_k_top_p(scaled: jax.Array, params: SamplingParams) -> jax.Array:
    vocab = scaled.shape[-1]
    descending = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    descending = jnp.where(descending < kth, -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    # Keep a token while the mass before it is below top_p: the smallest nucleus reaching p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < params.top_p[:, None]) | (params.top_p[:, None] >= 1)
    keep = keep.at[:, 0].set(True)
    last_kept = jnp.sum(keep, axis=-1) - 1
    cutoff = jnp.take_along_axis(descending, last_kept[:, None], axis=-1)
    return jnp.where(scaled < jnp.maximum(kth, cutoff), -jnp.inf, scaled)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of `tokens: [batch]` under the model's `logits: [batch, vocab]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def row_keys(seeds: int | np.ndarray, batch: int) -> jax.Array:
    """One PRNG key per row: from one seed (split) or from `[batch]` seeds."""
    seeds = _integers(seeds, "seed", SEED_LIMIT - 1)
    if seeds.ndim == 0:
        return jax.random.split(jax.random.key(int(seeds)), batch)
    if seeds.shape != (batch,):
        raise FerrumError.invalid_parameter(
            f"seeds must be a scalar or [{batch}], got {seeds.shape}"
        )
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
