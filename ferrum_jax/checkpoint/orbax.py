"""Orbax checkpoints: params, `config.json`, tokenizer and a marker, saved atomically.

Layout of a saved directory:

    params/           orbax PyTree checkpoint of `nnx.to_pure_dict(params)`
    config.json       `ModelConfig.to_hf()`
    tokenizer.json    (+ tokenizer_config.json) when the model has a tokenizer
    ferrum_jax.json   the marker: format, version, dtype, quantization; written last

A quantized model's weights are saved as their int8/int4 values and scales
(`{"qvalue", "scale"}` per weight) and restored bit for bit.

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
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ferrum_jax.checkpoint.build import check_allow_non_finite, refuse_non_finite
from ferrum_jax.checkpoint.hf_config import read_config, write_config
from ferrum_jax.checkpoint.tokenizer_files import has_tokenizer, load_tokenizer, save_tokenizer
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models import quant
from ferrum_jax.models.llama import abstract_model

ORBAX_MARKER = "ferrum_jax.json"
"""Written last into an orbax checkpoint directory: its presence means the save completed."""
FORMAT = "ferrum-jax-orbax"
"""`format` field of the marker."""
VERSION = 2
"""Layout version this code writes: 2 has fused q/k/v and gate/up params."""
READABLE_VERSIONS = (1, 2)
"""Versions `load_orbax` reads (1: per-projection params, fused on load)."""
_PARAMS = "params"

Shardings = Callable[[tuple[str | int, ...]], jax.sharding.Sharding] | Mapping[Any, Any]
"""`shardings(param_path) -> Sharding`, or a tree shaped like the params (an `nnx.State` or
pure dict) whose leaves are Shardings."""


def check_destination(dst: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """`dst` as a path `save_orbax(..., dst, overwrite=overwrite)` may write (checked before
    any weight is loaded); `already_exists` or `io` otherwise.

    A new path is fine unless a file stands where one of its parent directories would go.
    With `overwrite`, so is an empty directory or a completed ferrum-jax orbax checkpoint;
    anything else (a file, a directory of other things) is never replaced, so a mistyped
    destination cannot delete someone's data.
    """
    dst = pathlib.Path(dst).absolute()  # orbax refuses relative paths
    if not (dst.exists() or dst.is_symlink()):
        for parent in dst.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise FerrumError.io(f"{dst}: {parent} is a file, not a directory")
                break
        return dst
    if not overwrite:
        raise FerrumError.already_exists(f"{dst}: already exists; choose a new directory")
    if dst.is_symlink() or not dst.is_dir():
        raise FerrumError.already_exists(f"{dst}: exists and is not a directory; not replaced")
    if any(dst.iterdir()) and not (dst / ORBAX_MARKER).is_file():
        raise FerrumError.already_exists(
            f"{dst}: exists and is not a ferrum-jax orbax checkpoint ({ORBAX_MARKER} is "
            "missing); not replaced"
        )
    return dst


def save_orbax(model: Model, dst: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Saves `model` to the new directory `dst` (atomic rename last).

    The saved config is the one the params match (`runtime_config`). `overwrite` replaces an
    existing checkpoint or empty directory at `dst` (see `check_destination`): the new save
    is complete before the old one is moved aside and deleted.
    """
    dst = check_destination(dst, overwrite=overwrite)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    except OSError as e:
        raise FerrumError.io(f"{dst}: cannot create the checkpoint directory: {e}") from e
    try:
        _write(model, tmp)
        old = _move_aside(dst) if overwrite else None
        try:
            # rename(2) is atomic and fails on an existing non-empty dst instead of merging.
            os.rename(tmp, dst)
        except OSError as e:
            if old is not None:
                os.rename(old, dst)  # put the previous checkpoint back
            raise FerrumError.already_exists(f"{dst}: cannot move the save into place: {e}") from e
        _fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_aside(dst: pathlib.Path) -> pathlib.Path | None:
    """Renames an existing `dst` to a hidden sibling (deleted once the new save is in place)."""
    if not dst.exists():
        return None
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old)  # onto the empty directory mkdtemp made: atomic, never a merge
    return old


def _write(model: Model, tmp: pathlib.Path) -> None:
    write_config(model.runtime_config, tmp)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(tmp / _PARAMS, quant.to_saved(nnx.to_pure_dict(model.params)))
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
        "quantization": model.quantization,
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
    if marker.get("version") not in READABLE_VERSIONS:
        raise FerrumError.unsupported(
            f"{path}: checkpoint version {marker.get('version')!r}; this code reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
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
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    shardings: Shardings | None = None,
    allow_non_finite: bool = False,
) -> Model:
    """Loads a directory written by `save_orbax`, converting params to `dtype`.

    With `shardings`, each param is restored straight into its shards (no gathered copy).
    A param holding NaN or infinity is refused, by its saved name, unless `allow_non_finite`.
    """
    target = model_dtype(dtype)
    finite = not check_allow_non_finite(allow_non_finite)
    root = pathlib.Path(path).absolute()  # orbax refuses relative paths
    marker = read_marker(root)
    version = marker["version"]
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
    if version == 1:  # other param names and shapes: checked as they are fused
        return _load_v1(root, config, graphdef, abstract, target, shardings, finite)
    if marker.get("quantization") is not None:
        return _load_quantized(root, config, graphdef, abstract, target, shardings, finite)
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
    if finite:
        _refuse_non_finite(restored, root / _PARAMS)
    nnx.replace_by_pure_dict(abstract, restored)
    tokenizer = load_tokenizer(root) if has_tokenizer(root) else None
    return Model(config, graphdef, abstract, tokenizer=tokenizer, source=str(root), format="orbax")


