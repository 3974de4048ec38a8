"""Python port of the Ferrum `ModelExecutor` contract (ferrum-interfaces / ferrum-types 0.6.0).

Every type of `model_executor.rs` is here, plus the types it imports: `TensorLike`/`TensorRef`,
`KvCacheHandle`, `BlockTable`, `CacheHandleStats` (ferrum-interfaces) and `ModelInfo`,
`ModelType`, `DataType`, `Device` (ferrum-types). `FerrumError`/`ErrorKind` are re-exported
from `ferrum_jax.errors`.

Serde structs get `to_dict()` / `from_dict()` that produce and accept exactly the JSON that
Rust's serde derive would (field names as in Rust, externally tagged enums, `Option` as
`null`, a missing `Option` field read as `None`, unknown fields ignored). Bad input raises
`FerrumError.serialization`, as Rust's `From<serde_json::Error>` does.

Deliberate differences from Rust:

- `Device` gains a `TPU(index)` variant (serialized `{"TPU": n}`); `Device.Metal` exists on
  every platform (Rust only compiles it on macOS/iOS). `Device.index` is an attribute, not a
  method, and it is also set for TPU devices.
- `Device` and `ModelType` carry payloads, so they are frozen dataclasses over a kind enum
  (`DeviceKind`, `ModelTypeKind`) with Rust-like constructors (`Device.CPU`,
  `Device.CUDA(0)`, `ModelType.Llama`, `ModelType.Code("rust")`); their serde form comes from
  `to_serde()` / `from_serde()`. Field-less enums are plain `enum.Enum`s whose values are
  the serde strings.
- `ModelId` (a newtype over `String`, serialized transparently) is a plain `str`.
- Builders (`with_kv_cache`, `with_attention_mask`, `with_position_ids`) return a new object
  (`dataclasses.replace`) instead of consuming `self`.
- `TensorLike`: `shape`, `dtype`, `device`, `numel`, `ndim`, `is_scalar`, `is_contiguous` and
  `size_bytes` are properties; `shape` is a tuple; `as_any` is dropped (use `isinstance`);
  `argmax_last_dim_u32()` returns one token id per leading position (`list[int]`, a single
  element for a 1-D tensor) instead of one `u32`.
- `KvCacheHandle.block_table_mut()` is dropped: `block_table()` already returns the mutable
  Python object.
- `std::time::Instant` fields (`ExecutorStatus.last_operation`, `CacheHandleStats.last_access`)
  are `time.monotonic()` seconds as `float`.
- f32 fields are Python floats (double precision); integer fields are unbounded `int`s, so
  `calculate_total_memory` never wraps.
- `BlockTable.blocks_needed_for_length` raises `FerrumError.invalid_parameter` for a zero
  block size where Rust would panic on the division.
- Async trait methods are `async def`; `&mut self` methods (`warmup`, `shutdown`) take `self`.
- Not ported: `ModelInfo::memory_requirements` (and its `ModelMemoryRequirements`), which the
  executor contract does not use.

Ferrum main (1330a73, after 0.7.7) additions, with their own differences from Rust:

- KV slot reservation: `KvSlotRequest`, `KvSlotAllocation`, `KvSlotReservation`,
  `KvSlotCapacitySnapshot` (serde; frozen, unlike the 0.7.x structs) and the plain trait
  methods `reserve_kv_slots` and `kv_slot_capacity_snapshot` (Rust `Result<Option<T>>` is
  `T | None` or a raised `FerrumError`). `kv_admission_exhausted` builds the one
  `resource_exhausted` error whose text the engine parses; Rust has no such helper (the
  reference formats it inline).
- Model-side greedy: `LogitsReturnPolicy` carries a payload, so it is a frozen dataclass over
  `LogitsReturnPolicyKind` like `Device` (`LogitsReturnPolicy.FullLogits`,
  `LogitsReturnPolicy.GreedyArgmax(token_mask, repetition_penalty)`, `default()`);
  `TokenSelectionMask` and `GreedyRepetitionPenalty` are frozen dataclasses (see their
  docstrings for the storage and fingerprint differences). None of the three is serde in
  Rust, so none has `to_dict`. `len()` is `__len__`.
- `logits_policy` (on `DecodeInput`, `UnifiedBatchItem`) and `recurrent_state` (on the
  prefill/decode inputs and outputs and `UnifiedBatchItem`) are keyword-only fields at the
  end, so positional construction from 0.7.x keeps working; Rust puts `recurrent_state`
  second or third.
- Recurrent state (`recurrent_state.rs`): `RecurrentStateTensorSpec`, `RecurrentStateSpec`
  (serde; `RequestId` is a `str`), `RecurrentStateHandle` (without `as_any`) and
  `RecurrentStateHandleStats` are ported because the contract names them; the engine-side
  `RecurrentStateManager`, `RecurrentStateManagerStats` and `RecurrentStateResumePolicy` are
  not. Every model here is attention-only: `recurrent_state_spec` returns None and every
  `recurrent_state` field stays None.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import enum
import functools
import hashlib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self

import numpy as np

from ferrum_jax.errors import ErrorKind, FerrumError

__all__ = [
    "AttentionType",
    "BatchModelExecutor",
    "BlockTable",
    "CacheHandleStats",
    "DataType",
    "DecodeInput",
    "DecodeOutput",
    "Device",
    "DeviceKind",
    "ErrorKind",
    "ExecutorAttentionConfig",
    "ExecutorCapabilities",
    "ExecutorConfig",
    "ExecutorMemoryConfig",
    "ExecutorMemoryUsage",
    "ExecutorMetrics",
    "ExecutorRegistry",
    "ExecutorState",
    "ExecutorStatus",
    "ExecutorType",
    "FerrumError",
    "GreedyRepetitionPenalty",
    "KvCacheHandle",
    "KvSlotAllocation",
    "KvSlotCapacitySnapshot",
    "KvSlotRequest",
    "KvSlotReservation",
    "LogitsReturnPolicy",
    "LogitsReturnPolicyKind",
    "MemoryRequirements",
    "ModelExecutor",
    "ModelExecutorFactory",
    "ModelInfo",
    "ModelType",
    "ModelTypeKind",
    "OptimizationConfig",
    "PrefillInput",
    "PrefillOutput",
    "RecurrentStateHandle",
    "RecurrentStateHandleStats",
    "RecurrentStateSpec",
    "RecurrentStateTensorSpec",
    "SpeculativeDecodeOutput",
    "SpeculativeExecutor",
    "TensorLike",
    "TensorRef",
    "TokenSelectionMask",
    "UnifiedBatch",
    "UnifiedBatchItem",
    "kv_admission_exhausted",
]


# --------------------------------------------------------------------------------------------
# serde plumbing
# --------------------------------------------------------------------------------------------

# Field metadata key for `#[serde(skip)]`: left out of `to_dict`, default value after `from_dict`.
_SERDE_SKIP = "serde_skip"


def _encode(value: Any) -> Any:
    """Turn a field value into its serde JSON value."""
    if isinstance(value, _Serde):
        return value.to_dict()
    if isinstance(value, Device | ModelType):
        return value.to_serde()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(tp: Any, data: Any) -> Any:
    """Build a value of type `tp` from its serde JSON value."""
    if tp is Any:
        # serde_json::Value: an owned copy, so later mutation does not alias the input.
        return copy.deepcopy(data)
    origin = typing.get_origin(tp)
    if origin is types.UnionType or origin is typing.Union:
        if data is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner, data)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(data, list):
            raise TypeError(f"expected a sequence, got {data!r}")
        return [_decode(item, v) for v in data]
    if origin is dict:
        _, val = typing.get_args(tp)
        if not isinstance(data, dict):
            raise TypeError(f"expected a map, got {data!r}")
        return {str(k): _decode(val, v) for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, _Serde):
        return tp.from_dict(data)
    if tp is Device or tp is ModelType:
        return tp.from_serde(data)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is float:
        # serde_json reads integer literals into float fields too.
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise TypeError(f"expected a number, got {data!r}")
        return float(data)
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise TypeError(f"expected an integer, got {data!r}")
        return data
    if tp is bool or tp is str:
        if not isinstance(data, tp):
            raise TypeError(f"expected {tp.__name__}, got {data!r}")
        return data
    raise TypeError(f"no serde mapping for {tp!r}")


def _is_optional(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return (origin is types.UnionType or origin is typing.Union) and type(None) in typing.get_args(
        tp
    )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Serde:
    """Mixin for dataclasses that derive `Serialize`/`Deserialize` in Rust."""

    def to_dict(self) -> dict[str, Any]:
        """The serde JSON object of this struct (`json.dumps`-ready)."""
        return {
            f.name: _encode(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not f.metadata.get(_SERDE_SKIP, False)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Parse the serde JSON object of this struct; raises `FerrumError.serialization`."""
        if not isinstance(data, Mapping):
            raise FerrumError.serialization(f"{cls.__name__}: expected an object, got {data!r}")
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.metadata.get(_SERDE_SKIP, False):
                continue
            tp = hints[f.name]
            if f.name not in data:
                if _is_optional(tp):
                    kwargs[f.name] = None
                    continue
                raise FerrumError.serialization(f"{cls.__name__}: missing field `{f.name}`")
            try:
                kwargs[f.name] = _decode(tp, data[f.name])
            except FerrumError:
                raise
            except (TypeError, ValueError, KeyError) as e:
                raise FerrumError.serialization(f"{cls.__name__}.{f.name}: {e}") from e
        return cls(**kwargs)


