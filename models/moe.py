"""Mixture of experts (Mixtral, Qwen3-MoE): a top-k router and SwiGLU experts run as grouped
matmuls.

Each token is routed to `num_experts_per_tok` experts. The `T * k` (token, expert) pairs are
sorted by expert so that each expert's rows are contiguous, and every expert multiplies
only its own rows in one `jax.lax.ragged_dot` (group sizes = rows per expert): the cost is
that of the routed pairs, never of every expert on every token (a Pallas grouped matmul on
TPU, a dense fallback only where the backend lowers `ragged_dot` so).

Expert weights carry the logical axis `experts` (expert parallelism: `model` holds a slice
of the experts) and `expert_mlp` (tensor parallelism: each expert's inner dimension split);
`ferrum_jax.sharding` maps one of them onto `model`. Both are exact: the sum over experts
and over the inner dimension is the same, only its partial sums live on other devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.layers import activation, param


class MoE(nnx.Module):
    """Routed experts: `sum_j w_j * down_j(act(gate_j(x)) * up_j(x))` over the top-k experts j.

    `router: [embed, experts]`; `gate_up_proj: [experts, embed, 2, expert_mlp]` (gate, then
    up); `down_proj: [experts, expert_mlp, embed]`.
    """

    def __init__(self, config: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        e, n, f = config.hidden_size, config.num_experts, config.expert_intermediate_size
        self.router = param(rngs, (e, n), ("embed", "router"), param_dtype, "normal")
        self.gate_up_proj = param(
            rngs, (n, e, 2, f), ("experts", "embed", "gate_up", "expert_mlp"), param_dtype, "normal"
        )
        self.down_proj = param(
            rngs, (n, f, e), ("experts", "expert_mlp", "embed"), param_dtype, "normal"
        )
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.act = config.hidden_act

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`x: [T, embed]` -> (weights `[T, k]` in x's dtype, experts `[T, k]` int32).

        Softmax over all experts in float32, then the top k (renormalised to sum to one when
        the model says so), as HF's routers compute it.
        """
        logits = jnp.einsum("te,en->tn", x, self.router[...].astype(x.dtype))
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights.astype(x.dtype), experts.astype(jnp.int32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x: [T, embed]` -> `[T, embed]`."""
        dtype, (tokens, e) = x.dtype, x.shape
        n, _, _, f = self.gate_up_proj.shape
        weights, experts = self.route(x)
        with jax.named_scope("dispatch"):
            flat = experts.reshape(-1)  # [T * k] (token, slot) pairs, token-major
            order = jnp.argsort(flat, stable=True)
            rows = order // self.top_k  # the token of each expert-sorted pair
            sizes = jnp.bincount(flat, length=n).astype(jnp.int32)
            routed = jnp.take(x, rows, axis=0)
        with jax.named_scope("experts"):
            gate_up = jax.lax.ragged_dot(
                routed, self.gate_up_proj[...].astype(dtype).reshape(n, e, 2 * f), sizes
            )
            gated = activation(self.act)(gate_up[:, :f]) * gate_up[:, f:]
            out = jax.lax.ragged_dot(gated, self.down_proj[...].astype(dtype), sizes)
        with jax.named_scope("combine"):
            out = out * jnp.take(weights.reshape(-1), order)[:, None]
            return jnp.zeros((tokens, e), dtype).at[rows].add(out)
