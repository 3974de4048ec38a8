"""Params built tensor by tensor from a checkpoint reader, onto one device or a mesh."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ferrum_jax import progress, sharding
from ferrum_jax.checkpoint.layout import (
    CheckpointTensor,
    checkpoint_layout,
    params_from_checkpoint,
)
from ferrum_jax.errors import FerrumError
from ferrum_jax.finite import is_finite
from ferrum_jax.models import quant
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import abstract_model

Place = Callable[[tuple[str | int, ...], np.ndarray], jax.Array]
"""`place(param_path, host_array) -> jax.Array`: puts one param on its device(s)."""

Read = Callable[[CheckpointTensor], np.ndarray]
"""`read(tensor) -> host array` in HF layout (any float dtype)."""


def check_allow_non_finite(value: object) -> bool:
    """`allow_non_finite` as given, once checked to be a bool (a string `"false"` would be
    truthy and load NaN weights)."""
    if not isinstance(value, bool):
        raise FerrumError.invalid_parameter(
            f"allow_non_finite must be True or False, got {type(value).__name__} {value!r}"
        )
    return value


def refuse_non_finite(array: Any, source: str | os.PathLike, name: str) -> None:
    """One `FerrumError` naming checkpoint tensor `name` of `source` when `array` (a whole
    tensor or a part of it) holds NaN or infinity.

    Readers call it on each tensor as they read it, before quantization: int8/int4 would
    turn the corruption into finite garbage that no logit shows.
    """
    if not is_finite(array):
        raise FerrumError.model(
            f"{os.fspath(source)}: tensor {name!r} holds NaN or infinity (a corrupted "
            "checkpoint?); pass allow_non_finite=True to load it anyway"
        )


def load_for_mesh(
    config: ModelConfig,
    read: Read,
    mesh: jax.sharding.Mesh,
    *,
    param_dtype: np.dtype = np.float32,
    dtype: np.dtype | None = None,
    pad_heads: bool = True,
    quantize: str | None = None,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """`params_from_checkpoint` straight onto `mesh`: `(config', graphdef', params')`.

    Each tensor is read, head-adapted on the host, quantized (`quantize`) and placed with
    `sharding.placer` before the next is read: a process transfers only its own devices'
    slices, and no device ever holds an unsharded copy of a sharded weight. Use it in every
    process of a multi-host job.
    """
    layout = sharding.mesh_head_layout(config, mesh, pad_heads=pad_heads)
    new_config = layout.adapt_config(config)
    place = sharding.placer(mesh, new_config)
    fmt = quant.quantization_format(quantize, config)
    if fmt is not None:  # after the head adaptation: scales of the adapted (padded) heads
        place = quant.quantizing_place(place, fmt)
    _, params = params_from_checkpoint(
        config,
        read,
        param_dtype=param_dtype,
        dtype=dtype,
        place=lambda path, array: place(path, layout.adapt(path, array)),
    )
    graphdef, _ = abstract_model(new_config, param_dtype=param_dtype, dtype=dtype)
    return new_config, graphdef, params


def build_params(
    config: ModelConfig,
    read: Read,
    dtype: np.dtype,
    *,
    place: Place | None = None,
    mesh: jax.sharding.Mesh | None = None,
    label: str = "loading",
    quantize: str | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """`(graphdef, params)` read tensor by tensor (params and compute in `dtype`; linear
    weights quantized to `quantize` as they are read, see `models.quant`).

    On a mesh each tensor is head-adapted and placed straight into its shards as it is
    read (`load_for_mesh`); the graphdef then carries the adapted runtime config. A progress
    bar over the tensors is drawn on stderr when it is a terminal (`ferrum_jax.progress`).
    """
    bar = progress.bar(len(checkpoint_layout(config)), label, "tensor")

    def counted(tensor: CheckpointTensor) -> np.ndarray:
        array = read(tensor)
        bar.update()
        return array

    with bar:
        if mesh is not None:
            _, graphdef, params = load_for_mesh(
                config, counted, mesh, param_dtype=dtype, dtype=dtype, quantize=quantize
            )
            return graphdef, params
        fmt = quant.quantization_format(quantize, config)
        if fmt is not None:
            place = quant.quantizing_place(place or _to_device, fmt)
        return params_from_checkpoint(config, counted, param_dtype=dtype, dtype=dtype, place=place)


def _to_device(_path: tuple[str | int, ...], array) -> jax.Array:
    return jax.tree.map(jax.numpy.asarray, array)