def _single_key(data: Any, what: str) -> tuple[str, Any]:
    if isinstance(data, dict) and len(data) == 1:
        ((key, payload),) = data.items()
        return key, payload
    raise FerrumError.serialization(f"{what}: expected a string or a one-key object, got {data!r}")


# --------------------------------------------------------------------------------------------
# ferrum-types: DataType, Device, ModelType, ModelInfo
# --------------------------------------------------------------------------------------------


class DataType(enum.Enum):
    """Tensor element type (`ferrum_types::DataType`); the value is the serde name."""

    FP32 = "FP32"
    FP16 = "FP16"
    BF16 = "BF16"
    FP8 = "FP8"
    INT32 = "INT32"
    INT16 = "INT16"
    INT8 = "INT8"
    INT4 = "INT4"
    UINT32 = "UINT32"
    UINT16 = "UINT16"
    UINT8 = "UINT8"
    UINT4 = "UINT4"
    BOOL = "BOOL"

    def size_bytes(self) -> int:
        """Bytes per element; 4-bit types count as one byte, as in Rust."""
        return _DTYPE_SIZES[self]

    def is_float(self) -> bool:
        return self in (DataType.FP32, DataType.FP16, DataType.BF16, DataType.FP8)

    def is_integer(self) -> bool:
        return self not in (
            DataType.FP32,
            DataType.FP16,
            DataType.BF16,
            DataType.FP8,
            DataType.BOOL,
        )

    def is_quantized(self) -> bool:
        return self in (DataType.FP8, DataType.INT8, DataType.INT4, DataType.UINT4)

    def __str__(self) -> str:
        return self.value.lower()


_DTYPE_SIZES = {
    DataType.FP32: 4,
    DataType.INT32: 4,
    DataType.UINT32: 4,
    DataType.FP16: 2,
    DataType.BF16: 2,
    DataType.INT16: 2,
    DataType.UINT16: 2,
    DataType.FP8: 1,
    DataType.INT8: 1,
    DataType.UINT8: 1,
    DataType.BOOL: 1,
    DataType.INT4: 1,
    DataType.UINT4: 1,
}


class DeviceKind(enum.Enum):
    """Variant tag of `Device`; the value is the serde variant name."""

    CPU = "CPU"
    CUDA = "CUDA"
    ROCM = "ROCm"
    METAL = "Metal"
    TPU = "TPU"


_INDEXED_DEVICES = (DeviceKind.CUDA, DeviceKind.ROCM, DeviceKind.TPU)


