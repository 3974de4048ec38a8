"""Decoder blocks: the pre-norm block (Llama, Mistral, Qwen, Phi-3, Mixtral, Qwen3-MoE) and
Gemma's sandwich block. A block's MLP is dense or a mixture of experts, per layer."""

from __future__ import annotations

import jax
from flax import nnx

from ferrum_jax.models.attention import AttentionMetadata, Pool
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.layers import MLP, Attention, norm
from ferrum_jax.models.moe import MoE

Rope = tuple[jax.Array, jax.Array]


def feed_forward(config: ModelConfig, layer: int, *, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    """`layer`'s MLP: routed experts on sparse layers, else the dense gated MLP."""
    if config.is_sparse(layer):
        return MoE(config, param_dtype=param_dtype, rngs=rngs)
    return MLP(config, param_dtype=param_dtype, rngs=rngs)


class DecoderLayer(nnx.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: ModelConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        e = config.hidden_size
        self.input_norm = norm(config, e, "embed", param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(config, layer, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = norm(config, e, "embed", param_dtype=param_dtype, rngs=rngs)
        self.mlp = feed_forward(config, layer, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope: Rope, pool: Pool, meta: AttentionMetadata, impl: str):
        y, pool = self.attn(self.input_norm(x), rope, pool, meta, impl)
        x = x + y
        return x + self.mlp(self.post_attn_norm(x)), pool


class SandwichDecoderLayer(nnx.Module):
    """Gemma 2/3 block: both sublayers normed on the way in and on the way out,
    `x + post_attn_norm(attn(input_norm(x)))`, then `x + post_mlp_norm(mlp(pre_mlp_norm(x)))`."""

    def __init__(self, config: ModelConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        e = config.hidden_size
        self.input_norm = norm(config, e, "embed", param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(config, layer, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = norm(config, e, "embed", param_dtype=param_dtype, rngs=rngs)
        self.pre_mlp_norm = norm(config, e, "embed", param_dtype=param_dtype, rngs=rngs)
        self.mlp = feed_forward(config, layer, param_dtype=param_dtype, rngs=rngs)
        self.post_mlp_norm = norm(config, e, "embed", param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope: Rope, pool: Pool, meta: AttentionMetadata, impl: str):
        y, pool = self.attn(self.input_norm(x), rope, pool, meta, impl)
        x = x + self.post_attn_norm(y)
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x))), pool
