"""What a checkpoint holds, from its metadata alone: config, tensor encodings, sizes, tokenizer.

Reads GGUF metadata and tensor infos, safetensors JSON headers, or the orbax marker and
tree metadata, and never a weight: `ferrum-jax info` and the CLI's checks before loading
(prompt length against the context, chat template present) cost a fraction of a second
where a load costs seconds. The same validation as a load runs (names and shapes against
the config), so a checkpoint that describes cleanly fails a load only on its data.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from ferrum_jax.checkpoint.gguf import (
    config_from_gguf,
    read_gguf_header,
    read_gguf_tokenizer,
)
from ferrum_jax.checkpoint.gguf import validate_layout as validate_gguf_layout
from ferrum_jax.checkpoint.hf_config import read_config
from ferrum_jax.checkpoint.load import model_format
from ferrum_jax.checkpoint.orbax import _PARAMS as ORBAX_PARAMS
from ferrum_jax.checkpoint.orbax import read_marker
from ferrum_jax.checkpoint.safetensors import checkpoint_entries
from ferrum_jax.checkpoint.safetensors import validate_layout as validate_hf_layout
from ferrum_jax.checkpoint.tokenizer_files import has_tokenizer, load_tokenizer
from ferrum_jax.errors import FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.text.tokenizer import Tokenizer

# safetensors' own dtype names, which `info` shows for HF checkpoints.
_SAFETENSORS_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclasses.dataclass(frozen=True)
class Encoding:
    """The tensors of a checkpoint stored in one encoding."""

    name: str
    """GGUF type (`Q4_1`, `Q8_0`, `F32`, ...), safetensors dtype (`BF16`, ...) or orbax dtype."""
    tensors: int
    nbytes: int
    """Bytes they take in the file."""


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """A checkpoint described without reading its weights."""

    source: str
    format: str
    """`"hf"`, `"gguf"` or `"orbax"`."""
    config: ModelConfig
    file_bytes: int
    """Bytes of the weight files on disk."""
    encodings: tuple[Encoding, ...]
    """Tensor encodings, most bytes first: the file's quantization mix."""
    has_tokenizer: bool
    has_chat_template: bool


def describe_model(path: str | os.PathLike | None = None) -> ModelDescription:
    """Describes what `load_model(path)` would load (None: the embedded default model)."""
    source, kind = model_format(path)
    if kind == "gguf":
        return _describe_gguf(source)
    if kind == "hf":
        return _describe_hf(source)
    return _describe_orbax(source)


def read_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer | None:
    """The tokenizer `load_model(path)` would attach, read without the weights."""
    source, kind = model_format(path)
    if kind == "gguf":
        return read_gguf_tokenizer(source, read_gguf_header(source))
    return load_tokenizer(source) if has_tokenizer(source) else None


def _mix(sizes: list[tuple[str, int]]) -> tuple[Encoding, ...]:
    count: collections.Counter[str] = collections.Counter()
    nbytes: collections.Counter[str] = collections.Counter()
    for name, size in sizes:
        count[name] += 1
        nbytes[name] += size
    ranked = sorted(count, key=lambda name: (-nbytes[name], name))
    return tuple(Encoding(name, count[name], nbytes[name]) for name in ranked)


def _describe_gguf(path: pathlib.Path) -> ModelDescription:
    header = read_gguf_header(path)
    config = config_from_gguf(header, path)
    validate_gguf_layout(config, header, path)
    template = header.metadata.get("tokenizer.chat_template")
    return ModelDescription(
        source=str(path),
        format="gguf",
        config=config,
        file_bytes=path.stat().st_size,
        encodings=_mix([(t.ggml_type.name, t.nbytes) for t in header.tensors.values()]),
        has_tokenizer="tokenizer.ggml.tokens" in header.metadata,
        has_chat_template=isinstance(template, str) and bool(template),
    )


def _tokenizer_facts(root: pathlib.Path) -> tuple[bool, bool]:
    """(has a tokenizer, it has a chat template) of a directory, as a load would see them."""
    if not has_tokenizer(root):
        return False, False
    # Building the tokenizer settles where the template comes from (jinja file, config
    # string, named list) exactly as loading does; a tokenizer.json parses in milliseconds.
    return True, load_tokenizer(root).chat_template is not None


def _describe_hf(root: pathlib.Path) -> ModelDescription:
    entries = checkpoint_entries(root)
    config = read_config(root)
    validate_hf_layout(config, entries, root)
    tokenizer, template = _tokenizer_facts(root)
    files = {entry.file for entry in entries.values()}
    return ModelDescription(
        source=str(root),
        format="hf",
        config=config,
        file_bytes=sum(file.stat().st_size for file in files),
        encodings=_mix([(_SAFETENSORS_NAMES[e.dtype.name], e.nbytes) for e in entries.values()]),
        has_tokenizer=tokenizer,
        has_chat_template=template,
    )


def _describe_orbax(root: pathlib.Path) -> ModelDescription:
    read_marker(root)
    config = read_config(root)
    params = root / ORBAX_PARAMS
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.metadata(params).item_metadata
    # Orbax raises many exception types for a damaged checkpoint.
    except Exception as e:
        raise FerrumError.invalid_format(f"{params}: cannot read the params metadata: {e}") from e
    finally:
        checkpointer.close()
    arrays = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")]
    tokenizer, template = _tokenizer_facts(root)
    return ModelDescription(
        source=str(root),
        format="orbax",
        config=config,
        file_bytes=sum(f.stat().st_size for f in params.rglob("*") if f.is_file()),
        encodings=_mix([(str(a.dtype), _nbytes(a.shape, a.dtype)) for a in arrays]),
        has_tokenizer=tokenizer,
        has_chat_template=template,
    )


def _nbytes(shape: tuple[int, ...], dtype: object) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
