"""Make attention heads divisible by the `model` mesh axis, exactly.

Tensor parallelism shards query heads and KV heads on `model`; `head_dim` is never split.
When `model` does not divide `num_kv_heads` (SmolLM2-135M: 9 query heads, 3 KV heads),
`HeadLayout` rewrites the attention weights so that it does, without changing a logit:

1. **KV heads are replicated** `kv_repeat = lcm(kv, model) / kv` times (the smallest
   multiple of `kv` that `model` divides). Copy `c` of KV head `k` becomes KV head
   `k * kv_repeat + c`; k/v projections and biases are copied.
2. **Each original GQA group** (the `group = heads / kv` query heads of KV head `k`) is dealt
   out to the copies of `k`: copy `c` gets original query heads
   `k * group + c * group' ... + group' - 1` where `group' = ceil(group / kv_repeat)`.
   New query head `j` therefore attends to new KV head `j // group'`, a copy of original KV
   head `source(j) // group` — the same KV head as before.
3. **Missing query heads are padded**: when `kv_repeat` does not divide `group`, the last
   copies get zero query heads (zero q weights and bias, zero `o_proj` rows). Their
   attention output is multiplied by zero rows of `o_proj`, so they add exactly 0.

The new config has `num_heads = kv * kv_repeat * group'` and `num_kv_heads = kv * kv_repeat`
(`head_dim` unchanged); the KV cache must be built from it (it holds the replicated heads,
sharded on `model` like the heads that write it). Report the original config to users.
Examples (heads/kv -> heads'/kv'): 9/3 at model=2 -> 12/6, model=4 -> 12/12,
model=8 -> 24/24; 8/4 at model=8 -> 8/8 (no padding); 9/3 at model=3 -> unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ferrum_jax.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import abstract_model, graph_facts
from ferrum_jax.sharding.mesh import mesh_shape
from ferrum_jax.sharding.rules import shard_params

# Fused q/k/v leaf name -> its KV-head axis (the next axis holds the group's query heads,
# then the key, then the value; `models.layers.Attention`).
_QKV_AXES: dict[str, int] = {"qkv_proj": 1, "qkv_bias": 0}
# Leaf name -> its query-head axis.
_QUERY_AXES: dict[str, int] = {"o_proj": 0}


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """How the attention heads of a config are rearranged for a `model` axis size."""

    num_heads: int
    """Original query heads."""
    num_kv_heads: int
    """Original KV heads."""
    kv_repeat: int
    """Copies of each KV head."""
    group: int
    """Query heads per KV head after the change."""

    @property
    def heads(self) -> int:
        """Query heads after the change (padding included)."""
        return self.kv_heads * self.group

    @property
    def kv_heads(self) -> int:
        """KV heads after the change."""
        return self.num_kv_heads * self.kv_repeat

    @property
    def padding(self) -> int:
        """Zero query heads added."""
        return self.heads - self.num_heads

    @property
    def is_identity(self) -> bool:
        return self.kv_repeat == 1 and self.heads == self.num_heads

    def q_source(self) -> np.ndarray:
        """`[heads]`: the original query head of each new one, -1 for a zero pad head."""
        old_group = self.num_heads // self.num_kv_heads
        j = np.arange(self.heads)
        kv_new, slot = j // self.group, j % self.group
        kv_old, copy = kv_new // self.kv_repeat, kv_new % self.kv_repeat
        within = copy * self.group + slot
        return np.where(within < old_group, kv_old * old_group + within, -1)

    def kv_source(self) -> np.ndarray:
        """`[kv_heads]`: the original KV head of each new one."""
        return np.arange(self.kv_heads) // self.kv_repeat

    def adapt_config(self, config: ModelConfig) -> ModelConfig:
        """`config` with the new head counts (head_dim and everything else unchanged)."""
        if (config.num_heads, config.num_kv_heads) != (self.num_heads, self.num_kv_heads):
            raise FerrumError.invalid_parameter(
                f"head layout is for {self.num_heads}/{self.num_kv_heads} heads, config has "
                f"{config.num_heads}/{config.num_kv_heads}"
            )
        return dataclasses.replace(config, num_heads=self.heads, num_kv_heads=self.kv_heads)

    def adapt(self, path: tuple[str | int, ...], array):
        """One param (numpy or jax) at nnx `path` in the new layout; non-head params as is."""
        name = path[-1] if path else None
        if self.is_identity or (name not in _QKV_AXES and name not in _QUERY_AXES):
            return array
        xp = np if isinstance(array, np.ndarray) else jnp
        where = ".".join(map(str, path))
        if name in _QUERY_AXES:
            axis = _QUERY_AXES[name]
            self._expect(where, array, axis, self.num_heads)
            source = self.q_source()
            out = xp.take(array, np.maximum(source, 0), axis=axis)
            return _zero_where(xp, out, source >= 0, axis)
        axis = _QKV_AXES[name]
        old_group = self.num_heads // self.num_kv_heads
        self._expect(where, array, axis, self.num_kv_heads)
        self._expect(where, array, axis + 1, old_group + 2)
        # New KV head j copies old KV head kv_source[j]; its query slots take the old group's
        # heads that q_source deals to it (or zeros), then the key and value slots follow.
        queries = self.q_source().reshape(self.kv_heads, self.group)
        slots = np.concatenate(
            [
                np.where(queries >= 0, queries % old_group, 0),
                np.full((self.kv_heads, 1), old_group),
                np.full((self.kv_heads, 1), old_group + 1),
            ],
            axis=1,
        )
        keep = np.concatenate([queries >= 0, np.ones((self.kv_heads, 2), bool)], axis=1)
        copied = xp.take(array, self.kv_source(), axis=axis)
        shape = [1] * array.ndim
        shape[axis], shape[axis + 1] = slots.shape
        out = xp.take_along_axis(copied, slots.reshape(shape), axis=axis + 1)
        return xp.where(keep.reshape(shape), out, xp.zeros((), out.dtype))

    @staticmethod
    def _expect(where: str, array, axis: int, size: int) -> None:
        if array.shape[axis] != size:
            raise FerrumError.invalid_format(
                f"{where}: axis {axis} has {array.shape[axis]} entries, expected {size}"
            )


def _zero_where(xp, out, keep: np.ndarray, axis: int):
    """`out` with the entries along `axis` where `keep` is False set to zero."""
    if keep.all():
        return out
    shape = [-1 if i == axis else 1 for i in range(out.ndim)]
    return xp.where(keep.reshape(shape), out, xp.zeros((), out.dtype))


def head_layout(config: ModelConfig, model: int) -> HeadLayout:
    """The smallest exact head layout for a `model` axis of this size (see module doc)."""
    if model < 1:
        raise FerrumError.invalid_parameter(f"model axis size must be >= 1, got {model}")
    h, kv = config.num_heads, config.num_kv_heads
    repeat = math.lcm(kv, model) // kv
    group = -(-(h // kv) // repeat)
    return HeadLayout(num_heads=h, num_kv_heads=kv, kv_repeat=repeat, group=group)


def exact_model_sizes(config: ModelConfig, limit: int = 64) -> list[int]:
    """`model` axis sizes up to `limit` that need no zero-padded query heads."""
    return [m for m in range(1, limit + 1) if head_layout(config, m).padding == 0]


def mesh_head_layout(config: ModelConfig, mesh: Mesh, *, pad_heads: bool = True) -> HeadLayout:
    """`head_layout` for `mesh`'s `model` axis; `pad_heads=False` refuses zero-padded heads."""
    model = mesh_shape(mesh)[1]
    layout = head_layout(config, model)
    if layout.padding and not pad_heads:
        raise FerrumError.invalid_parameter(
            f"{config.num_heads} query heads / {config.num_kv_heads} KV heads do not split over "
            f"model={model} without padding; model sizes that work: "
            f"{exact_model_sizes(config, max(model, 16))} (or pass pad_heads=True)"
        )
    return layout


