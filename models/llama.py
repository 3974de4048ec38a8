"""The decoder: token embedding, a stack of family blocks, final norm, LM head.

One class for every family (Llama, Mistral, Qwen2, Qwen3, SmolLM, Gemma 2/3, Mixtral,
Qwen3-MoE, Phi-3): the block comes from `ferrum_jax.models.family`, the rest from config
flags (embedding scale, norm offset, final-logit soft-cap, tied head).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.errors import FerrumError
from ferrum_jax.models.attention import AttentionMetadata, Pool
from ferrum_jax.models.blocks import DecoderLayer
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.family import family
from ferrum_jax.models.layers import norm, param, rope_angles
from ferrum_jax.models.quant import embedding, weight

__all__ = ["DecoderLayer", "Llama", "abstract_model", "graph_facts", "init_model"]


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
        block = family(config).block
        self.layers = nnx.List(
            [block(config, i, param_dtype=param_dtype, rngs=rngs) for i in range(config.num_layers)]
        )
        self.final_norm = norm(config, e, "embed", param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (e, v), ("embed", "vocab"), param_dtype, "normal")

    def hidden(
        self,
        tokens: jax.Array,
        meta: AttentionMetadata,
        pages: tuple[Pool, ...],
        impl: str = "xla",
    ) -> tuple[jax.Array, tuple[Pool, ...]]:
        """One ragged step up to the LM head: final-normed hidden states `[T, embed]`, and
        the per-layer pages with this step's keys/values written."""
        config, dtype = self.config, jnp.dtype(self.dtype)
        x = embedding(self.embed, tokens, dtype)
        if config.embed_scale:
            # HF rounds sqrt(hidden) to the compute dtype before multiplying.
            x = x * jnp.asarray(math.sqrt(config.hidden_size), dtype)
        ropes = {False: rope_angles(meta.positions, config, dtype)}
        if config.rope_local_theta is not None:
            ropes[True] = rope_angles(meta.positions, config, dtype, local=True)
        new_pages = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, pool = layer(x, ropes[config.uses_local_rope(i)], pages[i], meta, impl)
            new_pages.append(pool)
        return self.final_norm(x), tuple(new_pages)

    def head(self, x: jax.Array) -> jax.Array:
        """Logits `[n, vocab]` (float32) of final hidden states `x: [n, embed]`."""
        dtype = jnp.dtype(self.dtype)
        with jax.named_scope("lm_head"):
            if self.config.tie_word_embeddings:
                w, spec = weight(self.embed, dtype), "te,ve->tv"
            else:
                w, spec = weight(self.lm_head, dtype), "te,ev->tv"
            logits = jnp.einsum(spec, x.astype(dtype), w, preferred_element_type=jnp.float32)
            cap = self.config.final_logit_softcap
            return logits if cap is None else cap * jnp.tanh(logits / cap)

    def __call__(
        self,
        tokens: jax.Array,
        meta: AttentionMetadata,
        pages: tuple[Pool, ...],
        logits_at: jax.Array | None = None,
        impl: str = "xla",
    ) -> tuple[jax.Array, tuple[Pool, ...]]:
        """One ragged step: `tokens: [T]` -> logits `[T, vocab]` (`[R, vocab]` at token rows
        `logits_at: [R]`), and the per-layer pages with this step's keys/values written."""
        x, pages = self.hidden(tokens, meta, pages, impl)
        if logits_at is not None:
            x = x[logits_at]  # the LM head runs only on the rows asked for
        return self.head(x), pages


@functools.lru_cache(maxsize=64)
def graph_facts(graphdef: nnx.GraphDef) -> tuple[ModelConfig, np.dtype]:
    """The config and compute dtype `graphdef` was built with, read from its static attributes.

    Host code needs these facts without a module: `nnx.merge` would rebuild every layer.
    """
    found: dict[str, object] = {}
    for key, attr in graphdef.attributes:
        if key in ("config", "dtype") and key not in found and hasattr(attr, "value"):
            found[key] = attr.value  # the root module's attributes come first
        if len(found) == 2:
            return found["config"], np.dtype(found["dtype"])  # type: ignore[return-value]
    raise FerrumError.internal("graphdef carries no model config/dtype (not a ferrum-jax model?)")


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
        lambda: Llama(config, param_dtype=param_dtype, dtype=dtype or param_dtype, rngs=_OneKey())
    )
    return nnx.split(model)


class _OneKey:
    """The same key for every param: shapes need no randomness. `nnx.Rngs` bumps a traced
    counter per param, and each bump makes JAX walk the whole trace, quadratic in layers
    (16/64/128 layers: 0.4/3.1/19 s; with one key 0.1/0.3/0.7 s)."""

    def params(self) -> jax.Array:
        return jax.random.key(0)
