"""Prefill logits computed on demand: `[batch, seq, vocab]` by contract, rows when read.

A 4k-token prompt with a 150k vocabulary would need 2.4 GB of float32 logits; callers
almost always read only the last position (`PrefillOutput.last_token_logits()`). The
tensor keeps each row's last-position logits (the ragged step computed them anyway), and
references to the steps' final hidden states (`[tokens, embed]`, 256x smaller than the
logits for SmolLM2), and runs the LM head only on other rows a `view` selects. Positions a
prefix-cache hit skipped have no hidden state: reading them recomputes the row's prefix
with a plain forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from ferrum_jax.errors import FerrumError
from ferrum_jax.interfaces import DataType, Device
from ferrum_jax.tensor import JaxTensor


@functools.partial(jax.jit, static_argnames="graphdef")
def lm_head_step(
    graphdef: nnx.GraphDef, params: nnx.State, hidden: jax.Array, rows: jax.Array
) -> jax.Array:
    """Logits `[n, vocab]` (float32) of rows `rows: [n]` of final hidden states `[T, embed]`."""
    return nnx.merge(graphdef, params).head(hidden[rows])


Chunk = tuple[jax.Array, int, int]
"""`(step hidden [T, embed], first row, rows)`: a prompt chunk's final hidden states, as a
reference into the ragged step that computed them."""


class LazyLogits(JaxTensor):
    """`JaxTensor` whose array is materialised only when something reads all of it."""

    def __init__(
        self,
        seq: int,
        last: Sequence[np.ndarray],
        chunks: Sequence[Sequence[Chunk]],
        first: Sequence[int],
        head: Callable[[jax.Array, np.ndarray], np.ndarray],
        recompute: Callable[[int, int], np.ndarray],
    ) -> None:
        """`[len(last), seq, vocab]` logits. Row i: `last[i]` (host `[vocab]`) are its last
        real position's logits, which the step computed; `chunks[i]` hold the hidden states
        of positions `first[i]` on, in order (earlier ones, skipped by a prefix-cache hit,
        come from `recompute(row, upto)` -> `[upto, vocab]`); `head(hidden, rows)` runs the
        LM head on rows of a step's hidden states."""
        self._seq = seq
        self._last = [np.asarray(x, np.float32) for x in last]
        self._chunks = [list(c) for c in chunks]
        self._first = list(first)
        self._lengths = [f + sum(n for _, _, n in c) for f, c in zip(first, chunks, strict=True)]
        self._head = head
        self._recompute = recompute
        self._vocab = self._last[0].shape[-1]
        self._full: jax.Array | None = None

    @property
    def array(self) -> jax.Array:  # type: ignore[override]
        if self._full is None:
            b, s = len(self._last), self._seq
            rows = self._rows([(i, j) for i in range(b) for j in range(s)])
            self._full = jax.device_put(rows.reshape(b, s, self._vocab))
        return self._full

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._last), self._seq, self._vocab)

    @property
    def dtype(self) -> DataType:
        return DataType.FP32

    @property
    def device(self) -> Device:
        for chunks in self._chunks:
            for hidden, _, _ in chunks:
                if hidden is not None:  # None: the step ran on another process's devices
                    return JaxTensor(hidden).device
        return Device.CPU

    def __repr__(self) -> str:
        return f"LazyLogits(shape={self.shape}, materialised={self._full is not None})"

    def _rows(self, positions: list[tuple[int, int]]) -> np.ndarray:
        """Logits `[len(positions), vocab]` (host) of (row, position) pairs; a padding
        position repeats its row's last real one."""
        out = np.empty((len(positions), self._vocab), np.float32)
        wanted: dict[int, tuple[jax.Array, list[tuple[int, int]]]] = {}  # step -> (out, row)
        early: dict[int, np.ndarray] = {}
        for n, (i, j) in enumerate(positions):
            j = min(j, self._lengths[i] - 1)
            if j == self._lengths[i] - 1:
                out[n] = self._last[i]
            elif j < self._first[i]:
                if i not in early:
                    early[i] = self._recompute(i, self._first[i])
                out[n] = early[i][j]
            else:
                offset = j - self._first[i]
                for hidden, start, rows in self._chunks[i]:
                    if offset < rows:
                        wanted.setdefault(id(hidden), (hidden, []))[1].append((n, start + offset))
                        break
                    offset -= rows
        for hidden, pairs in wanted.values():
            at, rows = zip(*pairs, strict=True)
            out[list(at)] = self._head(hidden, np.asarray(rows, np.int32))
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
            return JaxTensor(jax.device_put(np.zeros((*shape_out, end[2] - start[2]), np.float32)))
        logits = self._rows(rows).reshape(*shape_out, self._vocab)
        return JaxTensor(jax.device_put(logits[:, :, start[2] : end[2]]))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_vec_f32(self) -> list[float]:
        return np.asarray(self.array, np.float32).ravel().tolist()
