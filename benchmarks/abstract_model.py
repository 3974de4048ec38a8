"""Time `abstract_model` (shapes only, no allocation) for 16, 64 and 128 layers.

It must grow linearly with layers: checkpoint loaders build the abstract model first, and
real checkpoints have 80-126 layers. Run: `python benchmarks/abstract_model.py`.

Measured on the 2-core CI machine kind (seconds, 16/64/128 layers): 0.4/3.1/19 before the
fix (`nnx.Rngs` made tracing quadratic), 0.1/0.3/0.7 after.
"""

from __future__ import annotations

import time

from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import abstract_model


def config(layers: int) -> ModelConfig:
    return ModelConfig.from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )


def main() -> None:
    abstract_model(config(2))  # imports and first-trace costs out of the way
    for layers in (16, 64, 128):
        start = time.perf_counter()
        abstract_model(config(layers))
        print(f"{layers:4d} layers: {time.perf_counter() - start:6.2f} s")


if __name__ == "__main__":
    main()
