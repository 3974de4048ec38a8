"""The HF checkpoint layout: every tensor name of a config and how it maps onto our params.

HF linear weights are `[out, in]`; ours are `[in, ...heads, head_dim]`-shaped einsum operands
(see `ferrum_jax.models.layers`). `checkpoint_layout` is the one table both directions use:
loaders read with it, `hf_state_dict` exports with it (torch references, `convert`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import abstract_model


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