@dataclasses.dataclass(frozen=True)
class Device:
    """Compute device (`ferrum_types::Device`), plus the TPU extension.

    Build with `Device.CPU`, `Device.Metal`, `Device.CUDA(i)`, `Device.ROCm(i)`, `Device.TPU(i)`.
    """

    kind: DeviceKind
    index: int | None = None

    CPU: ClassVar[Device]
    Metal: ClassVar[Device]

    def __post_init__(self) -> None:
        if (self.index is None) == (self.kind in _INDEXED_DEVICES):
            raise FerrumError.invalid_parameter(
                f"Device {self.kind.value} {'needs' if self.index is None else 'takes no'} index"
            )
        if self.index is not None and self.index < 0:
            raise FerrumError.invalid_parameter(f"Device index must be >= 0, got {self.index}")

    @classmethod
    def CUDA(cls, index: int) -> Device:
        return cls(DeviceKind.CUDA, index)

    @classmethod
    def ROCm(cls, index: int) -> Device:
        return cls(DeviceKind.ROCM, index)

    @classmethod
    def TPU(cls, index: int) -> Device:
        return cls(DeviceKind.TPU, index)

    def is_gpu(self) -> bool:
        return self.kind in (DeviceKind.CUDA, DeviceKind.ROCM, DeviceKind.METAL)

    def to_serde(self) -> str | dict[str, int]:
        """Externally tagged serde value: `"CPU"` or `{"CUDA": 0}`."""
        if self.index is None:
            return self.kind.value
        return {self.kind.value: self.index}

    @classmethod
    def from_serde(cls, data: Any) -> Device:
        try:
            if isinstance(data, str):
                return cls(DeviceKind(data))
            key, index = _single_key(data, "Device")
            if isinstance(index, bool) or not isinstance(index, int):
                raise FerrumError.serialization(f"Device: bad index {index!r}")
            return cls(DeviceKind(key), index)
        except ValueError as e:
            raise FerrumError.serialization(f"Device: unknown variant in {data!r}") from e
        except FerrumError as e:
            if e.kind is ErrorKind.SERIALIZATION:
                raise
            raise FerrumError.serialization(f"Device: {e.message}") from e

    def __str__(self) -> str:
        name = self.kind.value.lower()
        return name if self.index is None else f"{name}:{self.index}"


Device.CPU = Device(DeviceKind.CPU)
Device.Metal = Device(DeviceKind.METAL)


class ModelTypeKind(enum.Enum):
    """Variant tag of `ModelType`; the value is the serde variant name."""

    LLAMA = "Llama"
    MISTRAL = "Mistral"
    QWEN = "Qwen"
    PHI = "Phi"
    GEMMA = "Gemma"
    CODE = "Code"
    EMBEDDING = "Embedding"
    CLIP = "Clip"
    CUSTOM = "Custom"


_NAMED_MODEL_TYPES = (ModelTypeKind.CODE, ModelTypeKind.CUSTOM)


@dataclasses.dataclass(frozen=True)
class ModelType:
    """Model family (`ferrum_types::ModelType`).

    Build with `ModelType.Llama`, ..., `ModelType.Code(name)`, `ModelType.Custom(name)`.
    """

    kind: ModelTypeKind
    name: str | None = None

    Llama: ClassVar[ModelType]
    Mistral: ClassVar[ModelType]
    Qwen: ClassVar[ModelType]
    Phi: ClassVar[ModelType]
    Gemma: ClassVar[ModelType]
    Embedding: ClassVar[ModelType]
    Clip: ClassVar[ModelType]

    def __post_init__(self) -> None:
        if (self.name is None) == (self.kind in _NAMED_MODEL_TYPES):
            raise FerrumError.invalid_parameter(
                f"ModelType {self.kind.value} {'needs' if self.name is None else 'takes no'} name"
            )

    @classmethod
    def Code(cls, name: str) -> ModelType:
        return cls(ModelTypeKind.CODE, name)

    @classmethod
    def Custom(cls, name: str) -> ModelType:
        return cls(ModelTypeKind.CUSTOM, name)

    def to_serde(self) -> str | dict[str, str]:
        """Externally tagged serde value: `"Llama"` or `{"Code": "rust"}`."""
        if self.name is None:
            return self.kind.value
        return {self.kind.value: self.name}

    @classmethod
    def from_serde(cls, data: Any) -> ModelType:
        try:
            if isinstance(data, str):
                return cls(ModelTypeKind(data))
            key, name = _single_key(data, "ModelType")
            if not isinstance(name, str):
                raise FerrumError.serialization(f"ModelType: bad name {name!r}")
            return cls(ModelTypeKind(key), name)
        except ValueError as e:
            raise FerrumError.serialization(f"ModelType: unknown variant in {data!r}") from e
        except FerrumError as e:
            if e.kind is ErrorKind.SERIALIZATION:
                raise
            raise FerrumError.serialization(f"ModelType: {e.message}") from e

    def __str__(self) -> str:
        if self.name is None:
            return self.kind.value.lower()
        return f"{self.kind.value.lower()}-{self.name}"


ModelType.Llama = ModelType(ModelTypeKind.LLAMA)
ModelType.Mistral = ModelType(ModelTypeKind.MISTRAL)
ModelType.Qwen = ModelType(ModelTypeKind.QWEN)
ModelType.Phi = ModelType(ModelTypeKind.PHI)
ModelType.Gemma = ModelType(ModelTypeKind.GEMMA)
ModelType.Embedding = ModelType(ModelTypeKind.EMBEDDING)
ModelType.Clip = ModelType(ModelTypeKind.CLIP)


@dataclasses.dataclass
class ModelInfo(_Serde):
    """Model metadata (`ferrum_types::ModelInfo`)."""

    model_id: str
    model_type: ModelType
    num_parameters: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_sequence_length: int
    dtype: DataType
    device: Device
    version: str | None = None
    license: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def estimated_size_bytes(self) -> int:
        """Parameter bytes plus Ferrum's flat 20% overhead estimate."""
        return int(self.num_parameters * self.dtype.size_bytes() * 1.2)

    def supports_sequence_length(self, length: int) -> bool:
        return length <= self.max_sequence_length


# --------------------------------------------------------------------------------------------
# ferrum-interfaces: TensorLike, BlockTable, KvCacheHandle
# --------------------------------------------------------------------------------------------


