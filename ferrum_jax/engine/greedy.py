"""Model-side greedy argmax: Ferrum main's `LogitsReturnPolicy.GreedyArgmax` on the device.

A step whose final rows ask for `GreedyArgmax` picks their tokens inside the compiled program
and ships one int per row to the host instead of a vocabulary of floats. The choice is the
reference's (ENGINE-NOTES.md, "Greedy argmax"; CUDA argmax_rows.cu):

1. every listed penalty id below the vocabulary whose logit `v` is finite becomes
   `v / penalty` if `v > 0`, else `v * penalty` -- once per distinct id (the reference skips
   non-finite logits; both operations keep them non-finite, so this applies it to all);
2. the argmax over the ids that are allowed by the row's mask and whose penalised logit is
   finite, the lowest index on ties (a penalty that overflows a logit excludes it);
3. a row with no such id reports `any_allowed = False`; the caller answers it with the full
   logits, as the reference does.

Masks and penalties are per-row arrays of fixed shape (`[rows, vocab]` bool, `[rows]` float32,
`[rows, K]` int32 with K a power-of-two bucket), so new requests, masks and penalties reuse
the compiled step. `pack_greedy` builds those arrays on the host from the rows' policies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.engine.buckets import bucket
from ferrum_jax.errors import FerrumError
from ferrum_jax.interfaces import LogitsReturnPolicy, TokenSelectionMask

MIN_PENALTY_BUCKET = 8
"""Smallest penalty-id bucket: the first few generated tokens share one program."""

_MASK_CACHE_SIZE = 4
"""Stacked masks kept per distinct batch of masks; each is `rows x vocab` bytes."""


def greedy_argmax(
    logits: jax.Array, mask: jax.Array, penalty: jax.Array, penalty_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per row, the reference's greedy token after the repetition penalty and the mask.

    `logits` `[rows, vocab]` float32; `mask` `[rows, vocab]` bool (True: allowed);
    `penalty` `[rows]` float (1.0: none); `penalty_ids` `[rows, K]` int32, padded with -1,
    duplicates and ids outside the vocabulary allowed (the latter are ignored). Returns
    `(token_ids [rows] int32, any_allowed [rows] bool)`; a row's token id is meaningless where
    `any_allowed` is False. Pure and jittable.
    """
    rows, vocab = logits.shape
    valid = (penalty_ids >= 0) & (penalty_ids < vocab)
    row = jnp.arange(rows)[:, None]
    # Gather-modify-scatter touches only K ids per row. A duplicate id scatters the same
    # value twice, so it is penalised once; invalid ids point past the vocabulary and drop.
    gather_ids = jnp.where(valid, penalty_ids, 0)
    listed = logits[row, gather_ids]
    # XLA rewrites `x / broadcast(p)` as `x * (1 / p)`, an ulp off for many values; the
    # barrier keeps the reference's IEEE division, so exact ties break as they do in Rust.
    p = jax.lax.optimization_barrier(
        jnp.broadcast_to(penalty.astype(logits.dtype)[:, None], listed.shape)
    )
    penalised = jnp.where(listed > 0, listed / p, listed * p)
    scatter_ids = jnp.where(valid, penalty_ids, vocab)
    logits = logits.at[row, scatter_ids].set(penalised, mode="drop")

    allowed = mask & jnp.isfinite(logits)
    # Disallowed ids sit at -inf and every allowed logit is finite, so the max is always an
    # allowed id when there is one; argmax returns the first (lowest) index of the max.
    scores = jnp.where(allowed, logits, -jnp.inf)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), jnp.any(allowed, axis=-1)


@dataclasses.dataclass(frozen=True)
class GreedyRows:
    """The per-row inputs of `greedy_argmax` for one step, as host arrays."""

    mask: np.ndarray
    """`[rows, vocab]` bool, read-only; shared between calls with the same `mask_key`."""
    penalty: np.ndarray
    """`[rows]` float32; 1.0 where a row has no penalty."""
    penalty_ids: np.ndarray
    """`[rows, K]` int32 distinct ids below the vocabulary, padded with -1; K is a bucket."""
    mask_key: tuple[int | None, ...]
    """Per row, its mask's fingerprint (None: every id allowed), followed by the vocabulary
    size: equal keys mean an equal `mask`, so a caller may reuse the uploaded device copy."""


def pack_greedy(
    policies: Sequence[LogitsReturnPolicy], vocab_size: int, rows: int | None = None
) -> GreedyRows:
    """Pack the rows' policies for `greedy_argmax`, padded to `rows` (default: one per policy).

    `FullLogits` rows and padding rows get no mask and no penalty: the caller returns their
    full logits and ignores their token. A mask shorter than the vocabulary forbids the ids
    past its end; a longer one is cut (its extra ids are not tokens of this model).
    """
    rows = len(policies) if rows is None else rows
    if rows < len(policies):
        raise FerrumError.invalid_parameter(f"{len(policies)} policies do not fit {rows} rows")
    masks: list[TokenSelectionMask | None] = [None] * rows
    penalty = np.ones(rows, dtype=np.float32)
    ids: list[list[int]] = [[] for _ in range(rows)]
    for i, policy in enumerate(policies):
        if policy.requires_full_logits():
            continue
        masks[i] = policy.token_mask
        rep = policy.repetition_penalty
        if rep is not None and not rep.is_empty():
            penalty[i] = rep.penalty
            ids[i] = [t for t in dict.fromkeys(rep.token_ids) if t < vocab_size]
    width = bucket(max(map(len, ids), default=0), minimum=MIN_PENALTY_BUCKET)
    penalty_ids = np.full((rows, width), -1, dtype=np.int32)
    for i, row_ids in enumerate(ids):
        penalty_ids[i, : len(row_ids)] = row_ids
    key = (*(None if m is None else m.fingerprint for m in masks), vocab_size)
    return GreedyRows(_stacked_masks(tuple(masks), vocab_size), penalty, penalty_ids, key)


@functools.lru_cache(maxsize=_MASK_CACHE_SIZE)
def _stacked_masks(masks: tuple[TokenSelectionMask | None, ...], vocab_size: int) -> np.ndarray:
    # Keyed on the masks themselves (hashed once per mask object; equal only if the bytes
    # are), so consecutive steps of the same batch skip rebuilding `rows x vocab` bools.
    out = np.ones((len(masks), vocab_size), dtype=np.bool_)
    for i, mask in enumerate(masks):
        if mask is not None:
            allowed = mask.allowed()[:vocab_size]
            out[i, : len(allowed)] = allowed
            out[i, len(allowed) :] = False
    out.flags.writeable = False
    return out
