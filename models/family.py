"""Model families: which block each HF model_type is built from, and what the family is called.

The one place a model_type picks its structure; everything else follows config fields
(norm offsets, soft-caps, experts, windows), so a new checkpoint of a known block needs no
code, and a new block is one `Family` entry here.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from ferrum_jax.errors import FerrumError
from ferrum_jax.models.blocks import DecoderLayer, SandwichDecoderLayer
from ferrum_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """A decoder family."""

    name: str
    """What users call it (`info`, the README's table)."""
    block: type[nnx.Module]
    """The decoder layer class: `block(config, layer, param_dtype=..., rngs=...)`."""


LLAMA = Family("Llama", DecoderLayer)
GEMMA = Family("Gemma", SandwichDecoderLayer)
MOE = Family("Mixture of experts", DecoderLayer)
PHI3 = Family("Phi-3", DecoderLayer)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
    "mixtral": MOE,
    "qwen3_moe": MOE,
    "phi3": PHI3,
}
"""HF model_type -> its family."""


def family(config: ModelConfig) -> Family:
    """The family `config` belongs to."""
    if config.model_type not in FAMILIES:
        raise FerrumError.unsupported(f"model_type {config.model_type!r} has no decoder family")
    return FAMILIES[config.model_type]
