"""Device meshes and logical-axis sharding rules.

Typical use (one process, or each process of a multi-host job after `initialize`)::

    mesh = make_mesh(*parse_mesh("data=2,model=4"))
    config, graphdef, params = prepare_for_mesh(config, graphdef, params, mesh)
    cache = shard_cache(init_cache(config, slots, max_len), mesh)
    logits, cache = engine.prefill(graphdef, params, cache, tokens)  # runs SPMD
    host_logits = to_host(logits)
"""

from ferrum_jax.sharding.heads import (
    HeadLayout,
    adapt_heads,
    exact_model_sizes,
    head_layout,
    mesh_head_layout,
    prepare_for_mesh,
)
from ferrum_jax.sharding.mesh import (
    AXES,
    DATA,
    MODEL,
    initialize,
    is_primary,
    make_mesh,
    mesh_from_spec,
    mesh_shape,
    parse_mesh,
)
from ferrum_jax.sharding.rules import (
    EXPERT_TENSOR_PARALLEL_RULES,
    LOGICAL_RULES,
    cache_shardings,
    logical_to_spec,
    page_shardings,
    param_shardings,
    placer,
    shard_cache,
    shard_params,
    to_host,
)

__all__ = [
    "AXES",
    "DATA",
    "EXPERT_TENSOR_PARALLEL_RULES",
    "LOGICAL_RULES",
    "MODEL",
    "HeadLayout",
    "adapt_heads",
    "cache_shardings",
    "exact_model_sizes",
    "head_layout",
    "initialize",
    "is_primary",
    "logical_to_spec",
    "make_mesh",
    "mesh_from_spec",
    "mesh_head_layout",
    "mesh_shape",
    "page_shardings",
    "param_shardings",
    "parse_mesh",
    "placer",
    "prepare_for_mesh",
    "shard_cache",
    "shard_params",
    "to_host",
]