class TensorLike(abc.ABC):
    """Device-aware tensor (`ferrum_interfaces::TensorLike`); `TensorRef` is the same type."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    @abc.abstractmethod
    def dtype(self) -> DataType: ...

    @property
    @abc.abstractmethod
    def device(self) -> Device: ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_scalar(self) -> bool:
        return not self.shape

    @property
    @abc.abstractmethod
    def is_contiguous(self) -> bool: ...

    @property
    def size_bytes(self) -> int:
        return self.numel * self.dtype.size_bytes()

    @abc.abstractmethod
    def view(self, start: Sequence[int], end: Sequence[int]) -> TensorLike:
        """Slice `[start[d], end[d])` along every dimension `d`."""

    @abc.abstractmethod
    def reshape(self, shape: Sequence[int]) -> TensorLike:
        """Same elements, new shape (the element count must match)."""

    @abc.abstractmethod
    def to_cpu(self) -> TensorLike: ...

    @abc.abstractmethod
    def to_device(self, device: Device) -> TensorLike: ...

    @abc.abstractmethod
    def to_dtype(self, dtype: DataType) -> TensorLike: ...

    def to_vec_f32(self) -> list[float]:
        """All elements, flattened, as floats (host copy)."""
        raise FerrumError.model("to_vec_f32 not implemented for this tensor backend")

    def to_vec_u32(self) -> list[int]:
        """All elements, flattened, as unsigned token ids (host copy)."""
        raise FerrumError.model("to_vec_u32 not implemented for this tensor backend")

    def argmax_last_dim_u32(self) -> list[int]:
        """Argmax over the last dimension for every leading position."""
        raise FerrumError.model("argmax_last_dim_u32 not implemented for this tensor backend")


TensorRef = TensorLike


@dataclasses.dataclass
class BlockTable(_Serde):
    """Logical-to-physical KV block mapping of one sequence (`ferrum_interfaces::BlockTable`)."""

    physical_blocks: list[int]
    logical_to_physical: list[int]
    sequence_length: int
    block_size: int

    @classmethod
    def new(cls, block_size: int) -> BlockTable:
        """An empty table (no blocks, no tokens)."""
        return cls([], [], 0, block_size)

    def num_blocks(self) -> int:
        return len(self.physical_blocks)

    @staticmethod
    def blocks_needed_for_length(length: int, block_size: int) -> int:
        """Ceiling of `length / block_size`."""
        if block_size <= 0:
            raise FerrumError.invalid_parameter(f"block_size must be positive, got {block_size}")
        return (length + block_size - 1) // block_size

    def has_free_space(self) -> bool:
        """True when an allocated block is still entirely unused."""
        used = self.blocks_needed_for_length(self.sequence_length, self.block_size)
        return used < self.num_blocks()

    def free_tokens(self) -> int:
        if self.num_blocks() == 0:
            return 0
        return self.num_blocks() * self.block_size - self.sequence_length

    def add_blocks(self, blocks: Sequence[int]) -> None:
        """Append physical blocks; each gets the next logical index."""
        start_logical = len(self.logical_to_physical)
        for i, block in enumerate(blocks):
            self.physical_blocks.append(block)
            self.logical_to_physical.append(start_logical + i)

    def extend_sequence(self, additional_tokens: int) -> None:
        """Grow `sequence_length`; raises `FerrumError.backend` if the blocks cannot hold it."""
        new_length = self.sequence_length + additional_tokens
        required = self.blocks_needed_for_length(new_length, self.block_size)
        if required > self.num_blocks():
            raise FerrumError.backend(
                f"Insufficient blocks: need {required}, have {self.num_blocks()}"
            )
        self.sequence_length = new_length


@dataclasses.dataclass
class CacheHandleStats:
    """Statistics of one cache handle (`ferrum_interfaces::CacheHandleStats`; not serde)."""

    memory_bytes: int
    blocks_allocated: int
    tokens_stored: int
    utilization: float
    last_access: float  # time.monotonic() seconds, for LRU


class KvCacheHandle(abc.ABC):
    """Access to one sequence's cached keys/values (`ferrum_interfaces::KvCacheHandle`)."""

    @abc.abstractmethod
    def block_table(self) -> BlockTable: ...

    @abc.abstractmethod
    def device(self) -> Device: ...

    def num_tokens(self) -> int:
        return self.block_table().sequence_length

    @abc.abstractmethod
    def num_layers(self) -> int: ...

    @abc.abstractmethod
    def num_heads(self) -> int: ...

    @abc.abstractmethod
    def head_dim(self) -> int: ...

    @abc.abstractmethod
    def key_cache(self, layer: int) -> TensorLike | None: ...

    @abc.abstractmethod
    def value_cache(self, layer: int) -> TensorLike | None: ...

    def kv_cache(self, layer: int) -> tuple[TensorLike | None, TensorLike | None]:
        return self.key_cache(layer), self.value_cache(layer)

    @abc.abstractmethod
    def clone_handle(self) -> KvCacheHandle:
        """A new reference to the same cache (not a deep copy)."""

    @abc.abstractmethod
    def stats(self) -> CacheHandleStats: ...

    @abc.abstractmethod
    def is_valid(self) -> bool: ...

    @abc.abstractmethod
    def cache_id(self) -> str: ...


