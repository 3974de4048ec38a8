"""`Model`: one model handle — configs, graphdef, params, tokenizer and where it came from."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx

from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.models import quant
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import graph_facts, init_model

if TYPE_CHECKING:
    from ferrum_jax.text.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Model:
    """A model ready for `ferrum_jax.engine`, the executor, the CLI and the bench.

    The functional API takes `(model.graphdef, model.params)`: params stay an argument, so a
    training loop passes new weights to the same compiled programs (`with_params`).
    """

    config: ModelConfig
    """The checkpoint's own architecture: what users, `info` and `ModelInfo` see."""
    graphdef: nnx.GraphDef
    """Static structure of the module; it carries `runtime_config` and `dtype`."""
    params: nnx.State
    """Weights, in `param_dtype`."""
    tokenizer: Tokenizer | None = None
    """The checkpoint's tokenizer, or None when it ships none."""
    source: str = "<memory>"
    """Path it was loaded from."""
    format: str = "memory"
    """`"hf"`, `"gguf"`, `"orbax"`, or `"memory"` for a model built in this process."""

    @property
    def runtime_config(self) -> ModelConfig:
        """The config actually compiled: `config` with heads adapted to a mesh, if any."""
        return graph_facts(self.graphdef)[0]

    @property
    def dtype(self) -> np.dtype:
        """Compute dtype (also the KV cache's)."""
        return graph_facts(self.graphdef)[1]

    @property
    def param_dtype(self) -> np.dtype:
        """Storage dtype of the float weights (of the norms too, when linear weights are
        quantized)."""
        leaves = jax.tree.leaves(self.params, is_leaf=lambda x: isinstance(x, quant.QArray))
        return np.dtype(next(x for x in leaves if not isinstance(x, quant.QArray)).dtype)

    @property
    def quantization(self) -> str | None:
        """`"int8"` or `"int4"` when the linear weights are quantized (`models.quant`)."""
        return quant.quantization_of(self.params)

    @property
    def param_bytes(self) -> int:
        """Bytes the weights take (int4 packed two a byte), all devices' shards counted once."""
        return quant.params_bytes(self.params)

    def quantized(self, quantize: str | None) -> Model:
        """This model with its linear weights quantized (`"int8"`, `"int4"`; None: as is)."""
        if quantize in (None, "none") or self.quantization == quantize:
            return self
        if self.quantization is not None:
            raise FerrumError.invalid_parameter(
                f"{self.source} is already quantized to {self.quantization}, not {quantize}"
            )
        quant.quantization_format(quantize, self.config)
        return self.with_params(quant.quantize_params(self.params, quantize))

    @property
    def model_config(self) -> ModelConfig:
        """Alias of `config` (the name `LoadedModel` used)."""
        return self.config

    @property
    def checkpoint_config(self) -> ModelConfig | None:
        """`config` when the runtime config differs from it (heads adapted), else None."""
        return self.config if self.runtime_config != self.config else None

    def with_params(self, params: nnx.State) -> Model:
        """The same model with other weights of the same shapes (e.g. after a training step)."""
        return dataclasses.replace(self, params=params)

    def on_mesh(
        self,
        mesh: jax.sharding.Mesh,
        *,
        pad_heads: bool = True,
        rules: Mapping[str, str | None] | None = None,
    ) -> Model:
        """This model with heads adapted to `mesh` and params sharded on it (exact logits);
        `rules` maps logical axes to mesh axes (default `sharding.LOGICAL_RULES`; e.g.
        `sharding.EXPERT_TENSOR_PARALLEL_RULES` splits experts' inner dim, not experts)."""
        from ferrum_jax import sharding

        if self.runtime_config != self.config:
            raise FerrumError.invalid_parameter(f"{self.source} is already adapted to a mesh")
        if self.quantization is not None:
            # Heads are adapted on float weights, then quantized (scales of padded heads).
            raise FerrumError.invalid_parameter(
                f"{self.source} is quantized; load it onto the mesh quantized instead: "
                "load_model(..., mesh=mesh, quantize=...)"
            )
        _, graphdef, params = sharding.prepare_for_mesh(
            self.config, self.graphdef, self.params, mesh, pad_heads=pad_heads, rules=rules
        )
        return dataclasses.replace(self, graphdef=graphdef, params=params)

    @classmethod
    def init(
        cls,
        config: ModelConfig,
        *,
        seed: int = 0,
        dtype: str = "float32",
        tokenizer: Tokenizer | None = None,
    ) -> Model:
        """A randomly initialised model (params and compute in `dtype`)."""
        graphdef, params = init_model(config, param_dtype=model_dtype(dtype), seed=seed)
        return cls(config, graphdef, params, tokenizer=tokenizer)


LoadedModel = Model
"""The name `load_model`'s result had before `Model`."""
