"""Weight-only quantization: int8 per output channel, int4 blockwise, dequantized in the dot.

A quantized weight is a `qwix.QArray` held as the value of its `nnx.Param` (same path, same
logical axes): `qvalue` has the float weight's shape (int8 or `jnp.int4`), `scale` has its
rank, each dim either the weight's (a channel axis), 1 (reduced over, per-channel int8) or
the weight's divided by a block size (blockwise). `qwix.quantize` computes the scales and
rounds (absmax, symmetric). Any scale shape of that form dequantizes the same way, so GGUF
Q8_0 blocks (32 along the input, float16 scales) load as they are stored.

Why the forward dequantizes (`w.astype(dtype) * scale`, then the float einsum) instead of
qwix's weight-only dot (an int8 operand in `dot_general`, scale after): on the 2-core CPU
of this project the SmolLM2 decode matvec chain took 42.8 ms in float32, 234 ms
dequantized-in-the-dot and 335 ms with `qwix.einsum` (benchmarks/quant_matmul.py, loaded
machine); XLA CPU runs a dot with an int8 (or bfloat16) operand on a slow path. So
quantization here saves memory, not time, on CPU; accelerators read 4x fewer weight bytes.

Scales shard like their weights: the scale carries the weight's logical axes, and a dim of
size 1 (or not divisible by its mesh axis) is replicated (`sharding.rules`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from ferrum_jax.errors import FerrumError

QArray = qwix.QArray
"""qwix's quantized array: `qvalue`, `scale` (and `qtype`), a pytree."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How one quantization kind stores a linear weight."""

    name: str
    """`"int8"` or `"int4"`."""
    qtype: jnp.dtype
    """Storage dtype of the quantized values."""
    block: int | None
    """Block size along the weight's last contraction axis; None: one scale per output
    channel (all contraction axes reduced)."""
    scale_dtype: jnp.dtype
    """Dtype the scales are stored in."""


QUANTIZATIONS: dict[str, WeightFormat] = {
    "int8": WeightFormat("int8", jnp.dtype(jnp.int8), None, jnp.dtype(jnp.float32)),
    # Blocks of 32 (llama.cpp's Q4_0 block) with float16 scales: 4.5 bits a weight, 0.14x
    # of float32; float32 scales would make it 0.156x.
    "int4": WeightFormat("int4", jnp.dtype(jnp.int4), 32, jnp.dtype(jnp.float16)),
}
"""Quantization name -> format (`load_model(quantize=...)`, CLI `--quantize`)."""

CONTRACTION_AXES: dict[str, tuple[int, ...]] = {
    "qkv_proj": (0,),  # [embed, kv_heads, qkv, head_dim]
    "o_proj": (0, 1),  # [heads, head_dim, embed]
    "gate_up_proj": (0,),  # [embed, gate_up, mlp]
    "down_proj": (0,),  # [mlp, embed]
    "lm_head": (0,),  # [embed, vocab]
    "embed": (1,),  # [vocab, embed]: contracted by a tied LM head, rows looked up
}
"""Param name -> the axes its matmul contracts: every linear weight, embedding included."""


def quantization_format(name: str | None, config=None) -> WeightFormat | None:
    """The format named `name` (None: no quantization); a `FerrumError` listing the choices,
    or, given the model's `config`, naming what it cannot quantize."""
    if name is None or name == "none":
        return None
    if name not in QUANTIZATIONS:
        raise FerrumError.unsupported(
            f"quantize must be one of none, {', '.join(QUANTIZATIONS)}; got {name!r}"
        )
    if config is not None and config.num_experts:
        # Expert weights carry a leading experts axis that CONTRACTION_AXES does not describe.
        raise FerrumError.unsupported(
            f"quantize={name!r} covers dense models; {config.architecture} has "
            f"{config.num_experts} experts per layer (mixture-of-experts weights are not "
            "quantized yet); load it without quantize"
        )
    return QUANTIZATIONS[name]


def is_quantizable(path: tuple[str | int, ...]) -> bool:
    """Whether the param at nnx `path` is a linear weight (quantized when asked)."""
    return bool(path) and path[-1] in CONTRACTION_AXES


def quantize_weight(name: str, array, fmt: WeightFormat) -> QArray:
    """The float weight `array` of param `name` (our layout) quantized to `fmt`."""
    axis = CONTRACTION_AXES[name][-1]
    if fmt.block is not None and array.shape[axis] % fmt.block:
        raise FerrumError.unsupported(
            f"{name}: axis of size {array.shape[axis]} is not a multiple of the {fmt.name} "
            f"block {fmt.block}"
        )
    return _quantize(name, array, fmt)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _quantize(name: str, array, fmt: WeightFormat) -> QArray:
    # One fused program per weight shape: eager ops would hold several float copies of the
    # 28M-entry embedding at once (the load's peak host memory).
    contract = CONTRACTION_AXES[name]
    x = jnp.asarray(array, jnp.float32)
    if fmt.block is None:
        channels = [a for a in range(x.ndim) if a not in contract]
        q = qwix.quantize(x, fmt.qtype, channelwise_axes=channels)
    else:
        axis = contract[-1]
        channels = [a for a in range(x.ndim) if a != axis]
        q = qwix.quantize(x, fmt.qtype, channelwise_axes=channels, tiled_axes={axis: fmt.block})
    # A channel of zeros (padded heads) has scale 0: its values are 0 whatever the scale.
    return QArray(q.qvalue, q.scale.astype(fmt.scale_dtype), qtype=fmt.qtype)