# --------------------------------------------------------------------------------------------
# recurrent_state.rs (Ferrum main): the parts the executor contract names
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecurrentStateTensorSpec(_Serde):
    """One recurrent-state tensor owned by a model layer (Ferrum main).

    `shape` excludes any request/batch slot dimension.
    """

    layer_index: int
    name: str
    shape: list[int]

    def num_elements(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class RecurrentStateSpec(_Serde):
    """Recurrent-state allocation request for one request (Ferrum main).

    `request_id` is Rust's `RequestId`, a `str` here.
    """

    request_id: str
    num_layers: int
    tensors: list[RecurrentStateTensorSpec]
    dtype: DataType
    device: Device
    max_batch_slots: int

    def estimated_memory_bytes(self) -> int:
        elements = sum(t.num_elements() for t in self.tensors)
        return elements * self.max_batch_slots * self.dtype.size_bytes()


@dataclasses.dataclass
class RecurrentStateHandleStats:
    """Statistics of one recurrent-state handle (Ferrum main; not serde)."""

    memory_bytes: int
    state_tensors: int
    batch_slots: int
    last_access: float  # time.monotonic() seconds, for eviction policies


class RecurrentStateHandle(abc.ABC):
    """Per-request state of state-space/hybrid layers (Ferrum main), separate from the KV cache.

    Models here are attention-only, so no executor creates one; the type exists so the
    `recurrent_state` fields and `recurrent_state_spec` are typed as in Rust.
    """

    @abc.abstractmethod
    def request_id(self) -> str: ...

    @abc.abstractmethod
    def device(self) -> Device: ...

    @abc.abstractmethod
    def num_layers(self) -> int: ...

    @abc.abstractmethod
    def state_bytes(self) -> int: ...

    @abc.abstractmethod
    def clone_handle(self) -> RecurrentStateHandle:
        """A new reference to the same state (not a deep copy)."""

    @abc.abstractmethod
    def stats(self) -> RecurrentStateHandleStats: ...

    @abc.abstractmethod
    def is_valid(self) -> bool: ...

    @abc.abstractmethod
    def cache_id(self) -> str: ...


# --------------------------------------------------------------------------------------------
# model_executor.rs (Ferrum main): KV slot reservation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KvSlotRequest(_Serde):
    """One sequence's KV slot reservation request (Ferrum main).

    `target_len` tokens must be writable before the next forward; `admission_target_len`, when
    set, is a larger known-context bound that is only checked for fit, never allocated.
    """

    cache_id: str
    target_len: int
    admission_target_len: int | None = None


@dataclasses.dataclass(frozen=True)
class KvSlotAllocation(_Serde):
    """One cache's outcome of a reservation, in blocks (Ferrum main)."""

    cache_id: str
    blocks_before: int
    blocks_after: int
    new_blocks: int


@dataclasses.dataclass(frozen=True)
class KvSlotReservation(_Serde):
    """Evidence of a successful reservation from a model-owned block pool (Ferrum main)."""

    block_size: int
    total_blocks: int
    free_blocks_before: int
    free_blocks_after: int
    allocations: list[KvSlotAllocation]


@dataclasses.dataclass(frozen=True)
class KvSlotCapacitySnapshot(_Serde):
    """Model-owned block pool capacity, observed without allocating (Ferrum main)."""

    block_size: int
    total_blocks: int
    free_blocks: int


def kv_admission_exhausted(
    admission_blocks: int, immediate_blocks: int, free_blocks: int
) -> FerrumError:
    """The `resource_exhausted` error of a reservation that does not fit.

    Ferrum main's engine recognises KV pressure by parsing this exact text (continuous_engine
    inner.rs:21-39), so it must not be reworded: `admission_blocks` new blocks are needed to
    fit every request's admission bound, `immediate_blocks` of them for the target lengths,
    and the pool has `free_blocks`.
    """
    return FerrumError.resource_exhausted(
        f"paged KV admission: need {admission_blocks} admission blocks "
        f"({immediate_blocks} immediate) but only {free_blocks} free"
    )


# --------------------------------------------------------------------------------------------
# model_executor.rs (Ferrum main): model-side greedy argmax
# --------------------------------------------------------------------------------------------

_U32_MAX = 2**32 - 1


def _mask_fingerprint(mask: bytes) -> int:
    # Hashes what Rust's `Vec<i8>::hash` feeds its hasher (the length as a little-endian
    # u64, then the bytes); blake2b stands in for `DefaultHasher`, whose output Rust does
    # not promise to keep across releases, so no consumer can depend on the exact value.
    digest = hashlib.blake2b(len(mask).to_bytes(8, "little") + mask, digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclasses.dataclass(frozen=True)
class TokenSelectionMask:
    """Which token ids model-side greedy argmax may pick (Ferrum main).

    Token `id` is allowed iff `id < len(mask)` and `valid_token_mask[id] != 0`. `fingerprint`
    lets an executor cache the uploaded device mask without comparing the whole vector.

    Differences from Rust: `valid_token_mask` (`Arc<[i8]>`) is immutable `bytes` holding each
    i8's bit pattern (only zero vs non-zero matters); `fingerprint` is a blake2b-64 of the
    same input Rust hashes (see `_mask_fingerprint`), not SipHash; equality and hashing are
    by value (Rust derives neither); `repr` shows Rust's `Debug` fields (fingerprint, len,
    valid_count) instead of the whole mask; `allowed()` (a bool array view) is an addition
    for building device masks.
    """

    fingerprint: int
    valid_token_mask: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.valid_token_mask, bytes):
            raise FerrumError.invalid_parameter(
                f"TokenSelectionMask.valid_token_mask must be bytes, got "
                f"{type(self.valid_token_mask).__name__}"
            )

    @classmethod
    def new(cls, valid_token_mask: bytes | Sequence[int] | np.ndarray) -> TokenSelectionMask:
        """A mask from i8 values (`bytes` are taken as i8 bit patterns) or bools, fingerprinted.

        Values outside i8 and non-integer or non-1-D input raise `invalid_parameter`: Rust's
        `Vec<i8>` cannot hold them.
        """
        if not isinstance(valid_token_mask, bytes):
            values = np.asarray(valid_token_mask)
            if values.size == 0:
                values = values.astype(np.int8)
            if values.ndim != 1 or not (
                np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_
            ):
                raise FerrumError.invalid_parameter(
                    f"TokenSelectionMask needs a 1-D sequence of i8 values, got "
                    f"{values.dtype} of shape {values.shape}"
                )
            if values.size and (values.min() < -128 or values.max() > 127):
                raise FerrumError.invalid_parameter(
                    "TokenSelectionMask values must fit in i8 (-128..=127)"
                )
            valid_token_mask = values.astype(np.int8).tobytes()
        return cls(_mask_fingerprint(valid_token_mask), valid_token_mask)

    def __len__(self) -> int:
        return len(self.valid_token_mask)

    def is_empty(self) -> bool:
        return not self.valid_token_mask

    def allowed(self) -> np.ndarray:
        """The mask as a bool array of its own length (True: allowed)."""
        return np.frombuffer(self.valid_token_mask, dtype=np.int8) != 0

    def __repr__(self) -> str:
        valid = len(self.valid_token_mask) - self.valid_token_mask.count(0)
        return (
            f"TokenSelectionMask(fingerprint={self.fingerprint}, "
            f"len={len(self.valid_token_mask)}, valid_count={valid})"
        )


@dataclasses.dataclass(frozen=True)
class GreedyRepetitionPenalty:
    """Repetition penalty applied before model-side greedy argmax (Ferrum main).

    Each listed id's logit `v` becomes `v / penalty` if `v > 0`, else `v * penalty`, once per
    distinct id (duplicates are allowed and change nothing). The engine lists the distinct
    generated ids, not prompt ids.

    Differences from Rust: `token_ids` (`Arc<[u32]>`) is a tuple; `penalty` (f32) is a Python
    float. The checks Rust's types make (a number; ids in u32) raise `invalid_parameter`;
    Rust checks no more (a penalty of 0 or below is the engine's to avoid), nor does this.
    """

    penalty: float
    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, int | float):
            raise FerrumError.invalid_parameter(
                f"GreedyRepetitionPenalty.penalty must be a number, got {self.penalty!r}"
            )
        bad = [
            t
            for t in self.token_ids
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _U32_MAX
        ]
        if bad:
            raise FerrumError.invalid_parameter(
                f"GreedyRepetitionPenalty.token_ids must be u32 token ids, got {bad[:4]!r}"
            )

    @classmethod
    def new(cls, penalty: float, token_ids: Iterable[int]) -> GreedyRepetitionPenalty:
        return cls(float(penalty), tuple(int(t) for t in token_ids))

    def is_empty(self) -> bool:
        """True when applying it changes nothing: no ids, or a penalty of exactly 1."""
        return not self.token_ids or self.penalty == 1.0


class LogitsReturnPolicyKind(enum.Enum):
    """Variant tag of `LogitsReturnPolicy` (Rust variant names)."""

    FULL_LOGITS = "FullLogits"
    GREEDY_ARGMAX = "GreedyArgmax"