def _names(path) -> tuple[str | int, ...]:
    """nnx state path (`('layers', 0, 'attn', 'q_proj')`) of a `jax.tree_util` key path."""
    names: list[str | int] = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(key.idx)
    return tuple(names)


def adapt_heads(
    config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, model: int
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """`(config', graphdef', params')` with heads laid out for a `model` axis of this size.

    No placement: numpy leaves stay numpy, JAX arrays are rearranged by JAX ops. Same logits
    as the original model; see `HeadLayout`.
    """
    _, kv, slots, _ = params["layers"][0]["attn"]["qkv_proj"].get_value().shape
    got = (kv * (slots - 2), kv)
    if got != (config.num_heads, config.num_kv_heads):
        raise FerrumError.invalid_parameter(
            f"params have {got[0]}/{got[1]} query/KV heads, config says "
            f"{config.num_heads}/{config.num_kv_heads}"
        )
    layout = head_layout(config, model)
    if layout.is_identity:
        return config, graphdef, params
    dtype = graph_facts(graphdef)[1]
    params = jax.tree_util.tree_map_with_path(lambda path, x: layout.adapt(_names(path), x), params)
    config = layout.adapt_config(config)
    graphdef, _ = abstract_model(config, dtype=dtype)
    return config, graphdef, params


def prepare_for_mesh(
    config: ModelConfig,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    mesh: Mesh,
    *,
    pad_heads: bool = True,
    rules: Mapping[str, str | None] | None = None,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """`(config', graphdef', params')` ready for `mesh`: heads adapted, params sharded (by
    `rules`, default `LOGICAL_RULES`).

    KV heads are replicated and query heads zero-padded as needed (see `HeadLayout`); the
    model computes the same logits. `pad_heads=False` refuses (FerrumError listing the
    model sizes that work) instead of adding zero query heads. Build the KV cache from
    `config'` and shard it with `shard_cache`. Multi-process: every process passes the
    same params (same seed or checkpoint); `ferrum_jax.checkpoint.load_model(mesh=...)` loads
    checkpoints straight into their shards instead.
    """
    mesh_head_layout(config, mesh, pad_heads=pad_heads)
    config, graphdef, params = adapt_heads(config, graphdef, params, mesh_shape(mesh)[1])
    return config, graphdef, shard_params(params, mesh, rules)
