"""One attention interface over a paged KV pool, with several implementations.

Every step is ragged: a flat batch of `T` query tokens belonging to `I` items (a prompt, a
prompt chunk continuing at any offset, one decode token, or draft tokens to verify), items
contiguous in order. Keys and values live in a pool of fixed-size pages; an item reads only
its own pages, through its row of the page table. A step first writes its new keys/values
into the pool (`write_kv`), then attends (`attention`): query `t` of an item sees every key
of that item at a position `<= positions[t]` (and inside the sliding window, if any).

Implementations (`IMPLEMENTATIONS`), chosen by platform (`default_implementation`):
- `"xla"`: pure JAX for every platform; blockwise over pages with an online softmax. The
  block loop ends at the longest item's last live block, so the cost follows live KV, never
  the page table's width; keys before a sliding window are never read.
- `"tpu"`: `jax.experimental.pallas.ops.tpu.ragged_paged_attention` (mixed prefill/decode).
- `"gpu"`: `jax.experimental.pallas.ops.gpu.paged_attention` for batches whose items all
  hold one query (decode); other batches, and sliding-window layers, run `"xla"` inside the
  same program.
The kernels are tested on CPU in Pallas interpret mode against `"xla"`. Each implementation
reads the pool in its kernel's native `PageLayout`, so no step copies the pool; `"xla"`
reads either layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ferrum_jax.errors import FerrumError
from ferrum_jax.models.kv_quant import KV_DTYPES, QuantizedPageLayout

_MASKED = -1e30
"""Score of a masked key: finite, so a query with no visible key yields 0, not NaN."""

Pool = tuple[jax.Array, ...]
"""One layer's KV pages: the arrays of its `PageLayout`."""


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """How one layer's pages are stored: array shapes, logical axes, writes and reads."""

    name: str
    """`"combined"` or `"split"`."""

    def shapes(self, pages: int, page_size: int, kv_heads: int, head_dim: int) -> list[tuple]:
        """The shapes of one layer's arrays."""
        if self.name == "combined":
            return [(pages, page_size, 2 * kv_heads, head_dim)]
        return [(kv_heads, pages, page_size, head_dim)] * 2

    def dtypes(self, dtype: jnp.dtype) -> list[jnp.dtype]:
        """The dtypes of one layer's arrays: all the compute dtype `dtype`."""
        return [jnp.dtype(dtype)] * len(self.axes)

    @property
    def axes(self) -> tuple[tuple[str, ...], ...]:
        """Logical axes of each array (KV heads shard like the heads that write them)."""
        if self.name == "combined":
            return (("pages", "page", "kv_heads", "head_dim"),)
        return (("kv_heads", "pages", "page", "head_dim"),) * 2

    def geometry(self, pool: Pool) -> tuple[int, int, int, int]:
        """`(pages, page_size, kv_heads, head_dim)` of `pool`."""
        if self.name == "combined":
            pages, page_size, combined, head_dim = pool[0].shape
            return pages, page_size, combined // 2, head_dim
        kv_heads, pages, page_size, head_dim = pool[0].shape
        return pages, page_size, kv_heads, head_dim

    def write(self, pool: Pool, k: jax.Array, v: jax.Array, slots: jax.Array) -> Pool:
        """`k, v: [T, kv_heads, d]` into flat slots `[T]` (`page * page_size + offset`);
        a slot past the pool drops the write."""
        _, page_size, kv_heads, d = self.geometry(pool)
        # Scattered by (page, offset) on the pool's own shape: a reshaped pool would let the
        # compiler give the result another sharding than the donated input's.
        page, offset = slots // page_size, slots % page_size
        if self.name == "combined":
            new = jnp.stack([k, v], axis=2).reshape(k.shape[0], 2 * kv_heads, d)
            return (pool[0].at[page, offset].set(new.astype(pool[0].dtype), mode="drop"),)
        return tuple(
            array.at[:, page, offset].set(new.transpose(1, 0, 2).astype(array.dtype), mode="drop")
            for array, new in zip(pool, (k, v), strict=True)
        )

    def copy(self, pool: Pool, src: jax.Array, dst: jax.Array) -> Pool:
        """`pool` with pages `dst` holding copies of pages `src` (ids past the pool: none)."""
        if self.name == "combined":
            return (pool[0].at[dst].set(pool[0].at[src].get(mode="clip"), mode="drop"),)
        return tuple(x.at[:, dst].set(x.at[:, src].get(mode="clip"), mode="drop") for x in pool)

    def zero(self, pool: Pool, pages: jax.Array) -> Pool:
        """`pool` with `pages` (ids past the pool are ignored) set to zero."""
        if self.name == "combined":
            return (pool[0].at[pages].set(0, mode="drop"),)
        return tuple(x.at[:, pages].set(0, mode="drop") for x in pool)

    def read(self, pool: Pool, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `pages: [V, n]`, each `[V, n * page_size, kv_heads, d]`."""
        num_pages, page_size, kv_heads, d = self.geometry(pool)
        rows, n = pages.shape
        pages = jnp.clip(pages, 0, num_pages - 1)  # ids past the pool read a real page
        if self.name == "combined":
            kv = pool[0][pages].reshape(rows, n * page_size, kv_heads, 2, d)
            return kv[..., 0, :], kv[..., 1, :]
        k, v = (x[:, pages].reshape(kv_heads, rows, n * page_size, d) for x in pool)
        return k.transpose(1, 2, 0, 3), v.transpose(1, 2, 0, 3)


COMBINED = PageLayout("combined")
"""`[pages, page_size, 2 * kv_heads, d]`, keys of KV head k at 2k and values at 2k + 1: the
TPU kernel's layout, and the pure-JAX one (measured in benchmarks/page_layout.py)."""
SPLIT = PageLayout("split")
"""Keys and values apart, each `[kv_heads, pages, page_size, d]`: the GPU kernel's layout."""


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens."""
    return -(-tokens // page_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each query token sits and which pages each item reads, for one ragged step.

    Build it with `metadata`; the per-token fields are derived once per step and shared by
    every layer.
    """

    cu_q_lens: jax.Array
    """`[I + 1]` int32: item `i` owns query tokens `cu_q_lens[i] : cu_q_lens[i + 1]`."""
    kv_lens: jax.Array
    """`[I]` int32: tokens in item `i`'s pages after this step's writes (0: padding item)."""
    page_table: jax.Array
    """`[I, pages_per_item]` int32: item `i`'s pages in order (any id past its length)."""
    positions: jax.Array
    """`[T]` int32: absolute position of each query token (0 for padding tokens)."""
    write_slots: jax.Array
    """`[T]` int32: pool slot (`page * page_size + offset`) each token's keys go to; one past
    the pool drops the write (padding tokens, items that must not write)."""
    num_items: jax.Array
    """`[1]` int32: items with at least one query (padding items have none)."""
    page_size: int = dataclasses.field(metadata=dict(static=True))
    """Tokens per page."""
    differentiable: bool = dataclasses.field(default=False, metadata=dict(static=True))
    """Loop over every block of the page table (a fixed trip count, so reverse-mode
    differentiation works) instead of stopping at the longest item's last live block. For
    full-sequence forwards whose page tables hold exactly their sequences (training)."""

    @property
    def q_lens(self) -> jax.Array:
        """`[I]` int32: query tokens per item."""
        return self.cu_q_lens[1:] - self.cu_q_lens[:-1]


def metadata(
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    *,
    num_tokens: int,
    page_size: int,
    num_pages: int,
    writes: jax.Array | None = None,
    differentiable: bool = False,
) -> AttentionMetadata:
    """`AttentionMetadata` for `num_tokens` flat query tokens over a pool of `num_pages`.

    `writes: [I]` False keeps an item's new keys out of the pool (an idle decode row): its
    query still runs, over stale contents at its own position. `differentiable`: see
    `AttentionMetadata.differentiable`.
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    items = kv_lens.shape[0]
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    item = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, items - 1)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    real = t < cu_q_lens[-1]
    positions = jnp.where(real, kv_lens[item] - q_lens[item] + (t - cu_q_lens[item]), 0)
    pages_per_item = page_table.shape[1]
    index = positions // page_size
    page = page_table[item, jnp.clip(index, 0, pages_per_item - 1)]
    # A position past the item's page table, or a page past the pool, writes nothing.
    ok = real & (index < pages_per_item) & (page >= 0) & (page < num_pages)
    if writes is not None:
        ok &= writes[item]
    slots = jnp.where(ok, page * page_size + positions % page_size, num_pages * page_size)
    return AttentionMetadata(
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens.astype(jnp.int32),
        page_table=page_table.astype(jnp.int32),
        positions=positions.astype(jnp.int32),
        write_slots=slots.astype(jnp.int32),
        num_items=jnp.sum(q_lens > 0, dtype=jnp.int32)[None],
        page_size=page_size,
        differentiable=differentiable,
    )


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes, besides its inputs."""

    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads; each serves `num_heads // num_kv_heads` query heads (GQA)."""
    head_dim: int
    """Width of a head."""
    scale: float
    """Multiplies the scores (usually `head_dim ** -0.5`)."""
    window: int | None = None
    """A key is visible when `query_pos - key_pos < window`; None: full causal attention."""
    soft_cap: float | None = None
    """Scores become `soft_cap * tanh(scores / soft_cap)`; None: no capping."""


def write_kv(
    pool: Pool, layout: PageLayout, k: jax.Array, v: jax.Array, meta: AttentionMetadata
) -> Pool:
    """Writes `k, v: [T, kv_heads, head_dim]` into `pool` at `meta.write_slots`."""
    return layout.write(pool, k, v, meta.write_slots)


# ---------------------------------------------------------------------------------------------
# "xla": pure JAX, blockwise with an online softmax.

BLOCK_TOKENS = 256
"""Keys per block of the pure-JAX loop. XLA CPU pays a fixed cost per loop iteration, so
blocks are large; a block never spans more than an item's page-table row."""
MAX_QUERY_TILE = 128
"""Most queries of one item that meet a block together."""


@dataclasses.dataclass(frozen=True)
class QueryTiles:
    """Runs of at most `size` queries of one item, `count` of them per program."""

    size: int
    count: int

    @classmethod
    def for_shape(cls, tokens: int, items: int) -> QueryTiles:
        """Tiles for a (token bucket, item bucket) program: one per token when items hold
        one query each on average (decode), else about `tokens / items` queries per tile."""
        ratio = max(tokens // max(items, 1), 1)
        size = min(MAX_QUERY_TILE, 1 << (ratio.bit_length() - 1))
        if size == 1:
            return cls(1, tokens)
        # Item i needs ceil(q_i / size) tiles: at most (tokens + items * (size - 1)) // size.
        return cls(size, (tokens + items * (size - 1)) // size)


def _xla_attention(
    q: jax.Array, pool: Pool, layout: PageLayout, meta: AttentionMetadata, spec: AttentionSpec
) -> jax.Array:
    tokens, heads, d = q.shape
    kv, group = spec.num_kv_heads, heads // spec.num_kv_heads
    items = meta.kv_lens.shape[0]
    tiles = QueryTiles.for_shape(tokens, items)
    page_size, pages_per_item = meta.page_size, meta.page_table.shape[1]
    pages_per_block = max(1, min(BLOCK_TOKENS // page_size, pages_per_item))
    block = pages_per_block * page_size

    # Tile v: its item, first query (flat index), valid queries, first query's position, and
    # the blocks it reads: from the window's first block (0) to its last query's block.
    v = jnp.arange(tiles.count, dtype=jnp.int32)
    q_lens = meta.q_lens
    per_item = (q_lens + tiles.size - 1) // tiles.size
    ends = jnp.cumsum(per_item)
    item = jnp.clip(jnp.searchsorted(ends, v, side="right"), 0, items - 1)
    offset = (v - (ends[item] - per_item[item])) * tiles.size
    count = jnp.where(v < ends[-1], jnp.clip(q_lens[item] - offset, 0, tiles.size), 0)
    first_pos = meta.kv_lens[item] - q_lens[item] + offset
    rows = jnp.arange(tiles.size, dtype=jnp.int32)
    q_ok = rows[None] < count[:, None]  # [V, Q]
    q_pos = first_pos[:, None] + rows[None]
    q_index = jnp.where(q_ok, meta.cu_q_lens[item][:, None] + offset[:, None] + rows, tokens)
    lowest = jnp.zeros_like(first_pos) if spec.window is None else first_pos - spec.window + 1
    first_block = jnp.maximum(lowest, 0) // block
    num_blocks = jnp.where(count > 0, (first_pos + count - 1) // block - first_block + 1, 0)

    scaled = q.astype(jnp.float32) * spec.scale
    if tiles.size == 1:
        q_tiles = scaled.reshape(tiles.count, 1, kv, group, d)
    else:
        q_tiles = jnp.take(scaled, q_index, axis=0, mode="fill", fill_value=0)
        q_tiles = q_tiles.reshape(tiles.count, tiles.size, kv, group, d)
    table = meta.page_table[item]  # [V, pages_per_item]
    within = jnp.arange(pages_per_block, dtype=jnp.int32)

    def body(j, state):
        m, denom, acc = state
        blk = first_block + j
        index = jnp.minimum(blk[:, None] * pages_per_block + within, pages_per_item - 1)
        keys, values = layout.read(pool, jnp.take_along_axis(table, index, axis=1))
        k_pos = blk[:, None] * block + jnp.arange(block)  # [V, B]
        seen = k_pos[:, None, :] <= q_pos[:, :, None]
        if spec.window is not None:
            seen &= k_pos[:, None, :] > q_pos[:, :, None] - spec.window
        seen &= q_ok[:, :, None] & (j < num_blocks)[:, None, None]  # [V, Q, B]
        scores = jnp.einsum("vqkgd,vbkd->vkgqb", q_tiles, keys.astype(jnp.float32))
        if spec.soft_cap is not None:
            scores = spec.soft_cap * jnp.tanh(scores / spec.soft_cap)
        visible = seen[:, None, None]
        scores = jnp.where(visible, scores, _MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        probs = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
        # Masked keys meet exact zeros: stale or non-finite pool contents never leak.
        values = jnp.where(seen.any(axis=1)[:, :, None, None], values.astype(jnp.float32), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[..., None] + jnp.einsum("vkgqb,vbkd->vkgqd", probs, values)
        return m_new, denom * alpha + probs.sum(axis=-1), acc

    m0 = jnp.full((tiles.count, kv, group, tiles.size), _MASKED, jnp.float32)
    init = (m0, jnp.zeros_like(m0), jnp.zeros((*m0.shape, d), jnp.float32))
    every_block = -(-pages_per_item // pages_per_block)
    trips = every_block if meta.differentiable else jnp.max(num_blocks)
    _, denom, acc = jax.lax.fori_loop(0, trips, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [V, kv, g, Q, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(tiles.count * tiles.size, heads, d)
    out = out.astype(q.dtype)
    if tiles.size == 1:
        return out
    return jnp.zeros((tokens, heads, d), q.dtype).at[q_index.reshape(-1)].set(out, mode="drop")


# ---------------------------------------------------------------------------------------------
# Pallas kernels shipped with JAX.


def _interpret() -> bool:
    """Kernels run in Pallas interpret mode off their platform (tests on CPU)."""
    return jax.default_backend() == "cpu"


def _unsupported(kernel: str, spec: AttentionSpec, why: object) -> FerrumError:
    return FerrumError.unsupported(
        f"the {kernel} kernel cannot serve {spec.num_heads} query / {spec.num_kv_heads} KV "
        f"heads of dim {spec.head_dim}: {why}; use attention_impl='xla'"
    )


def tpu_arguments(
    q: jax.Array, pool: Pool, meta: AttentionMetadata, spec: AttentionSpec
) -> tuple[tuple[jax.Array, ...], dict]:
    """`(args, kwargs)` of `ragged_paged_attention` (and of its `ref_ragged_paged_attention`)
    for one step: the kernel reads our pool, page table and item arrays as they are."""
    args = (q, pool[0], meta.kv_lens, meta.page_table, meta.cu_q_lens, meta.num_items)
    return args, dict(sm_scale=spec.scale, sliding_window=spec.window, soft_cap=spec.soft_cap)


def _tpu_attention(
    q: jax.Array, pool: Pool, layout: PageLayout, meta: AttentionMetadata, spec: AttentionSpec
) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    if _interpret():
        # Pallas's TPU interpreter in jax 0.10 cannot run this kernel (it reshapes a DMA
        # buffer ref, which the interpreter does not support); tests check the arguments
        # against the kernel's own reference, `ref_ragged_paged_attention`, instead.
        raise FerrumError.unsupported(
            "the TPU ragged paged attention kernel runs only on TPU; use attention_impl='xla'"
        )
    args, kwargs = tpu_arguments(q, pool, meta, spec)
    try:
        return ragged_paged_attention(*args, **kwargs)
    except (ValueError, NotImplementedError, AssertionError) as e:
        raise _unsupported("TPU ragged paged attention", spec, e) from e


# The GPU kernel splits each sequence's page-table row into this many partitions.
_GPU_K_SPLITS = 16


def _gpu_decode(
    q: jax.Array, pool: Pool, layout: PageLayout, meta: AttentionMetadata, spec: AttentionSpec
) -> jax.Array:
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    table = meta.page_table
    splits = next(k for k in (_GPU_K_SPLITS, 8, 4, 2, 1) if table.shape[1] % k == 0)
    # The kernel reads `lengths` keys of each row from the start of its page table; a padding
    # row (length 0) would divide by zero, so it reads one key and its output is dropped.
    lengths = jnp.maximum(meta.kv_lens, 1)
    try:
        out = paged_attention(
            q * jnp.asarray(spec.scale, q.dtype),
            pool[0],
            pool[1],
            jnp.clip(table, 0, pool[0].shape[1] - 1),
            lengths,
            k_splits=splits,
            attn_logits_soft_cap=spec.soft_cap,
            interpret=_interpret(),
        )
    except (ValueError, AssertionError) as e:
        raise _unsupported("GPU paged attention", spec, e) from e
    return jnp.where((meta.q_lens > 0)[:, None, None], out, 0).astype(q.dtype)


def _gpu_attention(
    q: jax.Array, pool: Pool, layout: PageLayout, meta: AttentionMetadata, spec: AttentionSpec
) -> jax.Array:
    if spec.window is not None or q.shape[0] != meta.kv_lens.shape[0]:
        return _xla_attention(q, pool, layout, meta, spec)
    return jax.lax.cond(
        jnp.all(meta.q_lens <= 1),
        lambda: _gpu_decode(q, pool, layout, meta, spec),
        lambda: _xla_attention(q, pool, layout, meta, spec),
    )


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention implementation and the page layout it reads."""

    run: Callable[[jax.Array, Pool, PageLayout, AttentionMetadata, AttentionSpec], jax.Array]
    layout: PageLayout | QuantizedPageLayout


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(_xla_attention, COMBINED),
    "tpu": Implementation(_tpu_attention, COMBINED),
    "gpu": Implementation(_gpu_attention, SPLIT),
}
"""Name -> implementation; each takes `(q [T, heads, d], pool, layout, metadata, spec)`."""
IMPLEMENTATIONS |= {
    f"xla+{name}": Implementation(_xla_attention, QuantizedPageLayout(COMBINED, name))
    for name in KV_DTYPES
}
"""Quantized KV pages (`models.kv_quant`): the pure-JAX loop dequantizes each block it reads."""


def default_implementation(platform: str | None = None) -> str:
    """The implementation for `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "xla")


def resolve_implementation(name: str) -> str:
    """`name`, with `"auto"` resolved for this platform; a `FerrumError` for unknown names."""
    if name == "auto":
        return default_implementation()
    if name not in IMPLEMENTATIONS:
        raise FerrumError.invalid_parameter(
            f"attention implementation must be one of auto, "
            f"{', '.join(n for n in IMPLEMENTATIONS if '+' not in n)}; got {name!r}"
        )
    return name


def attention(
    q: jax.Array, pool: Pool, meta: AttentionMetadata, spec: AttentionSpec, impl: str = "xla"
) -> jax.Array:
    """Ragged paged attention: `q: [T, heads, head_dim]` -> `[T, heads, head_dim]`.

    `pool` (in `IMPLEMENTATIONS[impl].layout`) already holds this step's keys and values
    (`write_kv`). Padding tokens get zeros.
    """
    implementation = IMPLEMENTATIONS[impl]
    with jax.named_scope(f"attention_{impl}"):
        return implementation.run(q, pool, implementation.layout, meta, spec)
