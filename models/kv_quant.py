"""Quantized KV pages: int8 or float8_e4m3fn values with a float16 scale per token and head.

A quantized layout wraps a float `PageLayout` (`models.attention`): the pool holds that
layout's arrays in the quantized dtype, then the same arrays with head_dim 1 holding the
scales (`absmax / qmax` of each token's key or value head, so one token's outlier never
costs another token precision). Writes quantize, reads dequantize to float32, so the
pure-JAX attention dequantizes block by block inside its loop and never materialises a
float copy of the pool. Per token and layer, int8 stores `2 * kv_heads * (head_dim + 2)`
bytes: 0.52x of bfloat16 at head_dim 64 (0.516x).

The Pallas kernels read float pages only: a quantized cache runs the `"xla"` implementation
(`implementation` says so).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.errors import FerrumError

if TYPE_CHECKING:
    from ferrum_jax.models.attention import PageLayout, Pool

KV_DTYPES: dict[str, tuple[jnp.dtype, float]] = {
    "int8": (jnp.dtype(jnp.int8), 127.0),
    "float8_e4m3fn": (jnp.dtype(jnp.float8_e4m3fn), 448.0),
}
"""Quantized KV dtype name -> (storage dtype, largest stored magnitude)."""
SCALE_DTYPE = jnp.dtype(jnp.float16)
"""Dtype of the per-token, per-head scales."""


def check_kv_dtype(name: str | None) -> str | None:
    """`name` if it is a quantized KV dtype (None: the compute dtype); a `FerrumError`
    naming the choices otherwise."""
    if name is None or name in KV_DTYPES:
        return name
    raise FerrumError.invalid_parameter(
        f"kv_dtype must be None (the compute dtype), {' or '.join(KV_DTYPES)}; got {name!r}"
    )


def implementation(impl: str, kv_dtype: str | None) -> str:
    """The attention implementation name that reads pages of `kv_dtype` for `impl`: kernels
    cannot read a quantized cache, so it is `"xla+<kv_dtype>"` for every `impl`."""
    kv_dtype = check_kv_dtype(kv_dtype)
    return impl if kv_dtype is None else f"xla+{kv_dtype}"


def _quantize(x: jax.Array, dtype: jnp.dtype, qmax: float) -> tuple[jax.Array, jax.Array]:
    """`x: [T, heads, d]` -> values `[T, heads, d]` in `dtype`, scales `[T, heads, 1]`."""
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    # The stored (rounded) scale is the one the values are divided by: reads are exact.
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0).astype(SCALE_DTYPE)
    scaled = x32 / scale.astype(jnp.float32)
    if jnp.issubdtype(dtype, jnp.integer):
        scaled = jnp.round(scaled)
    return jnp.clip(scaled, -qmax, qmax).astype(dtype), scale


@dataclasses.dataclass(frozen=True)
class QuantizedPageLayout:
    """`base`'s arrays in `kv_dtype`, followed by `base`'s arrays (head_dim 1) of scales."""

    base: PageLayout
    """The float layout of the values (and, with head_dim 1, of the scales)."""
    kv_dtype: str
    """`"int8"` or `"float8_e4m3fn"`."""

    @property
    def name(self) -> str:
        return f"{self.base.name}+{self.kv_dtype}"

    def _halves(self, pool: Pool) -> tuple[Pool, Pool]:
        half = len(pool) // 2
        return pool[:half], pool[half:]

    def shapes(self, pages: int, page_size: int, kv_heads: int, head_dim: int) -> list[tuple]:
        """Shapes of one layer's arrays: values, then scales."""
        values = self.base.shapes(pages, page_size, kv_heads, head_dim)
        return values + self.base.shapes(pages, page_size, kv_heads, 1)

    def dtypes(self, dtype: jnp.dtype) -> list[jnp.dtype]:
        """Dtypes of one layer's arrays (`dtype`, the compute dtype, is not stored)."""
        n = len(self.base.axes)
        return [KV_DTYPES[self.kv_dtype][0]] * n + [SCALE_DTYPE] * n

    @property
    def axes(self) -> tuple[tuple[str, ...], ...]:
        """Scales shard like the values (their KV heads)."""
        return self.base.axes + self.base.axes

    def geometry(self, pool: Pool) -> tuple[int, int, int, int]:
        return self.base.geometry(self._halves(pool)[0])

    def write(self, pool: Pool, k: jax.Array, v: jax.Array, slots: jax.Array) -> Pool:
        dtype, qmax = KV_DTYPES[self.kv_dtype]
        (qk, sk), (qv, sv) = _quantize(k, dtype, qmax), _quantize(v, dtype, qmax)
        values, scales = self._halves(pool)
        return self.base.write(values, qk, qv, slots) + self.base.write(scales, sk, sv, slots)

    def copy(self, pool: Pool, src: jax.Array, dst: jax.Array) -> Pool:
        values, scales = self._halves(pool)
        return self.base.copy(values, src, dst) + self.base.copy(scales, src, dst)

    def zero(self, pool: Pool, pages: jax.Array) -> Pool:
        values, scales = self._halves(pool)
        return self.base.zero(values, pages) + self.base.zero(scales, pages)

    def read(self, pool: Pool, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Dequantized float32 keys and values of `pages`."""
        values, scales = self._halves(pool)
        (k, v), (sk, sv) = self.base.read(values, pages), self.base.read(scales, pages)
        return k.astype(jnp.float32) * sk.astype(jnp.float32), v.astype(jnp.float32) * sv.astype(
            jnp.float32
        )


def bytes_per_token(layout, num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes one token takes in pages of `layout` (float or quantized), all layers."""
    dtypes = layout.dtypes(dtype) if hasattr(layout, "dtypes") else [dtype] * len(layout.axes)
    shapes = layout.shapes(1, 1, kv_heads, head_dim)
    per_layer = sum(
        int(np.prod(s)) * np.dtype(d).itemsize for s, d in zip(shapes, dtypes, strict=True)
    )
    return num_layers * per_layer
