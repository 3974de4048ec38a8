"""Device meshes (`data` x `model`) and multi-host initialisation.

A mesh has two axes: `data` (batch rows, i.e. cache slots) and `model` (tensor parallelism:
attention heads, MLP columns, vocabulary). `make_mesh(data, model)` uses the first
`data * model` devices; across processes (multi-host) it must use all of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ferrum_jax.errors import FerrumError

DATA = "data"
"""Mesh axis of batch rows (data parallelism)."""
MODEL = "model"
"""Mesh axis of heads / MLP columns / vocabulary (tensor parallelism)."""
AXES = (DATA, MODEL)

_MESH_ITEM = re.compile(r"^\s*(data|model)\s*=\s*(-?\d+)\s*$")


def _check_size(name: str, value: object) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise FerrumError.invalid_parameter(f"mesh {name} must be an integer, got {value!r}")
    if value < 1:
        raise FerrumError.invalid_parameter(f"mesh {name} must be >= 1, got {value}")
    return int(value)


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "model")` mesh of `data * model` devices (default: `jax.devices()`).

    Uses the first `data * model` devices when there are more (single process only: a
    multi-process mesh must span every process's devices). Axes are `AxisType.Auto`, so
    the compiler propagates shardings from the params and cache (no explicit-sharding mode).
    Raises `FerrumError.invalid_parameter` for sizes < 1 and `FerrumError.device` when the
    mesh does not fit the devices.
    """
    data = _check_size(DATA, data)
    model = _check_size(MODEL, model)
    explicit = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    need = data * model
    if need > len(devices):
        raise FerrumError.device(
            f"mesh data={data} x model={model} needs {need} devices, {len(devices)} available"
        )
    if not explicit and jax.process_count() > 1 and need != len(devices):
        raise FerrumError.device(
            f"mesh data={data} x model={model} uses {need} devices; a mesh across "
            f"{jax.process_count()} processes must use all {len(devices)} devices"
        )
    try:
        return jax.make_mesh(
            (data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
        )
    except ValueError as e:
        raise FerrumError.device(f"cannot build mesh data={data} x model={model}: {e}") from e


def parse_mesh(spec: str) -> tuple[int, int]:
    """`"data=2,model=4"` -> `(2, 4)` (the CLI `--mesh` flag); an omitted axis is 1.

    Also accepts `"model=8"`, `"data=2"` and `""` (-> `(1, 1)`). Raises
    `FerrumError.invalid_parameter` on anything else.
    """
    if not isinstance(spec, str):
        raise FerrumError.invalid_parameter(f"mesh spec must be a string, got {spec!r}")
    sizes = {DATA: 1, MODEL: 1}
    seen: set[str] = set()
    if spec.strip():
        for item in spec.split(","):
            match = _MESH_ITEM.match(item)
            if match is None:
                raise FerrumError.invalid_parameter(
                    f"bad mesh spec {spec!r}: expected 'data=N,model=M' (e.g. 'data=2,model=4')"
                )
            name, value = match.group(1), int(match.group(2))
            if name in seen:
                raise FerrumError.invalid_parameter(f"bad mesh spec {spec!r}: {name} given twice")
            seen.add(name)
            sizes[name] = _check_size(name, value)
    return sizes[DATA], sizes[MODEL]


def mesh_from_spec(spec: str) -> Mesh:
    """The mesh a `--mesh data=D,model=M` flag describes (`parse_mesh` + `make_mesh`)."""
    data, model = parse_mesh(spec)
    return make_mesh(data=data, model=model)


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    """`(data, model)` sizes of a mesh (a missing axis counts as 1)."""
    return int(mesh.shape.get(DATA, 1)), int(mesh.shape.get(MODEL, 1))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    timeout_s: int = 300,
    recoverable: bool = False,
    heartbeat_timeout_s: int = 100,
) -> None:
    """Joins a multi-process (multi-host) JAX job; call before any other JAX work.

    Wraps `jax.distributed.initialize`: pass the coordinator `"host:port"`, the number of
    processes and this process's id explicitly, or nothing on Cloud TPU / SLURM / Open MPI,
    where JAX reads them from the environment. On CPU, cross-process collectives use gloo.
    A second call is a no-op. Afterwards `jax.devices()` lists every process's devices and
    `make_mesh` builds a global mesh; each process must then run the same program.

    `recoverable`: a process that dies does not bring the others down (by default the
    coordination service ends every process once one misses heartbeats for
    `heartbeat_timeout_s`); a multi-host executor needs it to fail a call and exit cleanly.
    Every process must pass the same value.
    """
    if jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if recoverable:
        jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    except (ValueError, TypeError) as e:
        raise FerrumError.invalid_parameter(
            f"multi-host initialisation needs coordinator_address, num_processes and "
            f"process_id (or a TPU/SLURM environment that provides them): {e}"
        ) from e
    except RuntimeError as e:
        raise FerrumError.device(f"multi-host initialisation failed: {e}") from e


def is_primary() -> bool:
    """True in process 0 (the one that prints and writes files); True when single-process."""
    return jax.process_index() == 0
