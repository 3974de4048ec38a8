"""Tests for JaxTensor, the TensorLike implementation over jax.Array, and its helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import tensor as tensor_module
from ferrum_jax.interfaces import DataType, Device, ErrorKind, FerrumError, TensorLike
from ferrum_jax.tensor import JaxTensor, as_jax_array, as_numpy, datatype_of, dtype_to_jnp


def arange(*shape: int, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


@contextlib.contextmanager
def raises_kind(kind: ErrorKind) -> Iterator[None]:
    with pytest.raises(FerrumError) as info:
        yield
    assert info.value.kind is kind, info.value


class ListTensor(TensorLike):
    """A foreign (non-JAX) tensor that only offers the portable to_vec accessors."""

    def __init__(self, values: Sequence[float], shape: Sequence[int], dtype: DataType) -> None:
        self._values, self._shape, self._dtype = list(values), tuple(shape), dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> DataType:
        return self._dtype

    @property
    def device(self) -> Device:
        return Device.CPU

    @property
    def is_contiguous(self) -> bool:
        return True

    def view(self, start: Sequence[int], end: Sequence[int]) -> TensorLike:
        raise NotImplementedError

    def reshape(self, shape: Sequence[int]) -> TensorLike:
        raise NotImplementedError

    def to_cpu(self) -> TensorLike:
        return self

    def to_device(self, device: Device) -> TensorLike:
        return self

    def to_dtype(self, dtype: DataType) -> TensorLike:
        raise NotImplementedError

    def to_vec_f32(self) -> list[float]:
        return [float(v) for v in self._values]

    def to_vec_u32(self) -> list[int]:
        return [int(v) for v in self._values]


# ---------------------------------------------------------------------------- wrapping


def test_wrapping_is_zero_copy() -> None:
    x = arange(2, 3)
    t = JaxTensor(x)
    assert t.array is x
    assert as_jax_array(t) is x
    assert as_jax_array(x) is x
    assert isinstance(t, TensorLike)


@pytest.mark.parametrize("bad", [np.zeros(3), [1, 2], 3.0])
def test_wrapping_requires_jax_array(bad: Any) -> None:
    with raises_kind(ErrorKind.INVALID_PARAMETER):
        JaxTensor(bad)


def test_metadata() -> None:
    t = JaxTensor(arange(2, 3, 4, dtype=jnp.bfloat16))
    assert t.shape == (2, 3, 4) and isinstance(t.shape, tuple)
    assert (t.ndim, t.numel, t.is_scalar, t.is_contiguous) == (3, 24, False, True)
    assert t.dtype is DataType.BF16 and t.size_bytes == 48
    assert t.device == Device.CPU
    scalar = JaxTensor(jnp.float32(1.0) + 0)
    assert scalar.shape == () and scalar.is_scalar and scalar.numel == 1
    assert "shape=(2, 3, 4)" in repr(t) and "bfloat16" in repr(t)


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("np_dtype", "datatype"),
    [
        (jnp.float32, DataType.FP32),
        (jnp.float16, DataType.FP16),
        (jnp.bfloat16, DataType.BF16),
        (jnp.float8_e4m3fn, DataType.FP8),
        (jnp.float8_e5m2, DataType.FP8),
        (jnp.int32, DataType.INT32),
        (jnp.int16, DataType.INT16),
        (jnp.int8, DataType.INT8),
        (jnp.int4, DataType.INT4),
        (jnp.uint32, DataType.UINT32),
        (jnp.uint16, DataType.UINT16),
        (jnp.uint8, DataType.UINT8),
        (jnp.uint4, DataType.UINT4),
        (jnp.bool_, DataType.BOOL),
        (np.dtype("float32"), DataType.FP32),
        ("int8", DataType.INT8),
    ],
)
def test_datatype_of(np_dtype: Any, datatype: DataType) -> None:
    assert datatype_of(np_dtype) is datatype


@pytest.mark.parametrize("np_dtype", [np.float64, np.int64, np.uint64, np.complex64])
def test_datatype_of_rejects_unmapped(np_dtype: Any) -> None:
    with raises_kind(ErrorKind.UNSUPPORTED):
        datatype_of(np_dtype)


@pytest.mark.parametrize(
    "datatype", [d for d in DataType if d not in (DataType.FP8, DataType.INT4, DataType.UINT4)]
)
def test_dtype_to_jnp_roundtrips(datatype: DataType) -> None:
    assert datatype_of(dtype_to_jnp(datatype)) is datatype


@pytest.mark.parametrize("datatype", [DataType.FP8, DataType.INT4, DataType.UINT4])
def test_dtype_to_jnp_rejects_ambiguous_and_packed(datatype: DataType) -> None:
    with raises_kind(ErrorKind.UNSUPPORTED):
        dtype_to_jnp(datatype)


def test_to_dtype() -> None:
    t = JaxTensor(jnp.array([1.7, -2.2, 3.0], dtype=jnp.float32))
    assert t.to_dtype(DataType.FP32) is t  # no-op conversion keeps the same tensor
    half = t.to_dtype(DataType.BF16)
    assert half.dtype is DataType.BF16 and half.array.dtype == jnp.bfloat16
    ints = t.to_dtype(DataType.INT32)
    assert ints.dtype is DataType.INT32 and ints.to_vec_f32() == [1.0, -2.0, 3.0]
    for unsupported in (DataType.FP8, DataType.INT4, DataType.UINT4):
        with raises_kind(ErrorKind.UNSUPPORTED):
            t.to_dtype(unsupported)


# ---------------------------------------------------------------------------- view, reshape


def test_view_is_per_dimension_half_open_slice() -> None:
    x = arange(2, 5, 7)
    v = JaxTensor(x).view([0, 4, 2], [2, 5, 6])
    assert v.shape == (2, 1, 4)
    np.testing.assert_array_equal(as_numpy(v), np.asarray(x)[0:2, 4:5, 2:6])
    empty = JaxTensor(x).view([1, 2, 3], [1, 2, 3])
    assert empty.shape == (0, 0, 0) and empty.numel == 0


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ([0, 0], [2, 5]),  # too few dims
        ([0, 0, 0, 0], [2, 5, 7, 1]),  # too many dims
        ([0, 0, 0], [2, 5]),  # mismatched lengths
        ([0, 3, 0], [2, 2, 7]),  # start > end
        ([0, 0, 0], [3, 5, 7]),  # end > size
        ([-1, 0, 0], [2, 5, 7]),  # negative start
    ],
)
def test_view_rejects_bad_ranges(start: list[int], end: list[int]) -> None:
    with raises_kind(ErrorKind.INVALID_PARAMETER):
        JaxTensor(arange(2, 5, 7)).view(start, end)


def test_reshape() -> None:
    x = arange(2, 6)
    r = JaxTensor(x).reshape([3, 4])
    assert r.shape == (3, 4)
    np.testing.assert_array_equal(as_numpy(r), np.asarray(x).reshape(3, 4))
    assert JaxTensor(x).reshape((12,)).shape == (12,)
    for bad in ([5, 2], [-1, 4], [12, 0]):
        with raises_kind(ErrorKind.INVALID_PARAMETER):
            JaxTensor(x).reshape(bad)


# ---------------------------------------------------------------------------- devices


def test_to_cpu_and_to_device() -> None:
    t = JaxTensor(arange(3))
    assert t.to_cpu() is t and t.to_device(Device.CPU) is t
    for missing in (Device.CUDA(99), Device.ROCm(99), Device.TPU(99)):
        with raises_kind(ErrorKind.DEVICE):
            t.to_device(missing)


def test_to_cpu_moves_accelerator_arrays() -> None:
    accelerators = [d for d in jax.devices() if d.platform != "cpu"]
    if not accelerators:
        pytest.skip("no accelerator visible to JAX")
    t = JaxTensor(jax.device_put(arange(4), accelerators[0]))
    assert t.device != Device.CPU and t.device.index == accelerators[0].id
    moved = t.to_cpu()
    assert moved.device == Device.CPU and moved.to_vec_f32() == [0.0, 1.0, 2.0, 3.0]
    assert moved.to_device(t.device).device == t.device


@pytest.mark.parametrize(
    ("platform", "version", "expected"),
    [
        ("cpu", "cpu", Device.CPU),
        ("gpu", "cuda 12080", Device.CUDA(3)),
        ("cuda", "", Device.CUDA(3)),
        ("gpu", "rocm 60300", Device.ROCm(3)),
        ("rocm", "", Device.ROCm(3)),
        ("tpu", "PJRT C API", Device.TPU(3)),
        ("METAL", "metal", Device.Metal),
    ],
)
def test_device_mapping_from_jax_platforms(platform: str, version: str, expected: Device) -> None:
    fake = SimpleNamespace(
        platform=platform, id=3, client=SimpleNamespace(platform_version=version)
    )
    assert tensor_module._device_of(fake) == expected  # type: ignore[arg-type]


def test_unknown_jax_platform_is_a_device_error() -> None:
    fake = SimpleNamespace(platform="quantum", id=0, client=SimpleNamespace(platform_version=""))
    with raises_kind(ErrorKind.DEVICE):
        tensor_module._device_of(fake)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- host data


def test_to_vec_f32_flattens_row_major() -> None:
    t = JaxTensor(arange(2, 3, dtype=jnp.bfloat16))
    out = t.to_vec_f32()
    assert out == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and all(type(v) is float for v in out)


def test_to_vec_u32() -> None:
    ids = JaxTensor(jnp.array([[3, 0], [7, 65535]], dtype=jnp.int32))
    out = ids.to_vec_u32()
    assert out == [3, 0, 7, 65535] and all(type(v) is int for v in out)
    assert JaxTensor(jnp.array([2.0, 9.0], dtype=jnp.bfloat16)).to_vec_u32() == [2, 9]
    assert JaxTensor(jnp.array([True, False])).to_vec_u32() == [1, 0]
    assert JaxTensor(jnp.zeros((0, 3), dtype=jnp.int32)).to_vec_u32() == []


@pytest.mark.parametrize(
    "bad",
    [
        jnp.array([1, -1], dtype=jnp.int32),
        jnp.array([1.0, jnp.nan], dtype=jnp.float32),
        jnp.array([jnp.inf], dtype=jnp.bfloat16),
        jnp.array([2.0**33], dtype=jnp.float32),
    ],
)
def test_to_vec_u32_rejects_values_outside_u32(bad: jax.Array) -> None:
    with raises_kind(ErrorKind.INVALID_PARAMETER):
        JaxTensor(bad).to_vec_u32()


def test_argmax_last_dim_over_leading_positions() -> None:
    logits = np.zeros((2, 3, 5), dtype=np.float32)
    logits[0, 0, 4] = logits[0, 1, 1] = logits[0, 2, 0] = 1.0
    logits[1, 0, 2] = logits[1, 1, 3] = 1.0  # logits[1, 2] is all ties -> first index
    out = JaxTensor(jnp.asarray(logits)).argmax_last_dim_u32()
    assert out == [4, 1, 0, 2, 3, 0] and all(type(v) is int for v in out)
    assert JaxTensor(jnp.array([0.1, 0.9, 0.3])).argmax_last_dim_u32() == [1]
    bf16 = JaxTensor(jnp.array([[1.0, 5.0], [7.0, 2.0]], dtype=jnp.bfloat16))
    assert bf16.argmax_last_dim_u32() == [1, 0]


def test_argmax_last_dim_errors() -> None:
    with raises_kind(ErrorKind.INVALID_PARAMETER):
        JaxTensor(jnp.float32(1.0) + 0).argmax_last_dim_u32()
    with raises_kind(ErrorKind.INVALID_PARAMETER):
        JaxTensor(jnp.zeros((2, 0))).argmax_last_dim_u32()


# ---------------------------------------------------------------------------- conversions


def test_as_numpy_avoids_copies_on_host() -> None:
    host = np.arange(6.0)
    assert as_numpy(host) is host
    x = arange(2, 3)
    view = as_numpy(JaxTensor(x))
    # A CPU jax.Array is exposed without a copy.
    assert view.__array_interface__["data"][0] == x.unsafe_buffer_pointer()
    np.testing.assert_array_equal(as_numpy(x), view)
    np.testing.assert_array_equal(as_numpy([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))


def test_as_jax_array_from_host_values() -> None:
    from_list = as_jax_array([[1, 2], [3, 4]])
    assert isinstance(from_list, jax.Array) and from_list.shape == (2, 2)
    from_np = as_jax_array(np.array([1.5, 2.5], dtype=np.float32))
    assert from_np.dtype == jnp.float32 and from_np.tolist() == [1.5, 2.5]


@pytest.mark.parametrize(
    ("values", "dtype", "jnp_dtype"),
    [
        ([0.5, -1.25, 2.0, 3.0], DataType.FP32, jnp.float32),
        ([1.0, 2.0, 3.0, 4.0], DataType.BF16, jnp.bfloat16),
        ([-3, 0, 7, 100_000], DataType.INT32, jnp.int32),
        ([0, 4_000_000_000, 7, 1], DataType.UINT32, jnp.uint32),
        ([1, 0, 0, 1], DataType.BOOL, jnp.bool_),
    ],
)
def test_foreign_tensors_convert_via_to_vec(
    values: list[float], dtype: DataType, jnp_dtype: Any
) -> None:
    foreign = ListTensor(values, (2, 2), dtype)
    arr = as_jax_array(foreign)
    assert arr.shape == (2, 2) and arr.dtype == jnp_dtype
    host = as_numpy(foreign)
    assert host.shape == (2, 2) and host.dtype == np.dtype(jnp_dtype)
    np.testing.assert_array_equal(host.astype(np.float64).ravel(), np.asarray(values, np.float64))
