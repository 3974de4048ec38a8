"""HF checkpoints: `config.json` + safetensors, validated from the headers before any read.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to `{dtype, shape, data_offsets}`, then the raw data. Every header is parsed
and checked (dtypes, byte counts, offsets inside the file, names and shapes against the
config's `checkpoint_layout`) before a single weight is read, so a hostile or truncated
file fails with a `FerrumError` naming the file and tensor instead of allocating.

Tensors are then read one at a time straight from the file into an owned numpy array
(no mmap: a param placed with `jax.device_put` could otherwise alias the file's pages).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import jax
import ml_dtypes
import numpy as np

from ferrum_jax.checkpoint.build import Place, build_params
from ferrum_jax.checkpoint.hf_config import read_config
from ferrum_jax.checkpoint.layout import CheckpointTensor, checkpoint_layout
from ferrum_jax.checkpoint.tokenizer_files import has_tokenizer, load_tokenizer
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# The safetensors library's own limit; anything larger is not a real header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
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
    """Parses and validates the header of one safetensors file (reads no tensor data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FerrumError.invalid_format(
                f"{path}: {size} bytes is too short for a safetensors file (no header length)"
            )
        length = int.from_bytes(prefix, "little")
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise FerrumError.invalid_format(
                f"{path}: header length {length} is absurd for a file of {size} bytes "
                f"(limit {_MAX_HEADER_BYTES}); not a safetensors file or truncated"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    # ValueError: bad JSON, bad UTF-8, integer literals past Python's digit limit.
    except (ValueError, RecursionError) as e:
        raise FerrumError.invalid_format(f"{path}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise FerrumError.invalid_format(f"{path}: header is not a JSON object")
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    return entries


def _entry(path: pathlib.Path, name: str, info: Any, data_start: int, size: int) -> TensorEntry:
    def bad(why: str) -> FerrumError:
        return FerrumError.invalid_format(f"{path}: tensor {name!r}: {why}")

    if not isinstance(info, dict):
        raise bad("header entry is not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype_name not in _DTYPES:
        raise bad(f"dtype {dtype_name!r} is not a float weight dtype (supported: {list(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    dtype = _DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a huge claim cannot overflow
    begin, end = offsets
    if end - begin != nbytes:
        raise bad(f"{dtype_name} {shape} needs {nbytes} bytes, data_offsets span {end - begin}")
    if data_start + end > size:
        raise bad(f"data ends at byte {data_start + end}, past the end of the {size}-byte file")
    return TensorEntry(path, name, dtype, tuple(shape), data_start + begin, nbytes)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
) -> Model:
    """Loads an HF directory (`config.json` + safetensors, optional tokenizer files)."""
    target = model_dtype(dtype)
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
            return _read(files[entry.file], entry)

        graphdef, params = build_params(
            config, read, target, place=place, mesh=mesh, label=f"loading {root.name}"
        )
    return Model(config, graphdef, params, tokenizer=tokenizer, source=str(root), format="hf")
