"""Building blocks of the Llama family: RMSNorm, rotary embeddings, attention, SwiGLU MLP.

Every weight is an `nnx.Param` whose `out_sharding` metadata holds its logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`); `ferrum_jax.sharding` maps them
to mesh axes. Matmuls run in the compute dtype; norms, softmax and logits in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.models.config import ModelConfig, RopeScaling

_MASKED = float(np.finfo(np.float32).min)


def param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: jnp.dtype, init: str
) -> nnx.Param:
    """A weight with logical axis names; `init` is "normal", "zeros" or "ones"."""
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = jnp.ones(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in float32 like HF's `LlamaRMSNorm`."""

    def __init__(self, dim: int, axis_name: str, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), (axis_name,), param_dtype, "ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse rotary frequencies `[head_dim // 2]` (float32, HF's formulas)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(
    positions: jax.Array, config: ModelConfig, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)`, each `[batch, seq, 1, head_dim]`, for `positions: [batch, seq]`.

    Computed once per step and shared by every layer (one set of ops, not one per layer).
    """
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, d/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates `x: [batch, seq, heads, head_dim]` by `rope_angles` (half-split pairs)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """Where a step writes its keys/values in the cache and what it attends to."""

    slots: jax.Array | None
    """`[batch]` cache rows of the batch rows; None means row i is cache row i (no gather)."""
    write_pos: jax.Array
    """`[batch, seq]` cache positions to write; `max_len` drops the write (padding, idle row)."""
    attend_cache: bool
    """Attend over the whole cache row (decode, extend) or only this step's keys (prefill)."""


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v/o biases and q/k RMSNorm."""

    def __init__(self, config: ModelConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), param_dtype, "normal")
        self.k_proj = param(
            rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, "normal"
        )
        self.v_proj = param(
            rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, "normal"
        )
        self.o_proj = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), param_dtype, "normal")
        if config.qkv_bias:
            self.q_bias = param(rngs, (h, d), ("heads", "head_dim"), param_dtype, "zeros")
            self.k_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, "zeros")
            self.v_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, "zeros")
        if config.o_bias:
            self.o_bias = param(rngs, (e,), ("embed",), param_dtype, "zeros")
        if config.qk_norm:
            self.q_norm = RMSNorm(
                d, "head_dim", config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
            )
            self.k_norm = RMSNorm(
                d, "head_dim", config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
            )
        self.config = config
        self.layer = layer

    def project(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`x: [b, s, embed]` -> rotated `q: [b, s, heads, d]`, `k, v: [b, s, kv_heads, d]`."""
        config, dtype = self.config, x.dtype
        q = jnp.einsum("bse,ehd->bshd", x, self.q_proj[...].astype(dtype))
        k = jnp.einsum("bse,ekd->bskd", x, self.k_proj[...].astype(dtype))
        v = jnp.einsum("bse,ekd->bskd", x, self.v_proj[...].astype(dtype))
        if config.qkv_bias:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        if config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def output(self, out: jax.Array) -> jax.Array:
        """Attention output `[b, s, heads, d]` -> `[b, s, embed]` through o_proj."""
        b, s, h, d = out.shape
        # One 2-D matmul against o_proj's row-major [heads * head_dim, embed] view: with the
        # einsum "bshd,hde->bse", XLA CPU transposed (copied) o_proj on every step.
        w = self.o_proj[...].astype(out.dtype).reshape(h * d, -1)
        y = (out.reshape(b * s, h * d) @ w).reshape(b, s, -1)
        if self.config.o_bias:
            y = y + self.o_bias[...].astype(out.dtype)
        return y

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        cache_k: jax.Array,
        cache_v: jax.Array,
        plan: KVPlan,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`x: [b, s, embed]`, caches `[slots, kv_heads, max_len, head_dim]` -> (y, k, v).

        `rope` is `rope_angles(positions)`, shared by all layers.
        """
        q, k, v = self.project(x, rope)
        cache_k, cache_v = write_kv(cache_k, cache_v, k, v, plan)
        keys, values, key_pos = attention_source(cache_k, cache_v, k, v, positions, plan)
        out = attend(q, keys, values, positions, key_pos, self.config.layer_window(self.layer))
        return self.output(out), cache_k, cache_v


def write_kv(
    cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, plan: KVPlan
) -> tuple[jax.Array, jax.Array]:
    """Writes `k, v: [b, s, kv_heads, d]` into cache rows `plan.slots` at `plan.write_pos`."""
    rows = jnp.arange(k.shape[0]) if plan.slots is None else plan.slots
    index = (rows[:, None], slice(None), plan.write_pos)
    cache_k = cache_k.at[index].set(k.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[index].set(v.astype(cache_v.dtype), mode="drop")
    return cache_k, cache_v


def attention_source(
    cache_k: jax.Array,
    cache_v: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    plan: KVPlan,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys/values a step attends to, `[b, kv_heads, t, d]`, and their positions `[b, t]`.

    Decode and extend read their cache rows; prefill reads only its own fresh keys.
    """
    if not plan.attend_cache:
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions
    if plan.slots is None:
        keys, values = cache_k, cache_v
    else:
        keys, values = cache_k[plan.slots], cache_v[plan.slots]
    return keys, values, jnp.arange(keys.shape[2])[None, :]


def attend(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: int | None,
) -> jax.Array:
    """Causal GQA attention: `q: [b, s, heads, d]` over `keys, values: [b, kv, t, d]`.

    A key is visible when its position is <= the query's (and inside `window`, if any);
    softmax in float32. Returns `[b, s, heads, d]` in the dtype of `q`.
    """
    dtype = q.dtype
    keys, values = keys.astype(dtype), values.astype(dtype)
    b, s, h, d = q.shape
    kv = keys.shape[1]
    q = q.reshape(b, s, kv, h // kv, d) * jnp.asarray(d**-0.5, dtype)
    with jax.named_scope("attention"):
        q_at = q_pos[:, None, None, :, None]
        k_at = k_pos[:, None, None, None, :]
        allowed = k_at <= q_at
        if window is not None:
            allowed &= k_at > q_at - window
        if s == 1:
            # Decode: multiply-reduce instead of dots. XLA CPU fuses it into one pass over
            # the cache row; as dots it copied the whole cache around every step.
            q32 = q[:, 0, :, :, None, :].astype(jnp.float32)  # [b, kv, g, 1, d]
            scores = jnp.sum(q32 * keys[:, :, None].astype(jnp.float32), axis=-1)[:, :, :, None]
        else:
            # Explicit [b, kv, g*s, d] x [b, kv, t, d] batched GEMM: 3x faster on XLA CPU
            # than the 5-D einsum "bskgd,bktd->bkgst" at 512 tokens.
            g = h // kv
            rows = q.transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, d)
            scores = jax.lax.dot_general(
                rows,
                keys,
                (((3,), (3,)), ((0, 1), (0, 1))),
                preferred_element_type=jnp.float32,
            ).reshape(b, kv, g, s, -1)
        scores = jnp.where(allowed, scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1)  # [b, kv, g, s, t]
        if s == 1:
            out = jnp.sum(probs[:, :, :, 0, :, None] * values[:, :, None], axis=-2)
            out = out[:, :, :, None].astype(dtype)  # [b, kv, g, 1, d]
        else:
            out = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(dtype), values)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        e, f = config.hidden_size, config.intermediate_size
        self.gate_proj = param(rngs, (e, f), ("embed", "mlp"), param_dtype, "normal")
        self.up_proj = param(rngs, (e, f), ("embed", "mlp"), param_dtype, "normal")
        self.down_proj = param(rngs, (f, e), ("mlp", "embed"), param_dtype, "normal")

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jnp.einsum("bse,ef->bsf", x, self.gate_proj[...].astype(dtype))
        up = jnp.einsum("bse,ef->bsf", x, self.up_proj[...].astype(dtype))
        return jnp.einsum("bsf,fe->bse", jax.nn.silu(gate) * up, self.down_proj[...].astype(dtype))
