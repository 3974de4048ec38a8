"""Building blocks shared by every family: RMSNorm, rotary embeddings, attention, gated MLP.

Every weight is an `nnx.Param` whose `out_sharding` metadata holds its logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`); `ferrum_jax.sharding` maps them
to mesh axes. Activations are flat token batches `[T, embed]` (the ragged step's layout).
Matmuls run in the compute dtype; norms, softmax and logits in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.models.attention import (
    IMPLEMENTATIONS,
    AttentionMetadata,
    AttentionSpec,
    Pool,
    attention,
    write_kv,
)
from ferrum_jax.models.config import ModelConfig, RopeScaling
from ferrum_jax.models.quant import weight


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
    """RMSNorm over the last axis, computed in float32 like HF's `LlamaRMSNorm`.

    `plus_one` (Gemma): the weight is stored as an offset from one and `x * (1 + w)` is taken
    in float32 before the cast back, as HF's `Gemma2RMSNorm` does; Llama casts first.
    """

    def __init__(
        self,
        dim: int,
        axis_name: str,
        eps: float,
        *,
        param_dtype,
        rngs: nnx.Rngs,
        plus_one: bool = False,
    ):
        self.scale = param(rngs, (dim,), (axis_name,), param_dtype, "zeros" if plus_one else "ones")
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def norm(config: ModelConfig, dim: int, axis_name: str, *, param_dtype, rngs: nnx.Rngs) -> RMSNorm:
    """The RMSNorm `config`'s family uses."""
    return RMSNorm(
        dim,
        axis_name,
        config.rms_norm_eps,
        param_dtype=param_dtype,
        rngs=rngs,
        plus_one=config.norm_plus_one,
    )


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
    positions: jax.Array, config: ModelConfig, dtype: jnp.dtype, *, local: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)`, each `[T, 1, head_dim]`, for `positions: [T]`; `local`: the rotary of
    sliding-window layers (`config.rope_local_theta`, unscaled).

    Computed once per step and shared by every layer (one set of ops, not one per layer).
    """
    theta, scaling = (
        (config.rope_local_theta, None) if local else (config.rope_theta, config.rope_scaling)
    )
    inv_freq = rope_frequencies(config.head_dim, theta, scaling)
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)  # [T, d/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates `x: [T, heads, head_dim]` by `rope_angles` (half-split pairs)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v/o biases and q/k RMSNorm.

    q, k and v are one fused projection `qkv_proj: [embed, kv_heads, group + 2, head_dim]`:
    for each KV head, its `group` query heads, then its key, then its value. One matmul
    instead of three per layer, and sharding `kv_heads` on `model` keeps every GQA group with
    its key/value head. Checkpoints load into it and export from it per head
    (`ferrum_jax.checkpoint.layout`).
    """

    def __init__(self, config: ModelConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        qkv_axes = ("embed", "kv_heads", "qkv", "head_dim")
        self.qkv_proj = param(rngs, (e, kv, h // kv + 2, d), qkv_axes, param_dtype, "normal")
        self.o_proj = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), param_dtype, "normal")
        if config.qkv_bias:
            self.qkv_bias = param(rngs, (kv, h // kv + 2, d), qkv_axes[1:], param_dtype, "zeros")
        if config.o_bias:
            self.o_bias = param(rngs, (e,), ("embed",), param_dtype, "zeros")
        if config.qk_norm:
            self.q_norm = norm(config, d, "head_dim", param_dtype=param_dtype, rngs=rngs)
            self.k_norm = norm(config, d, "head_dim", param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.layer = layer

    @property
    def spec(self) -> AttentionSpec:
        """What this layer's attention computes (its window, GQA groups, scale, soft-cap)."""
        c = self.config
        return AttentionSpec(
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.attention_scale,
            c.layer_window(self.layer),
            c.attn_logit_softcap,
        )

    def project(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`x: [T, embed]` -> rotated `q: [T, heads, d]`, `k: [T, kv_heads, d]` and `v`."""
        config, dtype = self.config, x.dtype
        qkv = jnp.einsum("te,ekcd->tkcd", x, weight(self.qkv_proj, dtype))
        if config.qkv_bias:
            qkv = qkv + self.qkv_bias[...].astype(dtype)
        group = config.num_heads // config.num_kv_heads
        q = qkv[:, :, :group].reshape(x.shape[0], config.num_heads, config.head_dim)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        if config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def output(self, out: jax.Array) -> jax.Array:
        """Attention output `[T, heads, d]` -> `[T, embed]` through o_proj."""
        t, h, d = out.shape
        # One 2-D matmul against o_proj's row-major [heads * head_dim, embed] view: with the
        # einsum "thd,hde->te", XLA CPU transposed (copied) o_proj on every step.
        y = out.reshape(t, h * d) @ weight(self.o_proj, out.dtype).reshape(h * d, -1)
        if self.config.o_bias:
            y = y + self.o_bias[...].astype(out.dtype)
        return y

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        pool: Pool,
        meta: AttentionMetadata,
        impl: str,
    ) -> tuple[jax.Array, Pool]:
        """`x: [T, embed]` -> (`[T, embed]`, the layer's pool with this step's keys written).

        `rope` is `rope_angles(meta.positions)`, shared by all layers.
        """
        q, k, v = self.project(x, rope)
        pool = write_kv(pool, IMPLEMENTATIONS[impl].layout, k, v, meta)
        return self.output(attention(q, pool, meta, self.spec, impl)), pool


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The gate activation `config.hidden_act` names (SwiGLU's SiLU, GeGLU's tanh GELU)."""
    if name == "gelu_pytorch_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.silu


class MLP(nnx.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU, or GeGLU for Gemma), gate and up fused
    into one matmul.

    `gate_up_proj: [embed, 2, mlp]` (gate, then up): sharding `mlp` on `model` splits both
    halves alike, so the product needs no communication before `down_proj`.
    """

    def __init__(self, config: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        e, f = config.hidden_size, config.intermediate_size
        self.gate_up_proj = param(
            rngs, (e, 2, f), ("embed", "gate_up", "mlp"), param_dtype, "normal"
        )
        self.down_proj = param(rngs, (f, e), ("mlp", "embed"), param_dtype, "normal")
        self.act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x: [T, embed]` -> `[T, embed]`."""
        dtype = x.dtype
        gate_up = jnp.einsum("te,ecf->tcf", x, weight(self.gate_up_proj, dtype))
        gated = activation(self.act)(gate_up[:, 0]) * gate_up[:, 1]
        return gated @ weight(self.down_proj, dtype)
