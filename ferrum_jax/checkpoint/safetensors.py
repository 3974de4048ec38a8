"""HF checkpoints: `config.json` + safetensors, validated from the headers before any read.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to `{dtype, shape, data_offsets}`, then the raw data. Every file is first
validated by the `safetensors` library itself (the header's size and JSON, and offsets that
cover the data exactly once: no duplicate names, overlapping or out-of-file tensors, gaps or
trailing bytes), then checked here (float dtypes, names and shapes against the config's
`checkpoint_layout`) before a single weight is read, so a hostile or truncated file fails
with a `FerrumError` naming the file (and the tensor) instead of allocating.

Tensors are then read one at a time straight from the file into an owned numpy array
(no mmap: a param placed with `jax.device_put` could otherwise alias the file's pages).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from ferrum_jax.checkpoint.build import (
    Place,
    build_params,
    check_allow_non_finite,
    refuse_non_finite,
)
from ferrum_jax.checkpoint.hf_config import read_config
from ferrum_jax.checkpoint.layout import CheckpointTensor, checkpoint_layout
from ferrum_jax.checkpoint.tokenizer_files import has_tokenizer, load_tokenizer
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.quant import quantization_format

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Little-endian on disk; numpy's native order on every platform JAX runs on.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, validated against the file's size."""

    file: pathlib.Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def read_header(path: pathlib.Path) -> dict[str, TensorEntry]:
    """Validates one safetensors file and returns its tensors (reads no tensor data)."""
    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise FerrumError.invalid_format(f"{path}: not a valid safetensors file: {reason}") from e
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))  # the library parsed it: valid, at most 100 MB
    data_start = 8 + length
    return {
        name: _entry(path, name, info, data_start)
        for name, info in header.items()
        if name != "__metadata__"
    }


def _entry(path: pathlib.Path, name: str, info: dict[str, Any], data_start: int) -> TensorEntry:
    dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    if dtype_name not in _DTYPES:
        raise FerrumError.invalid_format(
            f"{path}: tensor {name!r}: dtype {dtype_name!r} is not a float weight dtype "
            f"(supported: {list(_DTYPES)})"
        )
    return TensorEntry(
        path, name, _DTYPES[dtype_name], tuple(shape), data_start + begin, end - begin
    )


def checkpoint_entries(root: pathlib.Path) -> dict[str, TensorEntry]:
    """Every tensor of the single-file or sharded safetensors checkpoint in `root`."""
    single, index = root / SINGLE_FILE, root / INDEX_FILE
    if index.is_file():
        return _sharded_entries(root, index)
    if single.is_file():
        return read_header(single)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise FerrumError.unsupported(
            f"{root}: only pickle weights ({', '.join(pickles)}); pickles are never loaded "
            "because unpickling runs arbitrary code. Convert the checkpoint to safetensors "
            "(e.g. load it with transformers in a trusted environment and `save_pretrained` "
            "it) and load that."
        )
    raise FerrumError.not_found(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


def _sharded_entries(root: pathlib.Path, index: pathlib.Path) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        raise FerrumError.invalid_format(f"{index}: not a safetensors index: {e!r}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FerrumError.invalid_format(f"{index}: weight_map is not a name -> file object")
    entries: dict[str, TensorEntry] = {}
    for shard in sorted(set(weight_map.values())):
        # Shard names are plain file names next to the index; never follow a path out of root.
        if pathlib.Path(shard).name != shard or shard in (".", ".."):
            raise FerrumError.invalid_format(f"{index}: shard name {shard!r} is not a file name")
        if not (root / shard).is_file():
            raise FerrumError.not_found(f"{index}: shard {shard} is missing from {root}")
        for name, entry in read_header(root / shard).items():
            if name in entries:
                raise FerrumError.invalid_format(
                    f"{root / shard}: tensor {name!r} is also in {entries[name].file.name}"
                )
            entries[name] = entry
    for name, shard in weight_map.items():
        if name not in entries or entries[name].file.name != shard:
            raise FerrumError.invalid_format(
                f"{index}: maps tensor {name!r} to {shard}, which does not hold it"
            )
    return entries


def validate_layout(
    config: ModelConfig, entries: Mapping[str, TensorEntry], root: pathlib.Path
) -> dict[str, TensorEntry]:
    """Checks names and shapes against the config; returns the entries to read, by name."""
    # Every layer holds tensors: a bogus num_hidden_layers must not build a huge layout.
    if config.num_layers > len(entries):
        raise FerrumError.model(
            f"{root}: config.json declares {config.num_layers} layers, the checkpoint holds "
            f"only {len(entries)} tensors"
        )
    expected = {t.name: t for t in checkpoint_layout(config)}
    for name, entry in entries.items():
        if name in expected:
            if entry.shape != expected[name].shape:
                raise FerrumError.model(
                    f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}, "
                    f"config.json implies {list(expected[name].shape)}"
                )
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # a recomputable buffer older transformers saved
        elif (
            name == "lm_head.weight"
            and config.tie_word_embeddings
            and entry.shape == (config.vocab_size, config.hidden_size)
        ):
            continue  # a tied head saved anyway; the embedding is the head, as in HF
        else:
            raise FerrumError.model(
                f"{entry.file}: unexpected tensor {name!r} "
                f"(not part of the {config.architecture} layout that config.json describes)"
            )
    missing = [name for name in expected if name not in entries]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FerrumError.model(f"{root}: missing tensors {shown}{more} required by config.json")
    return {name: entries[name] for name in expected}


def _read(f: BinaryIO, entry: TensorEntry) -> np.ndarray:
    array = np.empty(entry.shape, entry.dtype)
    f.seek(entry.start)
    if f.readinto(array.reshape(-1).view(np.uint8)) != entry.nbytes:
        raise FerrumError.invalid_format(
            f"{entry.file}: tensor {entry.name!r} was cut short while reading (file truncated?)"
        )
    return array


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    place: Place | None = None,
    mesh: jax.sharding.Mesh | None = None,
    quantize: str | None = None,
    allow_non_finite: bool = False,
) -> Model:
    """Loads an HF directory (`config.json` + safetensors, optional tokenizer files); linear
    weights are quantized to `quantize` (`"int8"`, `"int4"`) tensor by tensor.

    A tensor holding NaN or infinity is refused, by name, unless `allow_non_finite`."""
    target = model_dtype(dtype)
    quantization_format(quantize)
    check_allow_non_finite(allow_non_finite)
    root = pathlib.Path(path)
    if not root.is_dir():
        raise FerrumError.not_found(f"{root}: not a directory")
    entries = checkpoint_entries(root)  # first: a pickle-only dir fails on that, not the config
    config = read_config(root)
    to_read = validate_layout(config, entries, root)
    tokenizer = load_tokenizer(root) if has_tokenizer(root) else None
    with contextlib.ExitStack() as stack:
        files = {
            file: stack.enter_context(open(file, "rb"))
            for file in sorted({e.file for e in to_read.values()})
        }

        def read(tensor: CheckpointTensor) -> np.ndarray:
            entry = to_read[tensor.name]
            array = _read(files[entry.file], entry)
            if not allow_non_finite:
                refuse_non_finite(array, entry.file, entry.name)
            return array

        graphdef, params = build_params(
            config,
            read,
            target,
            place=place,
            mesh=mesh,
            label=f"loading {root.name}",
            quantize=quantize,
        )
    return Model(config, graphdef, params, tokenizer=tokenizer, source=str(root), format="hf")
