"""Logical axis names -> mesh axes, and shardings of params and KV caches.

Rules (`LOGICAL_RULES`): `heads`, `kv_heads`, `mlp` and `vocab` go on `model` (column-parallel
q/k/v and gate/up, row-parallel o and down, vocab-parallel embedding and LM head), `batch`
and KV `pages` on `data`; everything else (`embed`, `head_dim`, `page`, `layers`, unknown
names) is replicated. `head_dim` is never split.

Mixture-of-experts weights (`ferrum_jax.models.moe`) name both `experts` and `expert_mlp`:
by default `experts` takes `model` (expert parallelism: each device holds a slice of the
experts) and `expert_mlp` takes it only when the expert count does not divide it (tensor
parallelism inside every expert); `EXPERT_TENSOR_PARALLEL_RULES` always splits `expert_mlp`.

A dimension whose size is not a multiple of its mesh axis is **replicated** on that axis
(exact: replication never changes results, it only costs memory and parallelism). Heads
that do not divide the `model` axis should be made divisible first with
`ferrum_jax.sharding.prepare_for_mesh`, which replicates KV heads and pads query heads
exactly. A mesh axis shards at most one dimension of an array (the first that asks for it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ferrum_jax.cache import LENGTHS_AXES, KVCache
from ferrum_jax.errors import FerrumError
from ferrum_jax.models.attention import PageLayout, Pool
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import abstract_model
from ferrum_jax.sharding.mesh import DATA, MODEL

LOGICAL_RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,
    "head_dim": None,
    "length": None,
    "layers": None,
    "pages": DATA,
    "page": None,
    "experts": MODEL,
    "expert_mlp": MODEL,
}
"""Logical axis name -> mesh axis (None: replicated). Names not listed are replicated."""

EXPERT_TENSOR_PARALLEL_RULES: Mapping[str, str | None] = {**LOGICAL_RULES, "experts": None}
"""`LOGICAL_RULES` with every expert whole on each device and its inner dim split on `model`."""

Path = tuple[str | int, ...]


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] | None = None,
) -> PartitionSpec:
    """The `PartitionSpec` of an array of `shape` with logical `axes` on `mesh`.

    Replicates a dim when its rule names no mesh axis, the mesh lacks that axis or has it
    of size 1, the axis already shards an earlier dim, or the size is not a multiple of it.
    """
    rules = LOGICAL_RULES if rules is None else rules
    if len(axes) != len(shape):
        raise FerrumError.invalid_parameter(
            f"logical axes {tuple(axes)} do not match a {len(shape)}-d shape {tuple(shape)}"
        )
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        n = mesh.shape.get(axis, 1) if axis is not None else 1
        if axis is None or n == 1 or axis in used or size % n:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def _sharding(axes, shape, mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(shape), mesh, rules))


def param_shardings(
    params: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] | None = None
) -> nnx.State:
    """A `NamedSharding` per param (same pytree structure as `params`).

    Logical names come from each `nnx.Param`'s `out_sharding` (`nnx.get_partition_spec`);
    `params` may hold arrays or `jax.ShapeDtypeStruct`s.
    """
    specs = nnx.get_partition_spec(params)
    # A quantized weight (`QArray`) gets one spec; its values and scale both shard by it.
    return jax.tree.map(
        lambda spec, x: jax.tree.map(lambda a: _sharding(tuple(spec), a.shape, mesh, rules), x),
        specs,
        params,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def page_shardings(
    pages: tuple[Pool, ...],
    layout: PageLayout,
    mesh: Mesh,
    rules: Mapping[str, str | None] | None = None,
) -> tuple[Pool, ...]:
    """`NamedSharding`s of per-layer KV pages: KV heads on `model` (like the heads that
    write them), pages on `data` (a functional cache's rows), the rest replicated."""
    return tuple(
        tuple(
            _sharding(axes, x.shape, mesh, rules) for axes, x in zip(layout.axes, pool, strict=True)
        )
        for pool in pages
    )


def cache_shardings(
    cache: KVCache, mesh: Mesh, rules: Mapping[str, str | None] | None = None
) -> KVCache:
    """`KVCache` of `NamedSharding`s: its pages by `page_shardings`, lengths on `data`."""
    return dataclasses.replace(
        cache,
        pages=page_shardings(cache.pages, cache.layout, mesh, rules),
        lengths=_sharding(LENGTHS_AXES, cache.lengths.shape, mesh, rules),
    )


def _put(tree, shardings):
    """`device_put`, or per-shard host copies when the target spans other processes."""
    leaves = jax.tree.leaves(shardings)
    if all(s.is_fully_addressable for s in leaves):
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else None
        if host is None:  # already a global array: let XLA reshard it.
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def shard_params(
    params: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] | None = None
) -> nnx.State:
    """`params` placed on `mesh` by `param_shardings`.

    Multi-process: every process must pass the same values (e.g. same seed or checkpoint);
    each one copies only its own devices' shards.
    """
    return _put(params, param_shardings(params, mesh, rules))


def shard_cache(
    cache: KVCache, mesh: Mesh, rules: Mapping[str, str | None] | None = None
) -> KVCache:
    """`cache` placed on `mesh` by `cache_shardings` (e.g. right after `init_cache`)."""
    return _put(cache, cache_shardings(cache, mesh, rules))


def placer(
    mesh: Mesh, config: ModelConfig, rules: Mapping[str, str | None] | None = None
) -> Callable[[Path, np.ndarray], jax.Array]:
    """A `place=` callback for `models.llama.params_from_checkpoint` that shards as it loads.

    `config` is the config the placed params belong to (after `prepare_for_mesh`'s head
    changes, if any; `load_for_mesh` wires both together). Each tensor becomes a global
    array via `jax.make_array_from_callback`: the host array (one tensor at a time, as
    `params_from_checkpoint` reads it) is sliced and only the slices of this process's own
    devices are transferred (each device receives just its shard). A tensor whose
    shape differs from `config`'s raises `FerrumError.invalid_format`.
    """
    _, abstract = abstract_model(config)
    flat_abstract = dict(nnx.to_flat_state(abstract))
    flat_specs = dict(nnx.to_flat_state(nnx.get_partition_spec(abstract)))

    def place(path: Path, array: np.ndarray) -> jax.Array:
        path = tuple(path)
        if path not in flat_abstract:
            raise FerrumError.invalid_format(f"no param at {'.'.join(map(str, path))}")
        want = tuple(flat_abstract[path].get_value().shape)
        if tuple(array.shape) != want:
            raise FerrumError.invalid_format(
                f"{'.'.join(map(str, path))}: shape {tuple(array.shape)}, expected {want}"
            )
        axes = tuple(flat_specs[path].get_value())

        def put(part) -> jax.Array:
            # A quantized weight's scale has its rank and axes: it shards like the weight.
            host = np.asarray(part)
            sharding = _sharding(axes, host.shape, mesh, rules)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(put, array)

    return place


def to_host(tree):
    """Numpy copies of every array in `tree` (e.g. logits or generated tokens).

    Arrays spanning other processes are gathered with `process_allgather`, a collective:
    every process must call `to_host` on the same arrays.
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)
