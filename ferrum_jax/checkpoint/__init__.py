"""Checkpoint I/O, the only package that reads or writes model files.

Readers (`safetensors`, `gguf`, `orbax`) sit on shared pieces below them (`layout`: the
HF tensor table; `build`: params tensor by tensor onto a device or mesh; `hf_config`,
`tokenizer_files`) and under one dispatcher above them (`load`); `describe` reads the same
files' metadata without their weights. Imports flow one way.
"""

from ferrum_jax.checkpoint.build import load_for_mesh
from ferrum_jax.checkpoint.describe import (
    Encoding,
    ModelDescription,
    describe_model,
    read_tokenizer,
)
from ferrum_jax.checkpoint.gguf import load_gguf
from ferrum_jax.checkpoint.layout import (
    CheckpointTensor,
    checkpoint_layout,
    hf_state_dict,
    params_from_checkpoint,
)
from ferrum_jax.checkpoint.load import default_model_path, load_model, model_format
from ferrum_jax.checkpoint.orbax import load_orbax, save_orbax
from ferrum_jax.checkpoint.safetensors import load_hf
from ferrum_jax.checkpoint.tokenizer_files import load_tokenizer, save_tokenizer
from ferrum_jax.model import LoadedModel, Model

__all__ = [
    "CheckpointTensor",
    "Encoding",
    "LoadedModel",
    "Model",
    "ModelDescription",
    "checkpoint_layout",
    "default_model_path",
    "describe_model",
    "hf_state_dict",
    "load_for_mesh",
    "load_gguf",
    "load_hf",
    "load_model",
    "load_orbax",
    "load_tokenizer",
    "model_format",
    "params_from_checkpoint",
    "read_tokenizer",
    "save_orbax",
    "save_tokenizer",
]
