"""Prefill logits computed on demand: `[batch, seq, vocab]` by contract, rows when read.

A 4k-token prompt with a 150k vocabulary would need 2.4 GB of float32 logits; callers
almost always read only the last position (`PrefillOutput.last_token_logits()`). The
tensor keeps the final hidden states (`[batch, seq, embed]`, 256x smaller for SmolLM2) and
runs the LM head on the rows a `view` selects. Positions a prefix-cache hit skipped have no
hidden state: reading them recomputes the row's prefix with a plain forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.errors import FerrumError
from ferrum_jax.interfaces import DataType, Device
from ferrum_jax.tensor import JaxTensor


@functools.partial(jax.jit, static_argnames="graphdef")
def lm_head_step(graphdef: nnx.GraphDef, params: nnx.State, hidden: jax.Array) -> jax.Array:
    """Logits `[n, vocab]` (float32) of final hidden states `[n, embed]`."""
    return nnx.merge(graphdef, params).head(hidden)


class LazyLogits(JaxTensor):
    """`JaxTensor` whose array is materialised only when something reads all of it."""

    def __init__(
        self,
        hidden: jax.Array,
        lengths: Sequence[int],
        first: Sequence[int],
        head: Callable[[jax.Array], jax.Array],
        recompute: Callable[[int, int], jax.Array],
        vocab: int,
    ) -> None:
        """`hidden: [b, s, embed]`; row i has `lengths[i]` real positions, hidden states from
        position `first[i]` on (earlier ones come from `recompute(row, upto)` ->
        `[upto, vocab]`); `head(hidden [n, embed]) -> [n, vocab]`."""
        self._hidden = hidden
        self._lengths = list(lengths)
        self._first = list(first)
        self._head = head
        self._recompute = recompute
        self._vocab = vocab
        self._full: jax.Array | None = None

    @property
    def array(self) -> jax.Array:  # type: ignore[override]
        if self._full is None:
            b, s = self._hidden.shape[:2]
            self._full = self._rows([(i, j) for i in range(b) for j in range(s)]).reshape(
                b, s, self._vocab
            )
        return self._full

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self._hidden.shape[:2], self._vocab)

    @property
    def dtype(self) -> DataType:
        return DataType.FP32

    @property
    def device(self) -> Device:
        return JaxTensor(self._hidden).device

    def __repr__(self) -> str:
        return f"LazyLogits(shape={self.shape}, materialised={self._full is not None})"

    def _rows(self, positions: list[tuple[int, int]]) -> jax.Array:
        """Logits `[len(positions), vocab]` of (row, position) pairs; a padding position
        repeats its row's last real one."""
        resolved = [(i, min(j, self._lengths[i] - 1)) for i, j in positions]
        early = {i: j for i, j in resolved if j < self._first[i]}
        if early:
            recomputed = {i: self._recompute(i, self._first[i]) for i in early}
        flat = self._hidden.reshape(-1, self._hidden.shape[-1])
        s = self._hidden.shape[1]
        late = [n for n, (i, j) in enumerate(resolved) if j >= self._first[i]]
        out = jnp.zeros((len(resolved), self._vocab), jnp.float32)
        if late:
            index = jnp.asarray([resolved[n][0] * s + resolved[n][1] for n in late], jnp.int32)
            out = out.at[jnp.asarray(late)].set(self._head(flat[index]))
        for n, (i, j) in enumerate(resolved):
            if j < self._first[i]:
                out = out.at[n].set(recomputed[i][j])
        return out

    def view(self, start: Sequence[int], end: Sequence[int]) -> JaxTensor:
        shape = self.shape
        if len(start) != 3 or len(end) != 3:
            raise FerrumError.invalid_parameter(
                f"view of a 3-D tensor needs 3 starts and ends, got {len(start)} and {len(end)}"
            )
        for dim, (lo, hi, size) in enumerate(zip(start, end, shape, strict=True)):
            if not 0 <= lo <= hi <= size:
                raise FerrumError.invalid_parameter(
                    f"view range [{lo}, {hi}) out of bounds for dim {dim} of size {size}"
                )
        if self._full is not None:
            return super().view(start, end)
        rows = [(i, j) for i in range(start[0], end[0]) for j in range(start[1], end[1])]
        shape_out = (end[0] - start[0], end[1] - start[1])
        if not rows:
            return JaxTensor(jnp.zeros((*shape_out, end[2] - start[2]), jnp.float32))
        logits = self._rows(rows).reshape(*shape_out, self._vocab)
        return JaxTensor(logits[:, :, start[2] : end[2]])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_vec_f32(self) -> list[float]:
        return np.asarray(self.array, np.float32).ravel().tolist()