@dataclasses.dataclass(frozen=True)
class LogitsReturnPolicy:
    """How an executor may return a final position's logits (Ferrum main).

    `LogitsReturnPolicy.FullLogits` (the default): the vocabulary-sized logits.
    `LogitsReturnPolicy.GreedyArgmax(token_mask, repetition_penalty)`: the executor may
    instead return `[float(token_id)]`, the lowest-index argmax of the logits after the penalty
    and among the mask's allowed ids; with no allowed id it returns the full logits. Full
    logits are always an accepted answer.
    """

    kind: LogitsReturnPolicyKind
    token_mask: TokenSelectionMask | None = None
    repetition_penalty: GreedyRepetitionPenalty | None = None

    FullLogits: ClassVar[LogitsReturnPolicy]

    def __post_init__(self) -> None:
        if self.kind is LogitsReturnPolicyKind.FULL_LOGITS and (
            self.token_mask is not None or self.repetition_penalty is not None
        ):
            raise FerrumError.invalid_parameter("LogitsReturnPolicy FullLogits takes no payload")

    @classmethod
    def GreedyArgmax(
        cls,
        token_mask: TokenSelectionMask | None = None,
        repetition_penalty: GreedyRepetitionPenalty | None = None,
    ) -> LogitsReturnPolicy:
        return cls(LogitsReturnPolicyKind.GREEDY_ARGMAX, token_mask, repetition_penalty)

    @classmethod
    def default(cls) -> LogitsReturnPolicy:
        """Rust's `Default`: `FullLogits`."""
        return cls.FullLogits

    def requires_full_logits(self) -> bool:
        return self.kind is LogitsReturnPolicyKind.FULL_LOGITS


LogitsReturnPolicy.FullLogits = LogitsReturnPolicy(LogitsReturnPolicyKind.FULL_LOGITS)


# --------------------------------------------------------------------------------------------
# model_executor.rs: inputs and outputs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefillInput:
    """Prompt batch for the prefill phase; `input_ids` is `[batch, seq]`.

    0.7.6: `metadata` (request metadata that can affect execution; serde JSON values).
    0.7.x engines pass a pre-allocated `kv_cache` and, for a chunk continuing a sequence,
    `position_ids` starting at its length. Ferrum main: `recurrent_state` (keyword-only).
    """

    input_ids: TensorLike
    attention_mask: TensorLike | None = None
    position_ids: TensorLike | None = None
    kv_cache: KvCacheHandle | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    recurrent_state: RecurrentStateHandle | None = dataclasses.field(default=None, kw_only=True)

    def with_kv_cache(self, kv_cache: KvCacheHandle) -> PrefillInput:
        return dataclasses.replace(self, kv_cache=kv_cache)

    def with_recurrent_state(self, recurrent_state: RecurrentStateHandle) -> PrefillInput:
        return dataclasses.replace(self, recurrent_state=recurrent_state)

    def with_metadata(self, metadata: Mapping[str, Any]) -> PrefillInput:
        return dataclasses.replace(self, metadata=dict(metadata))

    def with_attention_mask(self, mask: TensorLike) -> PrefillInput:
        return dataclasses.replace(self, attention_mask=mask)

    def with_position_ids(self, positions: TensorLike) -> PrefillInput:
        return dataclasses.replace(self, position_ids=positions)

    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def sequence_length(self) -> int:
        shape = self.input_ids.shape
        return shape[1] if len(shape) >= 2 else 1


@dataclasses.dataclass
class PrefillOutput:
    """Prefill result: logits `[batch, seq, vocab]` and the populated cache.

    Ferrum main: `recurrent_state` (keyword-only), the updated state when one is used.
    """

    logits: TensorLike
    kv_cache: KvCacheHandle
    hidden_states: list[TensorLike] | None = None
    attention_weights: list[TensorLike] | None = None
    recurrent_state: RecurrentStateHandle | None = dataclasses.field(default=None, kw_only=True)

    def with_recurrent_state(self, recurrent_state: RecurrentStateHandle) -> PrefillOutput:
        return dataclasses.replace(self, recurrent_state=recurrent_state)

    def last_token_logits(self) -> TensorLike:
        """Logits of the last position, as a `[batch, 1, vocab]` view (as in Rust)."""
        shape = self.logits.shape
        if len(shape) != 3:
            raise FerrumError.backend("Expected 3D logits tensor [batch, seq, vocab]")
        batch, seq_len, vocab = shape
        if seq_len == 0:
            raise FerrumError.backend("Empty sequence")
        return self.logits.view([0, seq_len - 1, 0], [batch, seq_len, vocab])


@dataclasses.dataclass(frozen=True)
class DecodeInput:
    """One decode step: `input_ids` is `[batch, 1]`, continuing `kv_cache`.

    0.7.6: `metadata` (request metadata that can affect execution). Ferrum main, both
    keyword-only: `recurrent_state` and `logits_policy` (how the step may return this
    request's logits).
    """

    input_ids: TensorLike
    kv_cache: KvCacheHandle
    position_ids: TensorLike | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    recurrent_state: RecurrentStateHandle | None = dataclasses.field(default=None, kw_only=True)
    logits_policy: LogitsReturnPolicy = dataclasses.field(
        default=LogitsReturnPolicy.FullLogits, kw_only=True
    )

    def with_position_ids(self, positions: TensorLike) -> DecodeInput:
        return dataclasses.replace(self, position_ids=positions)

    def with_recurrent_state(self, recurrent_state: RecurrentStateHandle) -> DecodeInput:
        return dataclasses.replace(self, recurrent_state=recurrent_state)

    def with_metadata(self, metadata: Mapping[str, Any]) -> DecodeInput:
        return dataclasses.replace(self, metadata=dict(metadata))

    def with_logits_policy(self, policy: LogitsReturnPolicy) -> DecodeInput:
        return dataclasses.replace(self, logits_policy=policy)

    def batch_size(self) -> int:
        return self.input_ids.shape[0]


