"""The functional API's KV cache: rows of consecutive pages in one page pool.

Row `r` owns pages `r * pages_per_row ... (r + 1) * pages_per_row - 1`, so its page table is
implicit and the ragged step reads a row exactly as it reads an executor sequence's
scattered pages: one attention implementation for both. A row costs what it holds: the
attention loop stops at the longest row's last live block, whatever `max_len` is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ferrum_jax.models.attention import IMPLEMENTATIONS, PageLayout, Pool, resolve_implementation
from ferrum_jax.models.config import ModelConfig

PAGE_SIZE = 16
"""Tokens per page of a functional cache (and the executor's default)."""
LENGTHS_AXES = ("batch",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape KV cache; row `i` holds `lengths[i]` valid tokens."""

    pages: tuple[Pool, ...]
    """Per layer, the arrays of `layout` over `batch * pages_per_row` pages."""
    lengths: jax.Array
    """`[slots]` int32: tokens stored in each row."""
    max_len: int = dataclasses.field(metadata=dict(static=True))
    """Tokens a row can hold."""
    page_size: int = dataclasses.field(metadata=dict(static=True))
    """Tokens per page."""
    attention_impl: str = dataclasses.field(metadata=dict(static=True))
    """The attention implementation that reads the pages (`models.attention`)."""

    @property
    def layout(self) -> PageLayout:
        """How the pages are stored: the attention implementation's layout."""
        return IMPLEMENTATIONS[self.attention_impl].layout

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def pages_per_row(self) -> int:
        return -(-self.max_len // self.page_size)

    @property
    def num_pages(self) -> int:
        return self.batch * self.pages_per_row

    @property
    def dtype(self) -> jnp.dtype:
        return self.pages[0][0].dtype

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.pages)) + self.lengths.nbytes

    def page_table(self, slots: jax.Array) -> jax.Array:
        """`[len(slots), pages_per_row]`: the pages of rows `slots` (a slot past the last row
        gets ids past the pool, so its writes are dropped)."""
        return slots[:, None] * self.pages_per_row + jnp.arange(self.pages_per_row)

    def layer_kv(self, layer: int, slots: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `layer` for rows `slots` (default all), each
        `[rows, kv_heads, max_len, head_dim]` (copies, for inspection)."""
        rows = jnp.arange(self.batch, dtype=jnp.int32) if slots is None else slots
        keys, values = self.layout.read(self.pages[layer], self.page_table(rows))
        return tuple(x[:, : self.max_len].transpose(0, 2, 1, 3) for x in (keys, values))

    @property
    def keys(self) -> tuple[jax.Array, ...]:
        """Per layer `[slots, kv_heads, max_len, head_dim]` (copies, for inspection)."""
        return tuple(self.layer_kv(i)[0] for i in range(len(self.pages)))

    @property
    def values(self) -> tuple[jax.Array, ...]:
        """Per layer `[slots, kv_heads, max_len, head_dim]` (copies, for inspection)."""
        return tuple(self.layer_kv(i)[1] for i in range(len(self.pages)))


def init_cache(
    config: ModelConfig,
    batch: int,
    max_len: int,
    dtype: jnp.dtype = jnp.float32,
    *,
    page_size: int = PAGE_SIZE,
    attention_impl: str = "auto",
) -> KVCache:
    """An empty cache of `batch` rows ("slots") of `max_len` tokens, laid out for the
    attention implementation that will read it."""
    attention_impl = resolve_implementation(attention_impl)
    pages = batch * -(-max_len // page_size)
    return KVCache(
        pages=init_pages(config, pages, page_size, dtype, attention_impl),
        lengths=jnp.zeros((batch,), jnp.int32),
        max_len=max_len,
        page_size=page_size,
        attention_impl=attention_impl,
    )


def init_pages(
    config: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype: jnp.dtype = jnp.float32,
    attention_impl: str = "auto",
) -> tuple[Pool, ...]:
    """An empty page pool: per layer, the arrays of the implementation's page layout."""
    layout = IMPLEMENTATIONS[resolve_implementation(attention_impl)].layout
    shapes = layout.shapes(num_pages, page_size, config.num_kv_heads, config.head_dim)
    dtypes = layout.dtypes(dtype)  # quantized pages: values and their scales
    return tuple(
        tuple(jnp.zeros(shape, d) for shape, d in zip(shapes, dtypes, strict=True))
        for _ in range(config.num_layers)
    )


def zero_rows(cache: KVCache, slots: jax.Array) -> KVCache:
    """`cache` with the pages of rows `slots` zeroed (a slot past the last row changes
    nothing): a reused row holds no stale values, finite or not."""
    pages = cache.page_table(slots).reshape(-1)
    return dataclasses.replace(
        cache, pages=tuple(cache.layout.zero(pool, pages) for pool in cache.pages)
    )
