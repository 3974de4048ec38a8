"""The HF checkpoint layout: every tensor name of a config and how it maps onto our params.

HF linear weights are `[out, in]`; ours are `[in, ...heads, head_dim]`-shaped einsum operands
(see `ferrum_jax.models.layers`), and q/k/v and gate/up are fused: an HF tensor may fill only
a part (`CheckpointTensor.index`) of one of our params. `checkpoint_layout` is the one table
both directions use: loaders read with it, `hf_state_dict` exports with it (torch
references, `convert`), so the fusion never shows outside this file and the model.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.models import quant
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
    """HF layout -> our layout (of the part `index` selects)."""
    from_param: Callable[[np.ndarray], np.ndarray]
    """Our layout (of that part) -> HF layout."""
    index: tuple[slice, ...] | None = None
    """The part of the param this tensor fills (q, k or v of `qkv_proj`, ...); None: all."""


def checkpoint_layout(config: ModelConfig) -> list[CheckpointTensor]:
    """Every tensor an HF checkpoint of `config` holds (tied LM head omitted), in an order that
    reads the parts of a fused param one after another.

    Names are those of the checkpoints on the Hub (what `save_pretrained` writes): Phi-3's
    fused `qkv_proj`/`gate_up_proj`, Gemma's four norms per layer, one tensor per expert
    (Mixtral `block_sparse_moe.experts.{j}.w1/w3/w2`, Qwen3-MoE `mlp.experts.{j}.*_proj`).
    """
    e, v = config.hidden_size, config.vocab_size
    out = [_same("model.embed_tokens.weight", ("embed",), (v, e))]
    for i in range(config.num_layers):
        p, layer = f"model.layers.{i}.", ("layers", i)
        out += _attention(config, p, (*layer, "attn"))
        out += _norms(config, p, layer)
        out += _feed_forward(config, i, p, (*layer, "mlp"))
    out.append(_same("model.norm.weight", ("final_norm", "scale"), (e,)))
    if not config.tie_word_embeddings:
        out.append(_transposed("lm_head.weight", ("lm_head",), (v, e)))
    return out


_WHOLE = slice(None)


def _same(name, path, shape) -> CheckpointTensor:
    return CheckpointTensor(name, path, shape, lambda w: w, lambda w: w)


def _transposed(name, path, shape) -> CheckpointTensor:
    return CheckpointTensor(name, path, shape, np.transpose, np.transpose)


def _attention(config: ModelConfig, p: str, attn: tuple) -> list[CheckpointTensor]:
    e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    g = h // kv
    qkv = (*attn, "qkv_proj")

    def qkv_weight(name, slot, heads) -> CheckpointTensor:
        # [heads*d, e] <-> the [e, kv, slots, d] part at `slot` (query heads grouped by KV head)
        n = heads // kv
        return CheckpointTensor(
            name,
            qkv,
            (heads * d, e),
            lambda w: w.T.reshape(-1, kv, n, d),
            lambda w: w.reshape(e, heads * d).T,
            (_WHOLE, _WHOLE, slice(slot, slot + n)),
        )

    def qkv_bias(name, slot, heads) -> CheckpointTensor:
        n = heads // kv
        return CheckpointTensor(
            name,
            (*attn, "qkv_bias"),
            (heads * d,),
            lambda b: b.reshape(kv, n, d),
            lambda b: b.reshape(heads * d),
            (_WHOLE, slice(slot, slot + n)),
        )

    def fused_to_param(w: np.ndarray) -> np.ndarray:
        # Phi-3 [(h + 2kv) * d, e]: all queries, all keys, all values -> per KV head groups.
        q, k, val = np.split(w.T, [h * d, (h + kv) * d], axis=1)
        parts = (q.reshape(e, kv, g, d), k.reshape(e, kv, 1, d), val.reshape(e, kv, 1, d))
        return np.concatenate(parts, axis=2)

    def fused_from_param(w: np.ndarray) -> np.ndarray:
        q, k, val = w[:, :, :g], w[:, :, g], w[:, :, g + 1]
        return np.concatenate([x.reshape(e, -1) for x in (q, k, val)], axis=1).T

    if config.model_type == "phi3":
        out = [
            CheckpointTensor(
                p + "self_attn.qkv_proj.weight",
                qkv,
                ((h + 2 * kv) * d, e),
                fused_to_param,
                fused_from_param,
            )
        ]
    else:
        out = [
            qkv_weight(p + "self_attn.q_proj.weight", 0, h),
            qkv_weight(p + "self_attn.k_proj.weight", g, kv),
            qkv_weight(p + "self_attn.v_proj.weight", g + 1, kv),
        ]
    out.append(
        CheckpointTensor(
            p + "self_attn.o_proj.weight",
            (*attn, "o_proj"),
            (e, h * d),
            lambda w: w.T.reshape(h, -1, e),  # -1: blockwise scales too
            lambda w: w.reshape(h * d, e).T,
        )
    )
    if config.qkv_bias:
        out += [
            qkv_bias(p + "self_attn.q_proj.bias", 0, h),
            qkv_bias(p + "self_attn.k_proj.bias", g, kv),
            qkv_bias(p + "self_attn.v_proj.bias", g + 1, kv),
        ]
    if config.o_bias:
        out.append(_same(p + "self_attn.o_proj.bias", (*attn, "o_bias"), (e,)))
    if config.qk_norm:
        out += [
            _same(p + "self_attn.q_norm.weight", (*attn, "q_norm", "scale"), (d,)),
            _same(p + "self_attn.k_norm.weight", (*attn, "k_norm", "scale"), (d,)),
        ]
    return out


def _norms(config: ModelConfig, p: str, layer: tuple) -> list[CheckpointTensor]:
    e = config.hidden_size
    names = [("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_attn_norm")]
    if config.sandwich_norms:
        names += [
            ("pre_feedforward_layernorm", "pre_mlp_norm"),
            ("post_feedforward_layernorm", "post_mlp_norm"),
        ]
    return [_same(f"{p}{hf}.weight", (*layer, ours, "scale"), (e,)) for hf, ours in names]


def _feed_forward(config: ModelConfig, i: int, p: str, mlp: tuple) -> list[CheckpointTensor]:
    e = config.hidden_size
    if config.is_sparse(i):
        return _experts(config, p, mlp)
    f = config.intermediate_size

    def gate_up(name, slot) -> CheckpointTensor:
        # [f, e] <-> the [e, 1, f] part at `slot` of [e, 2, f]
        return CheckpointTensor(
            name,
            (*mlp, "gate_up_proj"),
            (f, e),
            lambda w: w.T[:, None, :],
            lambda w: w[:, 0, :].T,
            (_WHOLE, slice(slot, slot + 1)),
        )

    if config.model_type == "phi3":
        fused = CheckpointTensor(
            p + "mlp.gate_up_proj.weight",
            (*mlp, "gate_up_proj"),
            (2 * f, e),
            lambda w: w.T.reshape(e, 2, f),
            lambda w: w.reshape(e, 2 * f).T,
        )
        out = [fused]
    else:
        out = [gate_up(p + "mlp.gate_proj.weight", 0), gate_up(p + "mlp.up_proj.weight", 1)]
    return [*out, _transposed(p + "mlp.down_proj.weight", (*mlp, "down_proj"), (e, f))]


EXPERT_NAMES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
"""model_type -> (the sparse block's name, its experts' gate/up/down tensor names)."""


def _experts(config: ModelConfig, p: str, mlp: tuple) -> list[CheckpointTensor]:
    e, n, f = config.hidden_size, config.num_experts, config.expert_intermediate_size
    block, (gate, up, down) = EXPERT_NAMES[config.model_type]
    out = [_transposed(f"{p}{block}.gate.weight", (*mlp, "router"), (n, e))]
    for j in range(n):
        x = f"{p}{block}.experts.{j}."
        for name, slot in ((gate, 0), (up, 1)):
            out.append(
                CheckpointTensor(
                    f"{x}{name}.weight",
                    (*mlp, "gate_up_proj"),
                    (f, e),
                    lambda w: w.T[None, :, None, :],
                    lambda w: w[0, :, 0, :].T,
                    (slice(j, j + 1), _WHOLE, slice(slot, slot + 1)),
                )
            )
        out.append(
            CheckpointTensor(
                f"{x}{down}.weight",
                (*mlp, "down_proj"),
                (e, f),
                lambda w: w.T[None],
                lambda w: w[0].T,
                (slice(j, j + 1),),
            )
        )
    return out


def hf_state_dict(config: ModelConfig, params: nnx.State) -> dict[str, np.ndarray]:
    """Our params as HF-named host arrays in HF layout (float32), e.g. for a torch reference."""
    flat = dict(nnx.to_flat_state(params))

    def part(t: CheckpointTensor) -> np.ndarray:
        value = np.asarray(flat[t.path][...], np.float32)
        return value if t.index is None else value[t.index]

    return {t.name: np.array(t.from_param(part(t)), order="C") for t in checkpoint_layout(config)}


def params_from_checkpoint(
    config: ModelConfig,
    read: Callable[[CheckpointTensor], np.ndarray],
    *,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
    place: Callable[[tuple[str | int, ...], np.ndarray], jax.Array] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds `(graphdef, params)` tensor by tensor from `read` (HF layout, any float dtype).

    Each param is converted and placed (`place(path, array)`, default `jnp.asarray`) as soon
    as its tensors are read (one for most params, q/k/v or gate/up for the fused ones), so at
    most one param's host copy is alive at a time.
    """
    graphdef, abstract = abstract_model(config, param_dtype=param_dtype, dtype=dtype)
    flat = dict(nnx.to_flat_state(abstract))
    place = place or (lambda _path, array: jax.tree.map(jnp.asarray, array))
    target = np.dtype(param_dtype)
    layout = checkpoint_layout(config)
    parts_left = collections.Counter(t.path for t in layout)
    assembling: dict[tuple, np.ndarray] = {}
    for tensor in layout:
        # A read may give a `QArray` (GGUF Q8_0 blocks): its values and scales map alike.
        array = jax.tree.map(tensor.to_param, read(tensor))
        if tensor.index is not None:
            shape = flat[tensor.path].get_value().shape
            parts = assembling.setdefault(tensor.path, quant.zeros_for(array, shape, target))
            for whole, part in zip(jax.tree.leaves(parts), jax.tree.leaves(array), strict=True):
                whole[tensor.index] = part
        parts_left[tensor.path] -= 1
        if parts_left[tensor.path] == 0:
            value = assembling.pop(tensor.path, array)
            if not isinstance(value, quant.QArray):
                value = value.astype(target, copy=False)
            flat[tensor.path].set_value(place(tensor.path, value))
    return graphdef, nnx.from_flat_state(flat)