@dataclasses.dataclass(frozen=True)
class UnifiedBatchItem:
    """One item of a mixed prefill/decode forward (Ferrum 0.7.4).

    A prefill chunk (`q_tokens` the chunk, possibly continuing at `pos_offset > 0`) or a
    decode step (one token at `pos_offset` = the sequence's length). `is_final_chunk` asks
    for the logits of the last token (decode items always; a prompt's last chunk).
    """

    seq_id: str
    """Identifier of the sequence's model-side KV state (the engine's handle `cache_id()`)."""
    q_tokens: Sequence[int]
    """Tokens to process this step (Rust `Vec<u32>`)."""
    kv_cache: KvCacheHandle
    """The sequence's handle (the engine allocates its own: it may not be the executor's)."""
    pos_offset: int
    """Absolute position of the first token of `q_tokens`."""
    is_final_chunk: bool
    """Return the logits of the last token of `q_tokens`."""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Request metadata that can affect execution."""
    recurrent_state: RecurrentStateHandle | None = dataclasses.field(default=None, kw_only=True)
    """The sequence's recurrent state (Ferrum main); None for attention-only models."""
    logits_policy: LogitsReturnPolicy = dataclasses.field(
        default=LogitsReturnPolicy.FullLogits, kw_only=True
    )
    """How the step may return this item's final logits (Ferrum main)."""


@dataclasses.dataclass
class UnifiedBatch:
    """Any mix of prefill chunks and decode steps, answered by one forward (Ferrum 0.7.4)."""

    items: list[UnifiedBatchItem] = dataclasses.field(default_factory=list)

    def total_q_tokens(self) -> int:
        """Query tokens over all items (the M dimension of the step's GEMMs)."""
        return sum(len(item.q_tokens) for item in self.items)

    def num_sampled_items(self) -> int:
        """Items that produce a logits vector (`is_final_chunk`)."""
        return sum(1 for item in self.items if item.is_final_chunk)


@dataclasses.dataclass
class DecodeOutput:
    """Decode result: next-token logits `[batch, vocab]` and the updated cache.

    Ferrum main: `recurrent_state` (keyword-only), the updated state when one is used.
    """

    logits: TensorLike
    kv_cache: KvCacheHandle
    hidden_state: TensorLike | None = None
    attention_weights: list[TensorLike] | None = None
    recurrent_state: RecurrentStateHandle | None = dataclasses.field(default=None, kw_only=True)

    def with_recurrent_state(self, recurrent_state: RecurrentStateHandle) -> DecodeOutput:
        return dataclasses.replace(self, recurrent_state=recurrent_state)


@dataclasses.dataclass
class SpeculativeDecodeOutput:
    """Result of verifying draft tokens."""

    accepted_tokens: list[int]
    next_logits: TensorLike
    kv_cache: KvCacheHandle
    acceptance_count: int


# --------------------------------------------------------------------------------------------
# model_executor.rs: serde structs and enums
# --------------------------------------------------------------------------------------------


class AttentionType(enum.Enum):
    """Attention mechanism; the value is the serde name."""

    MULTI_HEAD = "MultiHead"
    MULTI_QUERY = "MultiQuery"
    GROUPED_QUERY = "GroupedQuery"
    FLASH = "Flash"
    PAGED = "Paged"
    SLIDING_WINDOW = "SlidingWindow"


@dataclasses.dataclass
class MemoryRequirements(_Serde):
    """Memory estimate inputs, all in bytes."""

    parameter_memory: int
    activation_memory_per_token: int
    kv_cache_memory_per_token: int
    overhead_memory: int

    def calculate_total_memory(self, batch_size: int, sequence_length: int, num_layers: int) -> int:
        activation = self.activation_memory_per_token * batch_size * sequence_length
        kv_cache = self.kv_cache_memory_per_token * batch_size * sequence_length * num_layers
        return self.parameter_memory + activation + kv_cache + self.overhead_memory


@dataclasses.dataclass
class ExecutorCapabilities(_Serde):
    """What an executor supports."""

    max_batch_size: int
    max_sequence_length: int
    attention_mechanisms: list[AttentionType]
    supports_dynamic_batching: bool
    supports_continuous_batching: bool
    supports_speculative_decoding: bool
    supports_tensor_parallelism: bool
    supports_pipeline_parallelism: bool
    supported_dtypes: list[DataType]
    supported_devices: list[Device]
    memory_requirements: MemoryRequirements


class ExecutorState(enum.Enum):
    """Lifecycle state; the value is the serde name."""

    INITIALIZING = "Initializing"
    READY = "Ready"
    BUSY = "Busy"
    ERROR = "Error"
    SHUTDOWN = "Shutdown"


@dataclasses.dataclass
class ExecutorMemoryUsage(_Serde):
    """Executor memory usage in bytes."""

    allocated_bytes: int
    used_bytes: int
    peak_bytes: int
    utilization_percent: float


@dataclasses.dataclass
class ExecutorStatus(_Serde):
    """Current executor status. `last_operation` is `#[serde(skip)]`."""

    state: ExecutorState
    is_ready: bool
    current_batch_size: int
    prefill_operations: int
    decode_operations: int
    avg_prefill_time_ms: float
    avg_decode_time_ms: float
    memory_usage: ExecutorMemoryUsage
    last_operation: float | None = dataclasses.field(
        default=None, metadata={_SERDE_SKIP: True}
    )  # time.monotonic() seconds


@dataclasses.dataclass
class ExecutorAttentionConfig(_Serde):
    """Runtime attention settings (not the model's architectural attention config)."""

    attention_type: AttentionType
    enable_flash_attention: bool
    enable_paged_attention: bool
    block_size: int | None = None
    sliding_window_size: int | None = None


@dataclasses.dataclass
class ExecutorMemoryConfig(_Serde):
    """Executor memory settings."""

    enable_memory_pooling: bool
    memory_pool_size: int | None
    enable_kv_cache_sharing: bool
    max_memory_usage: float


@dataclasses.dataclass
class OptimizationConfig(_Serde):
    """Optimization switches; `optimization_level` is 0-3."""

    enable_cuda_graphs: bool
    enable_kernel_fusion: bool
    enable_mixed_precision: bool
    optimization_level: int
    custom_flags: dict[str, bool] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExecutorConfig(_Serde):
    """Everything needed to build an executor."""

    model_info: ModelInfo
    device: Device
    dtype: DataType
    max_batch_size: int
    max_sequence_length: int
    attention_config: ExecutorAttentionConfig
    memory_config: ExecutorMemoryConfig
    optimization_config: OptimizationConfig
    executor_options: dict[str, Any] = dataclasses.field(default_factory=dict)


class ExecutorType(enum.Enum):
    """Executor flavour; the value is the serde name."""

    SEQUENTIAL = "Sequential"
    BATCH = "Batch"
    CONTINUOUS_BATCH = "ContinuousBatch"
    SPECULATIVE = "Speculative"
    PIPELINE_PARALLEL = "PipelineParallel"
    TENSOR_PARALLEL = "TensorParallel"