def quantizing_place(
    place: Callable[[tuple, object], object], fmt: WeightFormat
) -> Callable[[tuple, object], object]:
    """A `place(path, array)` that quantizes linear weights (already quantized ones, such as
    GGUF Q8_0 blocks, pass through) before `place` puts them on their devices."""

    def wrapped(path: tuple, array):
        if is_quantizable(path) and not isinstance(array, QArray):
            array = quantize_weight(path[-1], array, fmt)
        return place(path, array)

    return wrapped


def quantize_params(params: nnx.State, name: str) -> nnx.State:
    """`params` with every linear weight quantized to format `name` (norms stay float)."""
    fmt = quantization_format(name)
    flat = nnx.to_flat_state(jax.tree.map(lambda x: x, params))  # new Variables: no aliasing
    for path, variable in flat:
        value = variable.get_value()
        if fmt is not None and is_quantizable(path) and not isinstance(value, QArray):
            variable.set_value(quantize_weight(path[-1], value, fmt))
    return nnx.from_flat_state(flat)


def dequantized_params(params: nnx.State, dtype=jnp.float32) -> nnx.State:
    """`params` with every quantized weight replaced by its dequantized `dtype` copy."""
    flat = nnx.to_flat_state(jax.tree.map(lambda x: x, params))
    for _, variable in flat:
        value = variable.get_value()
        if isinstance(value, QArray):
            variable.set_value(dequantize(value, dtype))
    return nnx.from_flat_state(flat)


def _expanded(scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`scale` repeated along its blocked axes up to `shape` (size-1 axes broadcast)."""
    for axis, (s, n) in enumerate(zip(scale.shape, shape, strict=True)):
        if s not in (1, n):
            scale = jnp.repeat(scale, n // s, axis=axis)
    return scale


def dequantize(value: QArray, dtype) -> jax.Array:
    """`qvalue * scale` in `dtype` (XLA fuses it into the consumer's operand)."""
    scale = _expanded(value.scale.astype(dtype), value.qvalue.shape)
    return value.qvalue.astype(dtype) * scale


def weight(param: nnx.Variable, dtype) -> jax.Array:
    """The weight of `param` in `dtype`: dequantized when it is quantized."""
    value = param.get_value()
    if isinstance(value, QArray):
        return dequantize(value, dtype)
    return value.astype(dtype)


def embedding(param: nnx.Variable, tokens: jax.Array, dtype) -> jax.Array:
    """Rows `tokens` of the embedding `param` in `dtype` (only those rows dequantized)."""
    value = param.get_value()
    if not isinstance(value, QArray):
        return jnp.take(value, tokens, axis=0).astype(dtype)
    rows = QArray(jnp.take(value.qvalue, tokens, axis=0), value.scale, qtype=value.qtype)
    if value.scale.shape[0] != 1:
        rows = dataclasses.replace(rows, scale=jnp.take(value.scale, tokens, axis=0))
    return dequantize(rows, dtype)


def quantization_of(params: nnx.State) -> str | None:
    """The quantization name of `params` (by its weights' storage dtype), or None."""
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            qtype = np.dtype(leaf.qvalue.dtype)
            return next(n for n, f in QUANTIZATIONS.items() if f.qtype == qtype)
    return None


def array_bytes(x) -> int:
    """Bytes `x` (an array or `ShapeDtypeStruct`) holds, counting int4 as half a byte (packed
    two a byte by XLA; numpy's `nbytes` counts a byte each)."""
    dtype = np.dtype(x.dtype)
    bits = 4 if dtype in (np.dtype(jnp.int4), np.dtype(jnp.uint4)) else 8 * dtype.itemsize
    return -(-int(np.prod(x.shape)) * bits // 8)


def params_bytes(params: nnx.State) -> int:
    """Bytes of every param (quantized values and scales included)."""
    return sum(array_bytes(x) for x in jax.tree.leaves(params))


def zeros_for(part, shape: tuple[int, ...], dtype) -> np.ndarray | QArray:
    """Host zeros of a whole fused param of `shape` that `part`s (float, or `QArray`) fill:
    a quantized part's scale keeps its own size on its blocked axes."""
    if not isinstance(part, QArray):
        return np.zeros(shape, dtype)
    q, s = part.qvalue, part.scale
    sizes = zip(shape, s.shape, q.shape, strict=True)
    scale_shape = tuple(n if ps == pq else ps for n, ps, pq in sizes)
    return QArray(np.zeros(shape, q.dtype), np.zeros(scale_shape, s.dtype), qtype=part.qtype)


def to_saved(tree):
    """A pure-dict params tree with each `QArray` as `{"qvalue", "scale"}` (plain arrays for
    checkpoint writers)."""
    return jax.tree.map(
        lambda x: {"qvalue": x.qvalue, "scale": x.scale} if isinstance(x, QArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, QArray),
    )


def from_saved(tree):
    """The inverse of `to_saved`."""

    def back(node):
        if isinstance(node, dict) and set(node) == {"qvalue", "scale"}:
            return QArray(node["qvalue"], node["scale"], qtype=np.dtype(node["qvalue"].dtype))
        if isinstance(node, dict):
            return {k: back(v) for k, v in node.items()}
        return node

    return back(tree)


def quantized_bytes(config, dtype, name: str) -> int:
    """Bytes the params of `config` take with linear weights quantized to `name` (float
    params in `dtype`), from shapes alone."""
    from ferrum_jax.models.llama import abstract_model

    fmt = quantization_format(name)
    _, abstract = abstract_model(config, param_dtype=dtype)
    total = 0
    for path, variable in nnx.to_flat_state(abstract):
        x = variable.get_value()
        if fmt is None or not is_quantizable(path):
            total += array_bytes(x)
            continue
        q = jax.eval_shape(lambda a, n=path[-1]: quantize_weight(n, a, fmt), x)
        total += array_bytes(q.qvalue) + array_bytes(q.scale)
    return total
