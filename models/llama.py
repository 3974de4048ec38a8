"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM): one implementation, flags."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.layers import MLP, Attention, KVPlan, RMSNorm, param, rope_angles


class DecoderLayer(nnx.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: ModelConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        e = config.hidden_size
        self.input_norm = RMSNorm(e, "embed", eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(config, layer, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(e, "embed", eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, rope, cache_k, cache_v, plan: KVPlan):
        y, cache_k, cache_v = self.attn(self.input_norm(x), positions, rope, cache_k, cache_v, plan)
        x = x + y
        return x + self.mlp(self.post_attn_norm(x)), cache_k, cache_v


class Llama(nnx.Module):
    """Decoder-only LM. `dtype` is the compute dtype; params are stored in `param_dtype`."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = np.dtype(dtype).name
        v, e = config.vocab_size, config.hidden_size
        self.embed = param(rngs, (v, e), ("vocab", "embed"), param_dtype, "normal")
        # One array per layer, not a stacked [L, ...] weight: XLA CPU copied every stacked
        # weight on each per-layer slice and decoded 2-4x slower.
        self.layers = nnx.List(
            [
                DecoderLayer(config, i, param_dtype=param_dtype, rngs=rngs)
                for i in range(config.num_layers)
            ]
        )
        self.final_norm = RMSNorm(
            e, "embed", config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (e, v), ("embed", "vocab"), param_dtype, "normal")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache_k: tuple[jax.Array, ...],
        cache_v: tuple[jax.Array, ...],
        plan: KVPlan,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """`tokens, positions: [b, s]` -> logits `[b, s, vocab]` (`[b, vocab]` at `logits_at`).

        Returns the updated per-layer caches `[slots, kv_heads, max_len, head_dim]`.
        """
        dtype = jnp.dtype(self.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        rope = rope_angles(positions, self.config, dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, k, v = layer(x, positions, rope, cache_k[i], cache_v[i], plan)
            new_k.append(k)
            new_v.append(v)
        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]  # only the rows we need
        x = self.final_norm(x)
        with jax.named_scope("lm_head"):
            if self.config.tie_word_embeddings:
                logits = jnp.einsum(
                    "bse,ve->bsv",
                    x,
                    self.embed[...].astype(dtype),
                    preferred_element_type=jnp.float32,
                )
            else:
                logits = jnp.einsum(
                    "bse,ev->bsv",
                    x,
                    self.lm_head[...].astype(dtype),
                    preferred_element_type=jnp.float32,
                )
        if logits_at is not None:
            logits = logits[:, 0]
        return logits, tuple(new_k), tuple(new_v)


def init_model(
    config: ModelConfig,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
    seed: int = 0,
) -> tuple[nnx.GraphDef, nnx.State]:
    """A randomly initialised model split into `(graphdef, params)`."""
    model = Llama(config, param_dtype=param_dtype, dtype=dtype or param_dtype, rngs=nnx.Rngs(seed))
    return nnx.split(model)


def abstract_model(
    config: ModelConfig, *, param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """`(graphdef, params)` with `jax.ShapeDtypeStruct` leaves: shapes without allocation."""
    model = nnx.eval_shape(
        lambda: Llama(config, param_dtype=param_dtype, dtype=dtype or param_dtype, rngs=nnx.Rngs(0))
    )
    return nnx.split(model)


@dataclasses.dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of an HF checkpoint and the param it becomes."""

    name: str
    """HF name, e.g. `model.layers.0.self_attn.q_proj.weight`."""
    path: tuple[str | int, ...]
    """Path of the param in the nnx state."""
    shape: tuple[int, ...]
    """Shape in the checkpoint (HF layout: linear weights are `[out, in]`)."""
    to_param: Callable[[np.ndarray], np.ndarray]
    """HF layout -> our layout."""
    from_param: Callable[[np.ndarray], np.ndarray]
    """Our layout -> HF layout."""


def checkpoint_layout(config: ModelConfig) -> list[CheckpointTensor]:
    """Every tensor an HF checkpoint of `config` holds (tied LM head omitted)."""
    e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    f, v = config.intermediate_size, config.vocab_size

    def tensor(name, path, shape, kind: str) -> CheckpointTensor:
        if kind == "same":
            to, back = (lambda w: w), (lambda w: w)
        elif kind == "transpose":
            to, back = np.transpose, np.transpose
        elif kind == "heads_in":  # [n*d, e] <-> [e, n, d]
            n = shape[0] // d
            to, back = (lambda w: w.T.reshape(e, n, d)), (lambda w: w.reshape(e, n * d).T)
        elif kind == "heads_out":  # [e, h*d] <-> [h, d, e]
            to, back = (lambda w: w.T.reshape(h, d, e)), (lambda w: w.reshape(h * d, e).T)
        else:  # "head_bias": [n*d] <-> [n, d]
            n = shape[0] // d
            to, back = (lambda b: b.reshape(n, d)), (lambda b: b.reshape(n * d))
        return CheckpointTensor(name, path, shape, to, back)

    out = [tensor("model.embed_tokens.weight", ("embed",), (v, e), "same")]
    for i in range(config.num_layers):
        p, layer = f"model.layers.{i}.", ("layers", i)
        attn = (*layer, "attn")
        out += [
            tensor(p + "input_layernorm.weight", (*layer, "input_norm", "scale"), (e,), "same"),
            tensor(p + "self_attn.q_proj.weight", (*attn, "q_proj"), (h * d, e), "heads_in"),
            tensor(p + "self_attn.k_proj.weight", (*attn, "k_proj"), (kv * d, e), "heads_in"),
            tensor(p + "self_attn.v_proj.weight", (*attn, "v_proj"), (kv * d, e), "heads_in"),
            tensor(p + "self_attn.o_proj.weight", (*attn, "o_proj"), (e, h * d), "heads_out"),
            tensor(
                p + "post_attention_layernorm.weight",
                (*layer, "post_attn_norm", "scale"),
                (e,),
                "same",
            ),
            tensor(p + "mlp.gate_proj.weight", (*layer, "mlp", "gate_proj"), (f, e), "transpose"),
            tensor(p + "mlp.up_proj.weight", (*layer, "mlp", "up_proj"), (f, e), "transpose"),
            tensor(p + "mlp.down_proj.weight", (*layer, "mlp", "down_proj"), (e, f), "transpose"),
        ]
        if config.qkv_bias:
            out += [
                tensor(p + "self_attn.q_proj.bias", (*attn, "q_bias"), (h * d,), "head_bias"),
                tensor(p + "self_attn.k_proj.bias", (*attn, "k_bias"), (kv * d,), "head_bias"),
                tensor(p + "self_attn.v_proj.bias", (*attn, "v_bias"), (kv * d,), "head_bias"),
            ]
        if config.o_bias:
            out.append(tensor(p + "self_attn.o_proj.bias", (*attn, "o_bias"), (e,), "same"))
        if config.qk_norm:
            out += [
                tensor(p + "self_attn.q_norm.weight", (*attn, "q_norm", "scale"), (d,), "same"),
                tensor(p + "self_attn.k_norm.weight", (*attn, "k_norm", "scale"), (d,), "same"),
            ]
    out.append(tensor("model.norm.weight", ("final_norm", "scale"), (e,), "same"))
    if not config.tie_word_embeddings:
        out.append(tensor("lm_head.weight", ("lm_head",), (v, e), "transpose"))
    return out


def hf_state_dict(config: ModelConfig, params: nnx.State) -> dict[str, np.ndarray]:
    """Our params as HF-named host arrays in HF layout (float32), e.g. for a torch reference."""
    flat = dict(nnx.to_flat_state(params))
    return {
        t.name: np.array(t.from_param(np.asarray(flat[t.path][...], np.float32)), order="C")
        for t in checkpoint_layout(config)
    }


def params_from_checkpoint(
    config: ModelConfig,
    read: Callable[[CheckpointTensor], np.ndarray],
    *,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
    place: Callable[[tuple[str | int, ...], np.ndarray], jax.Array] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds `(graphdef, params)` tensor by tensor from `read` (HF layout, any float dtype).

    Each tensor is converted and placed (`place(path, array)`, default `jnp.asarray`) before
    the next is read, so at most one host copy of a tensor is alive at a time.
    """
    graphdef, abstract = abstract_model(config, param_dtype=param_dtype, dtype=dtype)
    flat = dict(nnx.to_flat_state(abstract))
    place = place or (lambda _path, array: jnp.asarray(array))
    target = np.dtype(param_dtype)
    for tensor in checkpoint_layout(config):
        array = tensor.to_param(read(tensor))
        flat[tensor.path].set_value(place(tensor.path, array.astype(target, copy=False)))
    return graphdef, nnx.from_flat_state(flat)