@dataclasses.dataclass
class ExecutorMetrics(_Serde):
    """Executor performance metrics; latencies in milliseconds."""

    total_operations: int
    prefill_operations: int
    decode_operations: int
    avg_prefill_latency: float
    avg_decode_latency: float
    p95_prefill_latency: float
    p95_decode_latency: float
    throughput_tps: float
    memory_efficiency: float
    batch_utilization: float


# --------------------------------------------------------------------------------------------
# model_executor.rs: traits
# --------------------------------------------------------------------------------------------


class ModelExecutor(abc.ABC):
    """Tensor-level model execution with separate prefill and decode phases.

    The 0.7.x additions (`supports_native_unified_decode`, `kv_capacity`, `batch_prefill`,
    `unified_decode`, `truncate_kv`, `forward_verify`, `cache_metrics_snapshot`,
    `lora_metrics_snapshot`) and Ferrum main's (`reserve_kv_slots`,
    `kv_slot_capacity_snapshot`, `recurrent_state_spec`) keep Rust's defaults, so a 0.6
    executor still satisfies the trait.
    """

    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    def supports_native_unified_decode(self) -> bool:
        """Whether `unified_decode` runs one native mixed forward (0.7.7); default False."""
        return False

    def kv_capacity(self) -> int | None:
        """Per-request KV capacity in tokens, when below the model's context (0.7.6)."""
        return None

    def reserve_kv_slots(self, requests: Sequence[KvSlotRequest]) -> KvSlotReservation | None:
        """Reserve model-owned KV slots before a forward (Ferrum main).

        The engine calls it before each `unified_decode` so a batch that cannot grow its KV is
        deferred or preempted instead of failing inside attention; a batch that does not fit
        raises `kv_admission_exhausted(...)`. Default: None (no model-owned paged KV), as in
        Rust.
        """
        return None

    def kv_slot_capacity_snapshot(self) -> KvSlotCapacitySnapshot | None:
        """Model-owned paged-KV capacity without allocating (Ferrum main); default None."""
        return None

    def recurrent_state_spec(
        self, request_id: str, input_tokens: Sequence[int]
    ) -> RecurrentStateSpec | None:
        """Recurrent state a request needs, asked before each prefill (Ferrum main).

        Default: None, an attention-only model, as in Rust; the engine then leaves every
        `recurrent_state` field None. Raising aborts the engine's prefill batch.
        """
        return None

    @abc.abstractmethod
    async def prefill(self, input: PrefillInput) -> PrefillOutput: ...

    async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]:
        """Default (0.7.4): one `prefill` per input, in order; the first error propagates."""
        return [await self.prefill(i) for i in inputs]

    @abc.abstractmethod
    async def decode(self, input: DecodeInput) -> DecodeOutput: ...

    async def batch_decode(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """Default: one `decode` per input, in order; the first error propagates."""
        return [await self.decode(i) for i in inputs]

    async def unified_decode(self, batch: UnifiedBatch) -> list[Sequence[float] | None]:
        """One forward over a mixed batch (0.7.4): per item, the final position's logits
        (`is_final_chunk`; Rust `Vec<f32>`, any float32 sequence here) or None. Under a
        `GreedyArgmax` policy (Ferrum main) the answer may be `[float(token_id)]`; the engine
        reads any length-1 answer as a token id. Default: unsupported, as in Rust."""
        raise FerrumError.unsupported("unified_decode not implemented for this executor")

    async def forward(self, input: TensorLike) -> TensorLike:
        """Full forward pass; unsupported unless an executor overrides it."""
        raise FerrumError.unsupported("Full forward pass not supported by this executor")

    async def truncate_kv(self, kv_cache: KvCacheHandle, new_len: int) -> None:  # noqa: B027
        """Rolls a sequence's KV back to `new_len` tokens (0.7.1); default no-op, as in Rust."""

    async def forward_verify(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """Logits for N+1 positions (0.7.1). Default: one `decode` per input, in order."""
        return [await self.decode(i) for i in inputs]

    @abc.abstractmethod
    def capabilities(self) -> ExecutorCapabilities: ...

    @abc.abstractmethod
    def status(self) -> ExecutorStatus: ...

    def cache_metrics_snapshot(self) -> dict[str, Any] | None:
        """Model-level KV cache counters, as JSON values (0.7.6); default None."""
        return None

    def lora_metrics_snapshot(self) -> dict[str, Any] | None:
        """LoRA runtime counters (0.7.6); default None."""
        return None

    async def warmup(self) -> None:  # noqa: B027 - optional hook, no-op as in Rust
        """Load/compile/allocate ahead of traffic; default no-op."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook, no-op as in Rust
        """Release resources; default no-op."""

    def release_cache(self, cache_id: str) -> None:  # noqa: B027 - optional hook
        """Free the KV cache of a finished sequence; default no-op."""


class BatchModelExecutor(ModelExecutor):
    """Executor that prefills and decodes many sequences in one pass."""

    @abc.abstractmethod
    async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]: ...

    @abc.abstractmethod
    async def batch_decode(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]: ...

    @abc.abstractmethod
    def optimal_batch_size(self) -> int: ...

    @abc.abstractmethod
    def supports_batch_size(self, batch_size: int) -> bool: ...


class SpeculativeExecutor(ModelExecutor):
    """Executor that verifies draft tokens."""

    @abc.abstractmethod
    async def speculative_decode(
        self,
        input: DecodeInput,
        draft_tokens: Sequence[int],
        acceptance_threshold: float,
    ) -> SpeculativeDecodeOutput: ...


class ModelExecutorFactory(abc.ABC):
    """Builds executors from an `ExecutorConfig`."""

    @abc.abstractmethod
    async def create_executor(self, config: ExecutorConfig) -> ModelExecutor: ...

    @abc.abstractmethod
    async def create_batch_executor(self, config: ExecutorConfig) -> BatchModelExecutor: ...

    @abc.abstractmethod
    def supported_types(self) -> list[ExecutorType]: ...

    @abc.abstractmethod
    def validate_config(self, config: ExecutorConfig) -> None:
        """Raise a `FerrumError` when `config` cannot be served."""


class ExecutorRegistry(abc.ABC):
    """Named collection of executors."""

    @abc.abstractmethod
    def register(self, name: str, executor: ModelExecutor) -> None: ...

    @abc.abstractmethod
    def get(self, name: str) -> ModelExecutor | None: ...

    @abc.abstractmethod
    def remove(self, name: str) -> ModelExecutor | None: ...

    @abc.abstractmethod
    def list_names(self) -> list[str]: ...

    @abc.abstractmethod
    def get_metrics(self, name: str) -> ExecutorMetrics | None: ...
