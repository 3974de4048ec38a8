"""`JaxTensor`: the `TensorLike` implementation over a `jax.Array`, plus dtype/array helpers.

`JaxTensor` wraps the array it is given without copying (`JaxTensor(x).array is x`). JAX
arrays are immutable, so `view` and `reshape` return new `JaxTensor`s over new arrays rather
than aliasing views; nothing can observe the difference. Host copies happen only in
`to_vec_f32`, `to_vec_u32`, `argmax_last_dim_u32` (only the indices) and `as_numpy` of a
non-CPU array.

A tensor's `Device` index is the JAX device id. An array sharded over several devices
reports the device with the smallest id.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.errors import FerrumError
from ferrum_jax.interfaces import DataType, Device, TensorLike

__all__ = ["JaxTensor", "as_jax_array", "as_numpy", "datatype_of", "dtype_to_jnp"]

# FP8 is ambiguous (E4M3 vs E5M2) and the 4-bit types are packed storage formats, so no
# conversion target is chosen for them.
_JNP_DTYPES: dict[DataType, Any] = {
    DataType.FP32: jnp.float32,
    DataType.FP16: jnp.float16,
    DataType.BF16: jnp.bfloat16,
    DataType.INT32: jnp.int32,
    DataType.INT16: jnp.int16,
    DataType.INT8: jnp.int8,
    DataType.UINT32: jnp.uint32,
    DataType.UINT16: jnp.uint16,
    DataType.UINT8: jnp.uint8,
    DataType.BOOL: jnp.bool_,
}

_DATATYPES_BY_NAME: dict[str, DataType] = {
    "float32": DataType.FP32,
    "float16": DataType.FP16,
    "bfloat16": DataType.BF16,
    "int32": DataType.INT32,
    "int16": DataType.INT16,
    "int8": DataType.INT8,
    "int4": DataType.INT4,
    "uint32": DataType.UINT32,
    "uint16": DataType.UINT16,
    "uint8": DataType.UINT8,
    "uint4": DataType.UINT4,
    "bool": DataType.BOOL,
}

_U32_MAX = 2**32 - 1


def dtype_to_jnp(dtype: DataType) -> Any:
    """The JAX dtype for a `DataType`; FP8, INT4 and UINT4 raise `FerrumError.unsupported`."""
    try:
        return _JNP_DTYPES[dtype]
    except KeyError:
        raise FerrumError.unsupported(f"No JAX dtype for {dtype}") from None


def datatype_of(dtype: Any) -> DataType:
    """The `DataType` of a numpy/JAX dtype (or anything `np.dtype` accepts).

    Every float8 variant maps to FP8; 64-bit and complex types raise `FerrumError.unsupported`.
    """
    name = np.dtype(dtype).name
    if name.startswith("float8"):
        return DataType.FP8
    try:
        return _DATATYPES_BY_NAME[name]
    except KeyError:
        raise FerrumError.unsupported(f"No Ferrum DataType for dtype {name}") from None


def _device_of(device: jax.Device) -> Device:
    platform = device.platform.lower()
    if platform == "cpu":
        return Device.CPU
    if platform == "tpu":
        return Device.TPU(device.id)
    if platform == "metal":
        return Device.Metal
    if platform in ("gpu", "cuda", "rocm"):
        # JAX names both GPU vendors "gpu"; the client's platform version tells them apart.
        version = str(getattr(device.client, "platform_version", "")).lower()
        if platform == "rocm" or "rocm" in version:
            return Device.ROCm(device.id)
        return Device.CUDA(device.id)
    raise FerrumError.device(f"Unknown JAX platform {device.platform!r}")


def _jax_device_for(device: Device) -> jax.Device:
    candidates = list(jax.devices())
    if all(d.platform != "cpu" for d in candidates):
        # Raises RuntimeError when JAX_PLATFORMS leaves the CPU backend out.
        with contextlib.suppress(RuntimeError):
            candidates += jax.devices("cpu")
    for candidate in candidates:
        if _device_of(candidate) == device:
            return candidate
    raise FerrumError.device(f"No JAX device for {device}")


def _is_cpu(array: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in array.devices())


class JaxTensor(TensorLike):
    """Zero-copy `TensorLike` over a `jax.Array` (the `array` attribute)."""

    def __init__(self, array: jax.Array) -> None:
        if not isinstance(array, jax.Array):
            raise FerrumError.invalid_parameter(
                f"JaxTensor wraps a jax.Array, got {type(array).__name__}; use as_jax_array"
            )
        self.array = array

    def __repr__(self) -> str:
        return f"JaxTensor(shape={self.shape}, dtype={self.array.dtype}, device={self.device})"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> DataType:
        return datatype_of(self.array.dtype)

    @property
    def device(self) -> Device:
        return _device_of(min(self.array.devices(), key=lambda d: d.id))

    @property
    def is_contiguous(self) -> bool:
        # XLA owns the layout; every array is exposed as a dense row-major buffer.
        return True

    def view(self, start: Sequence[int], end: Sequence[int]) -> JaxTensor:
        shape = self.shape
        if len(start) != len(shape) or len(end) != len(shape):
            raise FerrumError.invalid_parameter(
                f"view of a {len(shape)}-D tensor needs {len(shape)} starts and ends, "
                f"got {len(start)} and {len(end)}"
            )
        for dim, (s, e, size) in enumerate(zip(start, end, shape, strict=True)):
            if not 0 <= s <= e <= size:
                raise FerrumError.invalid_parameter(
                    f"view range [{s}, {e}) out of bounds for dim {dim} of size {size}"
                )
        index = tuple(slice(s, e) for s, e in zip(start, end, strict=True))
        return JaxTensor(self.array[index])

    def reshape(self, shape: Sequence[int]) -> JaxTensor:
        new_shape = tuple(shape)
        if any(d < 0 for d in new_shape) or math.prod(new_shape) != self.numel:
            raise FerrumError.invalid_parameter(
                f"cannot reshape {self.shape} ({self.numel} elements) to {new_shape}"
            )
        return JaxTensor(self.array.reshape(new_shape))

    def to_cpu(self) -> JaxTensor:
        return self.to_device(Device.CPU)

    def to_device(self, device: Device) -> JaxTensor:
        target = _jax_device_for(device)
        if self.array.devices() == {target}:
            return self
        return JaxTensor(jax.device_put(self.array, target))

    def to_dtype(self, dtype: DataType) -> JaxTensor:
        target = dtype_to_jnp(dtype)
        if self.array.dtype == target:
            return self
        return JaxTensor(self.array.astype(target))

    def to_vec_f32(self) -> list[float]:
        return as_numpy(self).astype(np.float32).ravel().tolist()

    def to_vec_u32(self) -> list[int]:
        host = as_numpy(self)
        if self.dtype.is_float():
            # bfloat16/float16 hosts are widened so numpy's checks apply to them.
            host = host.astype(np.float32)
            if not np.isfinite(host).all():
                raise FerrumError.invalid_parameter("to_vec_u32: tensor holds NaN or infinity")
        if host.size and (host.min() < 0 or host.max() > _U32_MAX):
            raise FerrumError.invalid_parameter("to_vec_u32: values outside the u32 range")
        return host.astype(np.uint32).ravel().tolist()

    def argmax_last_dim_u32(self) -> list[int]:
        if self.is_scalar:
            raise FerrumError.invalid_parameter("argmax_last_dim_u32 of a scalar tensor")
        if self.shape[-1] == 0:
            raise FerrumError.invalid_parameter("argmax_last_dim_u32 over an empty last dim")
        array = self.array
        if all(d.platform == "cpu" for d in array.devices()):
            # Host memory already: numpy reads it in place, with no program to compile per
            # batch shape (an engine's sampling loop would otherwise compile at serve time).
            indices = np.argmax(np.asarray(array), axis=-1)
        else:
            # The reduction runs where the logits live; only the indices come to the host.
            indices = jax.device_get(jnp.argmax(array, axis=-1))
        return np.asarray(indices).astype(np.uint32).ravel().tolist()


def as_jax_array(x: Any) -> jax.Array:
    """A `jax.Array` for a JaxTensor (its own array), any TensorLike, numpy array or list."""
    if isinstance(x, JaxTensor):
        return x.array
    if isinstance(x, jax.Array):
        return x
    if isinstance(x, TensorLike):
        return jnp.asarray(_foreign_to_numpy(x))
    return jnp.asarray(x)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array for the same inputs; CPU-resident arrays are not copied."""
    if isinstance(x, JaxTensor):
        x = x.array
    if isinstance(x, jax.Array):
        return np.asarray(x) if _is_cpu(x) else np.asarray(jax.device_get(x))
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, TensorLike):
        return _foreign_to_numpy(x)
    return np.asarray(x)


def _foreign_to_numpy(x: TensorLike) -> np.ndarray:
    # Only the to_vec_* accessors are portable. Signed integers go through f32, which is exact
    # for magnitudes up to 2**24 (well above any vocabulary size).
    dtype = x.dtype
    unsigned = dtype is DataType.BOOL or dtype.value.startswith("UINT")
    flat = np.asarray(x.to_vec_u32() if unsigned else x.to_vec_f32())
    host = flat.reshape(x.shape)
    if dtype in _JNP_DTYPES:
        return host.astype(np.dtype(_JNP_DTYPES[dtype]))
    return host
