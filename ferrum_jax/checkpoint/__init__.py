"""Checkpoint loaders and savers: HF safetensors, GGUF, orbax; tokenizers."""

from ferrum_jax.checkpoint.gguf import load_gguf
from ferrum_jax.checkpoint.loaded import LoadedModel, default_model_path, load_model
from ferrum_jax.checkpoint.orbax import load_orbax, save_orbax
from ferrum_jax.checkpoint.safetensors import load_hf

__all__ = [
    "LoadedModel",
    "default_model_path",
    "load_gguf",
    "load_hf",
    "load_model",
    "load_orbax",
    "save_orbax",
]