def _refuse_non_finite(tree: Any, source: pathlib.Path) -> None:
    """`refuse_non_finite` on every leaf of restored params, named by its saved path
    (`layers.0.attn.qkv_proj`, `....scale` for a quantized weight's scales)."""
    for keys, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
        refuse_non_finite(leaf, source, name)


def _load_quantized(root, config, graphdef, abstract, target, shardings, finite) -> Model:
    """A checkpoint saved quantized: values and scales restored bit for bit, in their saved
    dtypes (float params in `target`), each weight's values checked against the config."""
    if shardings is not None:
        raise FerrumError.unsupported(
            f"{root}: a quantized checkpoint restores onto one device; put it on a mesh by "
            "loading the float checkpoint with load_model(..., mesh=mesh, quantize=...)"
        )
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(root / _PARAMS)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)

        def wanted(keys, leaf) -> jax.ShapeDtypeStruct:
            quantized = str(getattr(keys[-1], "key", keys[-1])) in ("qvalue", "scale")
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype if quantized else target)

        restored = checkpointer.restore(
            root / _PARAMS, jax.tree_util.tree_map_with_path(wanted, tree)
        )
    except Exception as e:
        raise FerrumError.invalid_format(f"{root / _PARAMS}: cannot restore params: {e}") from e
    finally:
        checkpointer.close()
    if finite:  # the saved values and scales: an int8/int4 weight is NaN only by its scale
        _refuse_non_finite(restored, root / _PARAMS)
    restored = quant.from_saved(_int_keys(restored))
    expected = {p: v.get_value().shape for p, v in nnx.to_flat_state(abstract)}
    got = {
        tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keys): tuple(leaf.shape)
        for keys, leaf in jax.tree_util.tree_leaves_with_path(
            restored, is_leaf=lambda x: isinstance(x, quant.QArray)
        )
    }
    if expected != got:
        wrong = sorted(set(expected.items()) ^ set(got.items()), key=str)[:3]
        raise FerrumError.model(
            f"{root}: the saved params do not match config.json (param, shape): {wrong}"
        )
    nnx.replace_by_pure_dict(abstract, restored)
    tokenizer = load_tokenizer(root) if has_tokenizer(root) else None
    return Model(config, graphdef, abstract, tokenizer=tokenizer, source=str(root), format="orbax")


def _int_keys(tree):
    """Layer indices back to ints (orbax restores dict keys as strings)."""
    if not isinstance(tree, dict):
        return tree
    return {
        int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()
    }


def _load_v1(root, config, graphdef, abstract, target, shardings, finite) -> Model:
    """A version-1 checkpoint (q/k/v and gate/up saved apart): restored whole, then fused
    into this version's params and placed."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        raw = checkpointer.restore(root / _PARAMS)
    except Exception as e:
        raise FerrumError.invalid_format(f"{root / _PARAMS}: cannot restore params: {e}") from e
    finally:
        checkpointer.close()
    if finite:
        _refuse_non_finite(raw, root / _PARAMS)
    kv, g = config.num_kv_heads, config.num_heads // config.num_kv_heads
    for layer in raw["layers"].values():
        attn, mlp = layer["attn"], layer["mlp"]
        e, _, d = np.shape(attn["q_proj"])
        attn["qkv_proj"] = np.concatenate(
            [
                np.asarray(attn.pop("q_proj")).reshape(e, kv, g, d),
                np.asarray(attn.pop("k_proj"))[:, :, None],
                np.asarray(attn.pop("v_proj"))[:, :, None],
            ],
            axis=2,
        )
        if "q_bias" in attn:
            attn["qkv_bias"] = np.concatenate(
                [
                    np.asarray(attn.pop("q_bias")).reshape(kv, g, d),
                    np.asarray(attn.pop("k_bias"))[:, None],
                    np.asarray(attn.pop("v_bias"))[:, None],
                ],
                axis=1,
            )
        mlp["gate_up_proj"] = np.stack(
            [np.asarray(mlp.pop("gate_proj")), np.asarray(mlp.pop("up_proj"))], axis=1
        )
    raw["layers"] = {int(k): v for k, v in raw["layers"].items()}
    placed = jax.tree_util.tree_map_with_path(
        lambda keys, leaf: jax.device_put(
            np.asarray(leaf).astype(target),
            _sharding(shardings, tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keys)),
        ),
        raw,
    )
    try:
        nnx.replace_by_pure_dict(abstract, placed)
    except (KeyError, ValueError) as e:
        raise FerrumError.invalid_format(f"{root / _PARAMS}: not a version-1 layout: {e}") from e
    tokenizer = load_tokenizer(root) if has_tokenizer(root) else None
    return Model(config, graphdef, abstract, tokenizer=tokenizer, source=str(root), format="orbax")
