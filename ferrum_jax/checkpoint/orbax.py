"""Orbax checkpoints: params, `config.json`, tokenizer and a marker, saved atomically.

Layout of a saved directory:

    params/           orbax PyTree checkpoint of `nnx.to_pure_dict(params)`
    config.json       `ModelConfig.to_hf()`
    tokenizer.json    (+ tokenizer_config.json) when the model has a tokenizer
    ferrum_jax.json   the marker: format, version, dtype; written last

Everything is written into a hidden temporary sibling, fsynced, and renamed into place as
the very last step, so an interrupted save leaves either nothing at the destination or a
complete checkpoint; `load_orbax` refuses a directory without the marker.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ferrum_jax.checkpoint.hf_config import read_config, write_config
from ferrum_jax.checkpoint.tokenizer_files import has_tokenizer, load_tokenizer, save_tokenizer
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.llama import abstract_model

ORBAX_MARKER = "ferrum_jax.json"
"""Written last into an orbax checkpoint directory: its presence means the save completed."""
FORMAT = "ferrum-jax-orbax"
"""`format` field of the marker."""
VERSION = 1
"""Layout version this code writes and reads."""
_PARAMS = "params"

Shardings = Callable[[tuple[str | int, ...]], jax.sharding.Sharding] | Mapping[Any, Any]
"""`shardings(param_path) -> Sharding`, or a tree shaped like the params (an `nnx.State` or
pure dict) whose leaves are Shardings."""


def save_orbax(model: Model, dst: str | os.PathLike) -> None:
    """Saves `model` to the new directory `dst` (never overwrites; atomic rename last).

    The saved config is the one the params match (`runtime_config`).
    """
    dst = check_destination(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    except OSError as e:
        raise FerrumError.io(f"{dst}: cannot create the checkpoint directory: {e}") from e
    try:
        _write(model, tmp)
        try:
            # rename(2) is atomic and fails on an existing non-empty dst instead of merging.
            os.rename(tmp, dst)
        except OSError as e:
            raise FerrumError.already_exists(f"{dst}: cannot move the save into place: {e}") from e
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_destination(dst: str | os.PathLike) -> pathlib.Path:
    """`dst` as a path `save_orbax` can create: it must not exist, and no file may stand where
    one of its parent directories would go (checked before any weight is loaded)."""
    dst = pathlib.Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FerrumError.already_exists(f"{dst}: already exists; choose a new directory")
    for parent in dst.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FerrumError.io(f"{dst}: {parent} is a file, not a directory")
            break
    return dst


def _write(model: Model, tmp: pathlib.Path) -> None:
    write_config(model.runtime_config, tmp)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(tmp / _PARAMS, nnx.to_pure_dict(model.params))
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, tmp)
    _fsync_tree(tmp)
    # The marker goes last: only a directory holding everything else can carry it.
    marker = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(model.param_dtype),
        "source": model.format,
    }
    with open(tmp / ORBAX_MARKER, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _fsync_tree(root: pathlib.Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(pathlib.Path(dirpath))


def _fsync_dir(path: pathlib.Path) -> None:
    """Makes renames and new entries in `path` durable (POSIX; a no-op elsewhere)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(root: pathlib.Path) -> dict[str, Any]:
    """The marker of a completed save in `root`; errors when the save never completed."""
    path = root / ORBAX_MARKER
    if not path.is_file():
        raise FerrumError.not_found(
            f"{root}: no completed ferrum-jax orbax checkpoint ({ORBAX_MARKER} is missing; "
            "an interrupted save leaves none)"
        )
    try:
        marker = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise FerrumError.invalid_format(f"{path}: not valid JSON: {e}") from e
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise FerrumError.invalid_format(f"{path}: not a {FORMAT} marker")
    if marker.get("version") != VERSION:
        raise FerrumError.unsupported(
            f"{path}: checkpoint version {marker.get('version')!r}; this code reads {VERSION}"
        )
    return marker


def _sharding(shardings: Shardings | None, path: tuple[str | int, ...]) -> jax.sharding.Sharding:
    if shardings is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if callable(shardings):
        return shardings(path)
    node: Any = shardings
    for key in path:
        node = node[key]
    return node.get_value() if isinstance(node, nnx.Variable) else node


def _saved_shapes(params: pathlib.Path) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The saved params' shapes by path, read from the checkpoint's metadata (no arrays)."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(params)
    # Orbax raises many exception types for a damaged checkpoint.
    except Exception as e:
        raise FerrumError.invalid_format(f"{params}: cannot read the params' metadata: {e}") from e
    finally:
        checkpointer.close()
    tree = getattr(metadata, "item_metadata", metadata)
    return {
        tuple(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape)
        for keys, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def load_orbax(
    path: str | os.PathLike, *, dtype: str = "float32", shardings: Shardings | None = None
) -> Model:
    """Loads a directory written by `save_orbax`, converting params to `dtype`.

    With `shardings`, each param is restored straight into its shards (no gathered copy).
    """
    target = model_dtype(dtype)
    root = pathlib.Path(path)
    read_marker(root)
    config = read_config(root)
    saved = _saved_shapes(root / _PARAMS)
    layers = {key[1] for key in saved if len(key) > 1 and key[0] == "layers"}
    # Before building anything sized by the config: a bogus num_hidden_layers (10**6) would
    # otherwise build a million-layer abstract model first.
    if len(layers) != config.num_layers:
        raise FerrumError.model(
            f"{root / 'config.json'}: num_hidden_layers is {config.num_layers}, the saved "
            f"params hold {len(layers)} layers"
        )
    graphdef, abstract = abstract_model(config, param_dtype=target, dtype=target)
    expected = {
        tuple(str(k.key) for k in keys): tuple(leaf.shape)
        for keys, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))
    }
    if expected != saved:
        wrong = sorted(set(expected.items()) ^ set(saved.items()))[:3]
        raise FerrumError.model(
            f"{root}: the saved params do not match config.json (param, shape): {wrong}"
        )
    wanted = jax.tree_util.tree_map_with_path(
        lambda keys, leaf: jax.ShapeDtypeStruct(
            leaf.shape, target, sharding=_sharding(shardings, tuple(k.key for k in keys))
        ),
        nnx.to_pure_dict(abstract),
    )
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(root / _PARAMS, wanted)
    # Orbax raises many exception types for a damaged or mismatched checkpoint.
    except Exception as e:
        raise FerrumError.invalid_format(f"{root / _PARAMS}: cannot restore params: {e}") from e
    finally:
        checkpointer.close()
    nnx.replace_by_pure_dict(abstract, restored)
    tokenizer = load_tokenizer(root) if has_tokenizer(root) else None
    return Model(config, graphdef, abstract, tokenizer=tokenizer, source=str(root), format="orbax")
