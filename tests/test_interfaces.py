"""Contract tests for the Python port of the Ferrum ModelExecutor interfaces."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import errors
from ferrum_jax.interfaces import (
    AttentionType,
    BatchModelExecutor,
    BlockTable,
    CacheHandleStats,
    DataType,
    DecodeInput,
    DecodeOutput,
    Device,
    DeviceKind,
    ErrorKind,
    ExecutorAttentionConfig,
    ExecutorCapabilities,
    ExecutorConfig,
    ExecutorMemoryConfig,
    ExecutorMemoryUsage,
    ExecutorMetrics,
    ExecutorRegistry,
    ExecutorState,
    ExecutorStatus,
    ExecutorType,
    FerrumError,
    GreedyRepetitionPenalty,
    KvCacheHandle,
    KvSlotAllocation,
    KvSlotCapacitySnapshot,
    KvSlotRequest,
    KvSlotReservation,
    LogitsReturnPolicy,
    LogitsReturnPolicyKind,
    MemoryRequirements,
    ModelExecutor,
    ModelExecutorFactory,
    ModelInfo,
    ModelType,
    ModelTypeKind,
    OptimizationConfig,
    PrefillInput,
    PrefillOutput,
    RecurrentStateHandle,
    RecurrentStateHandleStats,
    RecurrentStateSpec,
    RecurrentStateTensorSpec,
    SpeculativeDecodeOutput,
    SpeculativeExecutor,
    TensorLike,
    TensorRef,
    TokenSelectionMask,
    UnifiedBatch,
    UnifiedBatchItem,
    kv_admission_exhausted,
)
from ferrum_jax.tensor import JaxTensor

# ---------------------------------------------------------------------------- test doubles


class ShapeTensor(TensorLike):
    """A data-less tensor: enough to exercise shape logic and TensorLike defaults."""

    def __init__(self, shape: Sequence[int], dtype: DataType = DataType.FP32) -> None:
        self._shape = tuple(shape)
        self._dtype = dtype
        self.views: list[tuple[list[int], list[int]]] = []

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
        self.views.append((list(start), list(end)))
        return ShapeTensor([e - s for s, e in zip(start, end, strict=True)], self._dtype)

    def reshape(self, shape: Sequence[int]) -> TensorLike:
        return ShapeTensor(shape, self._dtype)

    def to_cpu(self) -> TensorLike:
        return self

    def to_device(self, device: Device) -> TensorLike:
        return self

    def to_dtype(self, dtype: DataType) -> TensorLike:
        return ShapeTensor(self._shape, dtype)


class FakeHandle(KvCacheHandle):
    def __init__(self, cache_id: str, tokens: int = 0) -> None:
        self._id = cache_id
        self._table = BlockTable([7], [0], tokens, 16)

    def block_table(self) -> BlockTable:
        return self._table

    def device(self) -> Device:
        return Device.CPU

    def num_layers(self) -> int:
        return 2

    def num_heads(self) -> int:
        return 4

    def head_dim(self) -> int:
        return 8

    def key_cache(self, layer: int) -> TensorLike | None:
        return ShapeTensor([1, layer, 4, 8])

    def value_cache(self, layer: int) -> TensorLike | None:
        return None

    def clone_handle(self) -> KvCacheHandle:
        return self

    def stats(self) -> CacheHandleStats:
        return CacheHandleStats(1024, 1, self.num_tokens(), 0.5, 0.0)

    def is_valid(self) -> bool:
        return True

    def cache_id(self) -> str:
        return self._id


def model_info(**overrides: Any) -> ModelInfo:
    fields: dict[str, Any] = {
        "model_id": "demo",
        "model_type": ModelType.Llama,
        "num_parameters": 1_000_000,
        "hidden_size": 1024,
        "num_layers": 16,
        "num_heads": 16,
        "num_kv_heads": 8,
        "vocab_size": 32000,
        "max_sequence_length": 2048,
        "dtype": DataType.FP16,
        "device": Device.CPU,
    }
    fields.update(overrides)
    return ModelInfo(**fields)


def memory_usage() -> ExecutorMemoryUsage:
    return ExecutorMemoryUsage(1000, 600, 800, 60.0)


def status(state: ExecutorState = ExecutorState.READY) -> ExecutorStatus:
    return ExecutorStatus(state, True, 0, 3, 5, 1.5, 0.25, memory_usage())


def capabilities() -> ExecutorCapabilities:
    return ExecutorCapabilities(
        max_batch_size=8,
        max_sequence_length=2048,
        attention_mechanisms=[AttentionType.MULTI_HEAD, AttentionType.PAGED],
        supports_dynamic_batching=True,
        supports_continuous_batching=True,
        supports_speculative_decoding=False,
        supports_tensor_parallelism=True,
        supports_pipeline_parallelism=False,
        supported_dtypes=[DataType.FP32, DataType.BF16],
        supported_devices=[Device.CPU, Device.CUDA(0), Device.TPU(3)],
        memory_requirements=MemoryRequirements(10, 2, 3, 4),
    )


def executor_config() -> ExecutorConfig:
    return ExecutorConfig(
        model_info=model_info(
            model_type=ModelType.Code("rust"),
            version="v1",
            metadata={"arch": "llama", "rope": {"theta": 10000.0, "factors": [1, 2]}},
        ),
        device=Device.ROCm(1),
        dtype=DataType.BF16,
        max_batch_size=4,
        max_sequence_length=512,
        attention_config=ExecutorAttentionConfig(
            AttentionType.SLIDING_WINDOW, False, True, 16, 256
        ),
        memory_config=ExecutorMemoryConfig(True, None, False, 0.9),
        optimization_config=OptimizationConfig(False, True, True, 2, {"fuse_rope": True}),
        executor_options={"slots": 4, "buckets": [16, 32], "name": None},
    )


class FakeExecutor(ModelExecutor):
    """Decode returns the input ids as logits; a handle id of "bad" fails."""

    def __init__(self) -> None:
        self.decoded: list[str] = []
        self.released: list[str] = []

    def info(self) -> ModelInfo:
        return model_info()

    async def prefill(self, input: PrefillInput) -> PrefillOutput:
        return PrefillOutput(input.input_ids, FakeHandle("p"))

    async def decode(self, input: DecodeInput) -> DecodeOutput:
        if input.kv_cache.cache_id() == "bad":
            raise FerrumError.not_found("unknown handle bad")
        self.decoded.append(input.kv_cache.cache_id())
        return DecodeOutput(input.input_ids, input.kv_cache)

    def capabilities(self) -> ExecutorCapabilities:
        return capabilities()

    def status(self) -> ExecutorStatus:
        return status()


def roundtrip(obj: Any) -> Any:
    return type(obj).from_dict(json.loads(json.dumps(obj.to_dict())))


# ---------------------------------------------------------------------------- ferrum-types


def test_datatype_serde_names_sizes_and_predicates() -> None:
    assert [d.value for d in DataType] == [
        "FP32", "FP16", "BF16", "FP8", "INT32", "INT16", "INT8", "INT4",
        "UINT32", "UINT16", "UINT8", "UINT4", "BOOL",
    ]  # fmt: skip
    sizes = {d: d.size_bytes() for d in DataType}
    assert sizes[DataType.FP32] == sizes[DataType.INT32] == sizes[DataType.UINT32] == 4
    assert sizes[DataType.FP16] == sizes[DataType.BF16] == sizes[DataType.UINT16] == 2
    assert sizes[DataType.INT4] == sizes[DataType.UINT4] == sizes[DataType.BOOL] == 1
    assert sizes[DataType.FP8] == sizes[DataType.INT8] == 1
    assert DataType.FP16.is_float() and not DataType.INT8.is_float()
    assert DataType.INT8.is_integer() and DataType.UINT4.is_integer()
    assert not DataType.BOOL.is_integer() and not DataType.BF16.is_integer()
    assert {d for d in DataType if d.is_quantized()} == {
        DataType.FP8,
        DataType.INT8,
        DataType.INT4,
        DataType.UINT4,
    }
    assert str(DataType.UINT8) == "uint8"


@pytest.mark.parametrize(
    ("device", "serde", "text"),
    [
        (Device.CPU, "CPU", "cpu"),
        (Device.Metal, "Metal", "metal"),
        (Device.CUDA(0), {"CUDA": 0}, "cuda:0"),
        (Device.ROCm(1), {"ROCm": 1}, "rocm:1"),
        (Device.TPU(3), {"TPU": 3}, "tpu:3"),
    ],
)
def test_device_serde_is_externally_tagged(device: Device, serde: Any, text: str) -> None:
    assert device.to_serde() == serde
    assert Device.from_serde(json.loads(json.dumps(device.to_serde()))) == device
    assert str(device) == text


def test_device_helpers() -> None:
    assert not Device.CPU.is_gpu() and not Device.TPU(0).is_gpu()
    assert Device.CUDA(0).is_gpu() and Device.ROCm(0).is_gpu() and Device.Metal.is_gpu()
    assert Device.CUDA(2).index == 2 and Device.CPU.index is None
    assert Device.CUDA(1) == Device.CUDA(1) != Device.ROCm(1)
    assert len({Device.CPU, Device(DeviceKind.CPU), Device.CUDA(0)}) == 2


@pytest.mark.parametrize("kind", [DeviceKind.CUDA, DeviceKind.ROCM, DeviceKind.TPU])
def test_indexed_device_requires_index(kind: DeviceKind) -> None:
    with pytest.raises(FerrumError) as exc:
        Device(kind)
    assert exc.value.kind is ErrorKind.INVALID_PARAMETER
    with pytest.raises(FerrumError):
        Device(DeviceKind.CPU, 0)
    with pytest.raises(FerrumError):
        Device(kind, -1)


@pytest.mark.parametrize(
    "bad",
    [
        "Vulkan",
        "cpu",
        {"CUDA": "0"},
        {"CUDA": True},
        {"CUDA": -1},
        {"CPU": 0},
        {"CUDA": 0, "TPU": 1},
        3,
    ],
)
def test_device_from_serde_rejects(bad: Any) -> None:
    with pytest.raises(FerrumError) as exc:
        Device.from_serde(bad)
    assert exc.value.kind is ErrorKind.SERIALIZATION


@pytest.mark.parametrize(
    ("model_type", "serde", "text"),
    [
        (ModelType.Llama, "Llama", "llama"),
        (ModelType.Mistral, "Mistral", "mistral"),
        (ModelType.Qwen, "Qwen", "qwen"),
        (ModelType.Phi, "Phi", "phi"),
        (ModelType.Gemma, "Gemma", "gemma"),
        (ModelType.Embedding, "Embedding", "embedding"),
        (ModelType.Clip, "Clip", "clip"),
        (ModelType.Code("rust"), {"Code": "rust"}, "code-rust"),
        (ModelType.Custom("smollm2"), {"Custom": "smollm2"}, "custom-smollm2"),
    ],
)
def test_model_type_serde_is_externally_tagged(
    model_type: ModelType, serde: Any, text: str
) -> None:
    assert model_type.to_serde() == serde
    assert ModelType.from_serde(json.loads(json.dumps(serde))) == model_type
    assert str(model_type) == text


@pytest.mark.parametrize("bad", ["llama", "Code", {"Llama": "x"}, {"Code": 3}, None])
def test_model_type_from_serde_rejects(bad: Any) -> None:
    with pytest.raises(FerrumError) as exc:
        ModelType.from_serde(bad)
    assert exc.value.kind is ErrorKind.SERIALIZATION


def test_model_type_payload_rules() -> None:
    with pytest.raises(FerrumError):
        ModelType(ModelTypeKind.CODE)
    with pytest.raises(FerrumError):
        ModelType(ModelTypeKind.LLAMA, "x")


def test_model_info_roundtrip_and_helpers() -> None:
    info = model_info(
        model_type=ModelType.Custom("x"),
        device=Device.TPU(0),
        license="apache-2.0",
        metadata={"a": [1, {"b": None}], "c": 1.5},
    )
    data = info.to_dict()
    assert data["model_id"] == "demo"
    assert data["model_type"] == {"Custom": "x"}
    assert data["device"] == {"TPU": 0}
    assert data["dtype"] == "FP16"
    assert data["version"] is None
    assert roundtrip(info) == info
    # num_parameters * 2 bytes * 1.2, truncated as Rust's `as u64`.
    assert info.estimated_size_bytes() == 2_400_000
    assert info.supports_sequence_length(2048) and not info.supports_sequence_length(2049)


def test_from_dict_follows_serde_defaults() -> None:
    data = model_info().to_dict()
    del data["version"]  # a missing Option is None
    data["unknown_field"] = 1  # unknown fields are ignored
    assert ModelInfo.from_dict(data) == model_info()

    usage = memory_usage().to_dict()
    usage["utilization_percent"] = 60  # an integer literal is a valid float
    parsed = ExecutorMemoryUsage.from_dict(usage)
    assert parsed == memory_usage() and isinstance(parsed.utilization_percent, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", "1024"),
        ("hidden_size", 1.5),
        ("hidden_size", True),
        ("dtype", "fp16"),
        ("device", {"GPU": 0}),
        ("model_type", {"Code": 1}),
        ("metadata", [1, 2]),
        ("license", 3),
    ],
)
def test_from_dict_rejects_bad_values(field: str, value: Any) -> None:
    data = model_info().to_dict()
    data[field] = value
    with pytest.raises(FerrumError) as exc:
        ModelInfo.from_dict(data)
    assert exc.value.kind is ErrorKind.SERIALIZATION


def test_from_dict_rejects_missing_required_field_and_non_objects() -> None:
    data = model_info().to_dict()
    del data["vocab_size"]
    with pytest.raises(FerrumError, match="missing field `vocab_size`") as exc:
        ModelInfo.from_dict(data)
    assert exc.value.kind is ErrorKind.SERIALIZATION
    with pytest.raises(FerrumError):
        ModelInfo.from_dict([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- errors


def test_ferrum_error_is_reexported() -> None:
    assert FerrumError is errors.FerrumError and ErrorKind is errors.ErrorKind


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_ferrum_error_constructors(kind: ErrorKind) -> None:
    err = getattr(FerrumError, kind.value)("boom")
    assert isinstance(err, Exception)
    assert err.kind is kind and err.message == "boom"
    # Ferrum 0.6.0: ResourceExhausted | Timeout | Network (Network is not ported).
    assert err.is_retryable() == (kind in (ErrorKind.TIMEOUT, ErrorKind.RESOURCE_EXHAUSTED))


# ---------------------------------------------------------------------------- tensors, blocks


def test_tensor_ref_alias_and_defaults() -> None:
    assert TensorRef is TensorLike
    t = ShapeTensor([2, 3, 4], DataType.BF16)
    assert (t.numel, t.ndim, t.is_scalar, t.size_bytes) == (24, 3, False, 48)
    scalar = ShapeTensor([])
    assert (scalar.numel, scalar.ndim, scalar.is_scalar) == (1, 0, True)
    for method in (t.to_vec_f32, t.to_vec_u32, t.argmax_last_dim_u32):
        with pytest.raises(FerrumError, match="not implemented") as exc:
            method()
        assert exc.value.kind is ErrorKind.MODEL


def test_tensor_like_is_abstract() -> None:
    class Partial(TensorLike):
        pass

    with pytest.raises(TypeError):
        Partial()  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("length", "block_size", "blocks"),
    [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (33, 16, 3), (5, 1, 5)],
)
def test_blocks_needed_for_length(length: int, block_size: int, blocks: int) -> None:
    assert BlockTable.blocks_needed_for_length(length, block_size) == blocks


def test_blocks_needed_for_length_rejects_zero_block_size() -> None:
    with pytest.raises(FerrumError) as exc:
        BlockTable.blocks_needed_for_length(4, 0)
    assert exc.value.kind is ErrorKind.INVALID_PARAMETER


def test_block_table_lifecycle() -> None:
    table = BlockTable.new(4)
    assert table == BlockTable([], [], 0, 4)
    assert table.num_blocks() == 0 and table.free_tokens() == 0 and not table.has_free_space()

    table.add_blocks([10, 11])
    assert table.physical_blocks == [10, 11] and table.logical_to_physical == [0, 1]
    table.add_blocks([42])
    assert table.physical_blocks == [10, 11, 42] and table.logical_to_physical == [0, 1, 2]
    assert table.num_blocks() == 3 and table.free_tokens() == 12 and table.has_free_space()

    table.extend_sequence(5)  # uses 2 of 3 blocks
    assert table.sequence_length == 5 and table.free_tokens() == 7 and table.has_free_space()
    table.extend_sequence(7)  # exactly full
    assert table.sequence_length == 12 and table.free_tokens() == 0
    assert not table.has_free_space()


def test_block_table_extend_sequence_fails_without_blocks() -> None:
    table = BlockTable.new(4)
    table.add_blocks([1])
    table.extend_sequence(3)
    with pytest.raises(FerrumError, match="Insufficient blocks: need 2, have 1") as exc:
        table.extend_sequence(2)
    assert exc.value.kind is ErrorKind.BACKEND
    assert table.sequence_length == 3  # a failed extension changes nothing
    with pytest.raises(FerrumError, match="need 1, have 0"):
        BlockTable.new(16).extend_sequence(1)
    BlockTable.new(16).extend_sequence(0)  # zero tokens need zero blocks


def test_block_table_serde() -> None:
    table = BlockTable([5, 9], [0, 1], 20, 16)
    assert table.to_dict() == {
        "physical_blocks": [5, 9],
        "logical_to_physical": [0, 1],
        "sequence_length": 20,
        "block_size": 16,
    }
    assert roundtrip(table) == table


def test_kv_cache_handle_defaults() -> None:
    handle = FakeHandle("seq-1", tokens=5)
    assert handle.num_tokens() == 5  # default: the block table's sequence length
    key, value = handle.kv_cache(1)
    assert key is not None and key.shape == (1, 1, 4, 8) and value is None
    assert handle.stats().tokens_stored == 5

    class Partial(KvCacheHandle):
        def cache_id(self) -> str:
            return "x"

    with pytest.raises(TypeError):
        Partial()  # type: ignore[abstract]


# ---------------------------------------------------------------------------- inputs, outputs


def test_prefill_input_builders_return_copies() -> None:
    ids = ShapeTensor([2, 7])
    mask, pos, handle = ShapeTensor([2, 7]), ShapeTensor([2, 7]), FakeHandle("h")
    base = PrefillInput(ids)
    assert (base.attention_mask, base.position_ids, base.kv_cache) == (None, None, None)

    full = base.with_attention_mask(mask).with_position_ids(pos).with_kv_cache(handle)
    assert full.attention_mask is mask and full.position_ids is pos and full.kv_cache is handle
    assert full.input_ids is ids
    assert base == PrefillInput(ids)  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.kv_cache = handle  # type: ignore[misc]


@pytest.mark.parametrize(
    ("shape", "batch", "seq"), [((2, 7), 2, 7), ((3,), 3, 1), ((1, 5, 9), 1, 5)]
)
def test_prefill_input_sizes(shape: tuple[int, ...], batch: int, seq: int) -> None:
    prefill = PrefillInput(ShapeTensor(shape))
    assert prefill.batch_size() == batch and prefill.sequence_length() == seq


def test_decode_input_builder_and_batch_size() -> None:
    handle = FakeHandle("h")
    base = DecodeInput(ShapeTensor([3, 1]), handle)
    assert base.position_ids is None and base.batch_size() == 3
    pos = ShapeTensor([3, 1])
    with_pos = base.with_position_ids(pos)
    assert with_pos.position_ids is pos and with_pos.kv_cache is handle
    assert base.position_ids is None


def test_output_defaults() -> None:
    logits, handle = ShapeTensor([1, 4]), FakeHandle("h")
    prefill = PrefillOutput(logits, handle)
    assert prefill.hidden_states is None and prefill.attention_weights is None
    decode = DecodeOutput(logits, handle)
    assert decode.hidden_state is None and decode.attention_weights is None
    spec = SpeculativeDecodeOutput([5, 6], logits, handle, 2)
    assert spec.accepted_tokens == [5, 6] and spec.acceptance_count == 2


@pytest.mark.parametrize("shape", [(4, 10), (1, 2, 3, 4), (7,)])
def test_last_token_logits_requires_3d(shape: tuple[int, ...]) -> None:
    out = PrefillOutput(ShapeTensor(shape), FakeHandle("h"))
    with pytest.raises(FerrumError) as exc:
        out.last_token_logits()
    assert exc.value.kind is ErrorKind.BACKEND
    assert exc.value.message == "Expected 3D logits tensor [batch, seq, vocab]"


def test_last_token_logits_rejects_empty_sequence() -> None:
    out = PrefillOutput(ShapeTensor([2, 0, 10]), FakeHandle("h"))
    with pytest.raises(FerrumError) as exc:
        out.last_token_logits()
    assert exc.value.kind is ErrorKind.BACKEND and exc.value.message == "Empty sequence"


def test_last_token_logits_view_arguments() -> None:
    logits = ShapeTensor([2, 5, 10])
    last = PrefillOutput(logits, FakeHandle("h")).last_token_logits()
    assert logits.views == [([0, 4, 0], [2, 5, 10])]
    assert last.shape == (2, 1, 10)


def test_last_token_logits_values_with_jax_tensor() -> None:
    data = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    out = PrefillOutput(JaxTensor(jnp.asarray(data)), FakeHandle("h"))
    last = out.last_token_logits()
    assert last.shape == (2, 1, 5)
    np.testing.assert_array_equal(np.asarray(last.to_vec_f32()).reshape(2, 1, 5), data[:, -1:, :])


# ---------------------------------------------------------------------------- serde structs


def test_memory_requirements_total_by_hand() -> None:
    req = MemoryRequirements(
        parameter_memory=1000,
        activation_memory_per_token=10,
        kv_cache_memory_per_token=4,
        overhead_memory=7,
    )
    # 1000 + 10*2*3 + 4*2*3*5 + 7
    assert req.calculate_total_memory(2, 3, 5) == 1187
    assert req.calculate_total_memory(0, 100, 5) == 1007
    # 7B fp16 params, 512 KiB/token activations, 16 KiB/token/layer KV, 32 layers, 8 x 4096.
    big = MemoryRequirements(14 * 2**30, 512 * 2**10, 16 * 2**10, 2**30)
    # 14 GiB + 16 GiB activations + 16 GiB KV + 1 GiB overhead.
    assert big.calculate_total_memory(8, 4096, 32) == 47 * 2**30 == 50465865728


def test_enum_serde_names_match_rust_variants() -> None:
    assert [a.value for a in AttentionType] == [
        "MultiHead", "MultiQuery", "GroupedQuery", "Flash", "Paged", "SlidingWindow",
    ]  # fmt: skip
    assert [s.value for s in ExecutorState] == [
        "Initializing", "Ready", "Busy", "Error", "Shutdown",
    ]  # fmt: skip
    assert [t.value for t in ExecutorType] == [
        "Sequential", "Batch", "ContinuousBatch", "Speculative", "PipelineParallel",
        "TensorParallel",
    ]  # fmt: skip


SERDE_STRUCTS = [
    model_info(),
    BlockTable([1, 2, 3], [0, 1, 2], 40, 16),
    MemoryRequirements(10, 2, 3, 4),
    capabilities(),
    memory_usage(),
    status(ExecutorState.BUSY),
    ExecutorAttentionConfig(AttentionType.GROUPED_QUERY, True, False),
    ExecutorMemoryConfig(False, 1 << 33, True, 0.75),
    OptimizationConfig(True, False, False, 3),
    executor_config(),
    ExecutorMetrics(10, 4, 6, 12.5, 1.25, 20.0, 2.0, 350.5, 0.8, 0.5),
    KvSlotRequest("paged-r1", 33),
    KvSlotRequest("paged-r2", 16, admission_target_len=600),
    KvSlotAllocation("paged-r1", 2, 3, 1),
    KvSlotReservation(
        16, 64, 10, 8, [KvSlotAllocation("a", 0, 1, 1), KvSlotAllocation("b", 2, 3, 1)]
    ),
    KvSlotReservation(16, 64, 10, 10, []),
    KvSlotCapacitySnapshot(16, 64, 9),
    RecurrentStateTensorSpec(3, "delta_state", [4, 64, 64]),
    RecurrentStateSpec(
        "req-1",
        24,
        [RecurrentStateTensorSpec(0, "conv", [3, 128])],
        DataType.BF16,
        Device.CUDA(1),
        2,
    ),
]


@pytest.mark.parametrize("obj", SERDE_STRUCTS, ids=lambda o: type(o).__name__)
def test_serde_struct_json_roundtrip(obj: Any) -> None:
    text = json.dumps(obj.to_dict())
    back = type(obj).from_dict(json.loads(text))
    assert back == obj
    assert json.dumps(back.to_dict()) == text


def test_capabilities_json_shape() -> None:
    data = capabilities().to_dict()
    assert data["attention_mechanisms"] == ["MultiHead", "Paged"]
    assert data["supported_dtypes"] == ["FP32", "BF16"]
    assert data["supported_devices"] == ["CPU", {"CUDA": 0}, {"TPU": 3}]
    assert data["memory_requirements"] == {
        "parameter_memory": 10,
        "activation_memory_per_token": 2,
        "kv_cache_memory_per_token": 3,
        "overhead_memory": 4,
    }


def test_executor_config_json_shape() -> None:
    data = json.loads(json.dumps(executor_config().to_dict()))
    assert data["device"] == {"ROCm": 1}
    assert data["model_info"]["model_type"] == {"Code": "rust"}
    assert data["attention_config"] == {
        "attention_type": "SlidingWindow",
        "enable_flash_attention": False,
        "enable_paged_attention": True,
        "block_size": 16,
        "sliding_window_size": 256,
    }
    assert data["memory_config"]["memory_pool_size"] is None
    assert data["optimization_config"]["custom_flags"] == {"fuse_rope": True}
    assert data["executor_options"] == {"slots": 4, "buckets": [16, 32], "name": None}


def test_to_dict_and_from_dict_do_not_alias_json_values() -> None:
    config = executor_config()
    data = config.to_dict()
    data["executor_options"]["buckets"].append(64)
    data["model_info"]["metadata"]["rope"]["factors"].append(3)
    assert config.executor_options["buckets"] == [16, 32]
    assert config.model_info.metadata["rope"]["factors"] == [1, 2]

    source = executor_config().to_dict()
    parsed = ExecutorConfig.from_dict(source)
    source["executor_options"]["buckets"].append(64)
    assert parsed.executor_options["buckets"] == [16, 32]


def test_executor_status_skips_last_operation() -> None:
    s = dataclasses.replace(status(), last_operation=123.5)
    data = s.to_dict()
    assert "last_operation" not in data
    assert data["state"] == "Ready" and data["memory_usage"]["utilization_percent"] == 60.0
    back = ExecutorStatus.from_dict(json.loads(json.dumps(data)))
    assert back.last_operation is None
    assert back == status()
    # A stray last_operation in the JSON is ignored, as serde(skip) does.
    assert ExecutorStatus.from_dict({**data, "last_operation": 9.0}).last_operation is None


# ---------------------------------------------------------------------------- executor traits


def handles(*ids: str) -> list[DecodeInput]:
    return [DecodeInput(ShapeTensor([1, 1]), FakeHandle(i)) for i in ids]


def test_default_batch_decode_equals_per_request_decode() -> None:
    executor = FakeExecutor()
    inputs = handles("a", "b", "c")

    async def run() -> tuple[list[DecodeOutput], list[DecodeOutput]]:
        batched = await executor.batch_decode(inputs)
        single = [await executor.decode(i) for i in inputs]
        return batched, single

    batched, single = asyncio.run(run())
    assert batched == single
    assert [o.kv_cache.cache_id() for o in batched] == ["a", "b", "c"]
    assert executor.decoded == ["a", "b", "c", "a", "b", "c"]
    assert asyncio.run(executor.batch_decode([])) == []


def test_default_batch_decode_stops_at_first_error() -> None:
    executor = FakeExecutor()
    with pytest.raises(FerrumError) as exc:
        asyncio.run(executor.batch_decode(handles("a", "bad", "c")))
    assert exc.value.kind is ErrorKind.NOT_FOUND
    assert executor.decoded == ["a"]


def test_default_forward_is_unsupported() -> None:
    with pytest.raises(FerrumError) as exc:
        asyncio.run(FakeExecutor().forward(ShapeTensor([1, 4])))
    assert exc.value.kind is ErrorKind.UNSUPPORTED
    assert exc.value.message == "Full forward pass not supported by this executor"


def test_default_lifecycle_hooks_are_noops() -> None:
    """The trait's own `warmup`, `shutdown` and `release_cache` (the fake overrides none of
    them) return None and change nothing: decoding works as before, status is unchanged."""
    for hook in ("warmup", "shutdown", "release_cache", "forward", "batch_decode"):
        assert getattr(FakeExecutor, hook) is getattr(ModelExecutor, hook), hook
    executor = FakeExecutor()
    (before,) = asyncio.run(executor.batch_decode(handles("a")))
    assert asyncio.run(executor.warmup()) is None
    assert executor.release_cache("a") is None
    assert asyncio.run(executor.shutdown()) is None
    (after,) = asyncio.run(executor.batch_decode(handles("a")))  # shutdown released nothing
    assert after.kv_cache.cache_id() == before.kv_cache.cache_id() == "a"
    assert after.logits.shape == before.logits.shape and executor.decoded == ["a", "a"]
    assert executor.status() == status()
    assert executor.info() == model_info() and executor.capabilities() == capabilities()


def test_model_executor_is_abstract() -> None:
    class Partial(ModelExecutor):
        def info(self) -> ModelInfo:
            return model_info()

    with pytest.raises(TypeError):
        Partial()  # type: ignore[abstract]


class FakeBatchExecutor(FakeExecutor, BatchModelExecutor):
    async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]:
        return [await self.prefill(i) for i in inputs]

    async def batch_decode(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        return [DecodeOutput(i.input_ids, i.kv_cache) for i in inputs]

    def optimal_batch_size(self) -> int:
        return 4

    def supports_batch_size(self, batch_size: int) -> bool:
        return 1 <= batch_size <= 8


def test_batch_model_executor_requires_its_methods() -> None:
    class NoBatchDecode(FakeExecutor, BatchModelExecutor):
        async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]:
            return []

        def optimal_batch_size(self) -> int:
            return 1

        def supports_batch_size(self, batch_size: int) -> bool:
            return True

    with pytest.raises(TypeError):
        NoBatchDecode()  # type: ignore[abstract]

    executor = FakeBatchExecutor()
    outs = asyncio.run(executor.batch_prefill([PrefillInput(ShapeTensor([1, 3]))]))
    assert len(outs) == 1 and outs[0].logits.shape == (1, 3)
    assert executor.optimal_batch_size() == 4 and executor.supports_batch_size(8)
    assert not executor.supports_batch_size(9)


@pytest.fixture(scope="module")
def jax_executor():
    """The library's executor on a tiny model: where the contract's implementation is ours."""
    from conftest import params_from_hf, tiny_hf_model

    from ferrum_jax.executor import JaxModelExecutor

    config, graphdef, params = params_from_hf(tiny_hf_model("llama"))
    return JaxModelExecutor(config, graphdef, params, max_batch_size=2, max_sequence_length=32)


def test_speculative_executor_contract(jax_executor) -> None:
    """`SpeculativeExecutor` is abstract; the library's implementation returns the accepted
    prefix of the drafts, its count, `[1, vocab]` next logits and the same handle."""
    with pytest.raises(TypeError):
        type("NoSpec", (FakeExecutor, SpeculativeExecutor), {})()
    assert isinstance(jax_executor, SpeculativeExecutor)
    prefill = asyncio.run(jax_executor.prefill(PrefillInput(np.asarray([[5, 6, 7]]))))
    handle = prefill.kv_cache
    token = prefill.last_token_logits().argmax_last_dim_u32()[0]
    drafts = [9, 10, 11]
    out = asyncio.run(
        jax_executor.speculative_decode(DecodeInput(np.asarray([[token]]), handle), drafts, 1.0)
    )
    assert out.accepted_tokens == drafts[: out.acceptance_count]
    assert out.next_logits.shape == (1, 256) and out.kv_cache is handle
    assert handle.num_tokens() == 3 + 1 + out.acceptance_count
    jax_executor.release_cache(handle.cache_id())


def test_batch_model_executor_contract_of_the_library(jax_executor) -> None:
    assert isinstance(jax_executor, BatchModelExecutor)
    assert jax_executor.optimal_batch_size() == 2
    assert jax_executor.supports_batch_size(2) and not jax_executor.supports_batch_size(3)
    assert not jax_executor.supports_batch_size(0)
    outs = asyncio.run(
        jax_executor.batch_prefill(
            [PrefillInput(np.asarray([[5, 6]])), PrefillInput(np.asarray([[7]]))]
        )
    )
    assert [o.logits.shape for o in outs] == [(1, 2, 256), (1, 1, 256)]
    for o in outs:
        jax_executor.release_cache(o.kv_cache.cache_id())
    assert jax_executor.status().current_batch_size == 0


def test_factory_and_registry_contracts(jax_executor) -> None:
    """The library's factory validates configs and names its executor types; its registry
    tracks executors by name (its own and any other `ModelExecutor`)."""
    from ferrum_jax.factory import JaxExecutorFactory, JaxExecutorRegistry

    factory, registry = JaxExecutorFactory(), JaxExecutorRegistry()
    config = dataclasses.replace(executor_config(), device=Device.CPU, executor_options={})
    factory.validate_config(config)
    with pytest.raises(FerrumError) as exc:
        factory.validate_config(dataclasses.replace(config, max_batch_size=0))
    assert exc.value.kind is ErrorKind.CONFIG
    assert ExecutorType.CONTINUOUS_BATCH in factory.supported_types()
    assert ExecutorType.SPECULATIVE in factory.supported_types()

    fake = FakeExecutor()
    registry.register("main", jax_executor)
    registry.register("fake", fake)
    with pytest.raises(FerrumError) as exc:
        registry.register("main", fake)
    assert exc.value.kind is ErrorKind.ALREADY_EXISTS
    assert registry.list_names() == ["fake", "main"] and registry.get("main") is jax_executor
    assert registry.get_metrics("main") == jax_executor.metrics()
    assert registry.get_metrics("fake").prefill_operations == status().prefill_operations
    assert registry.get_metrics("x") is None
    assert registry.remove("main") is jax_executor and registry.get("main") is None

    for abstract in (ModelExecutorFactory, ExecutorRegistry, SpeculativeExecutor):
        with pytest.raises(TypeError):
            abstract()  # type: ignore[abstract]


# ---------------------------------------------------------------------------- Ferrum main additions


def test_new_trait_methods_keep_rust_defaults() -> None:
    """`reserve_kv_slots`, `kv_slot_capacity_snapshot` and `recurrent_state_spec` are plain
    (not async) methods whose defaults answer "no model-owned paged KV, attention-only"."""
    executor = FakeExecutor()
    for name in ("reserve_kv_slots", "kv_slot_capacity_snapshot", "recurrent_state_spec"):
        assert getattr(FakeExecutor, name) is getattr(ModelExecutor, name), name
        assert not inspect.iscoroutinefunction(getattr(ModelExecutor, name)), name
    requests = [KvSlotRequest("a", 17), KvSlotRequest("b", 1, admission_target_len=900)]
    assert executor.reserve_kv_slots(requests) is None
    assert executor.reserve_kv_slots([]) is None
    assert executor.kv_slot_capacity_snapshot() is None
    assert executor.recurrent_state_spec("req-1", [1, 2, 3]) is None
    # Nothing was decoded or released along the way.
    assert executor.decoded == [] and executor.released == []


def test_kv_slot_request_json_shape() -> None:
    assert KvSlotRequest("paged-r1", 33).to_dict() == {
        "cache_id": "paged-r1",
        "target_len": 33,
        "admission_target_len": None,
    }
    # serde reads a missing Option as None.
    assert KvSlotRequest.from_dict({"cache_id": "x", "target_len": 4}) == KvSlotRequest("x", 4)
    with pytest.raises(FerrumError) as exc:
        KvSlotRequest.from_dict({"cache_id": "x", "target_len": "4"})
    assert exc.value.kind is ErrorKind.SERIALIZATION
    reservation = KvSlotReservation(16, 64, 10, 9, [KvSlotAllocation("a", 0, 1, 1)])
    assert json.loads(json.dumps(reservation.to_dict()))["allocations"] == [
        {"cache_id": "a", "blocks_before": 0, "blocks_after": 1, "new_blocks": 1}
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        reservation.free_blocks_after = 0  # type: ignore[misc]


def test_recurrent_state_spec_memory_estimate() -> None:
    spec = RecurrentStateSpec(
        "r",
        2,
        [RecurrentStateTensorSpec(0, "conv", [3, 128]), RecurrentStateTensorSpec(1, "ssm", [])],
        DataType.BF16,
        Device.CPU,
        4,
    )
    # (3*128 + 1 (a scalar)) elements x 4 slots x 2 bytes.
    assert spec.estimated_memory_bytes() == (384 + 1) * 4 * 2
    assert spec.to_dict()["tensors"][0] == {"layer_index": 0, "name": "conv", "shape": [3, 128]}
    assert spec.to_dict()["device"] == "CPU" and spec.to_dict()["dtype"] == "BF16"


def test_recurrent_state_handle_is_abstract() -> None:
    with pytest.raises(TypeError):
        RecurrentStateHandle()  # type: ignore[abstract]
    stats = RecurrentStateHandleStats(4096, 2, 1, 0.0)
    assert stats.memory_bytes == 4096


# What Ferrum main's engine parses out of a reservation failure (ENGINE-NOTES.md, "KV
# reservation": ResourceExhausted("paged KV admission: need A admission blocks (I immediate)
# but only F free")), written independently of the producer.
ENGINE_KV_PRESSURE = re.compile(
    r"paged KV admission: need (\d+) admission blocks \((\d+) immediate\) but only (\d+) free"
)


@pytest.mark.parametrize(("admission", "immediate", "free"), [(3, 2, 1), (120, 40, 0), (7, 7, 6)])
def test_kv_admission_error_is_what_the_engine_parses(
    admission: int, immediate: int, free: int
) -> None:
    error = kv_admission_exhausted(admission, immediate, free)
    assert error.kind is ErrorKind.RESOURCE_EXHAUSTED and error.is_retryable()
    match = ENGINE_KV_PRESSURE.fullmatch(error.message)
    assert match is not None, error.message
    assert tuple(map(int, match.groups())) == (admission, immediate, free)
    # The rendered error (kind prefix included) still carries the parsable text.
    found = ENGINE_KV_PRESSURE.search(str(error))
    assert found is not None and found.group(0) == error.message


def test_token_selection_mask_new_and_fingerprint() -> None:
    mask = TokenSelectionMask.new([1, 0, -1, 0, 5])
    assert mask.valid_token_mask == b"\x01\x00\xff\x00\x05"
    assert len(mask) == 5 and not mask.is_empty()
    assert mask.allowed().tolist() == [True, False, True, False, True]
    # The same i8 values fingerprint alike whatever the input form.
    same = [
        TokenSelectionMask.new(b"\x01\x00\xff\x00\x05"),
        TokenSelectionMask.new(np.array([1, 0, -1, 0, 5], dtype=np.int64)),
        TokenSelectionMask.new((1, 0, -1, 0, 5)),
    ]
    assert all(m == mask and m.fingerprint == mask.fingerprint for m in same)
    assert 0 <= mask.fingerprint < 2**64
    # Bools are 0/1 masks.
    assert TokenSelectionMask.new([True, False]) == TokenSelectionMask.new([1, 0])
    # Content and length both change the fingerprint (Rust hashes the length too).
    assert TokenSelectionMask.new([1, 0, 1, 0, 5]).fingerprint != mask.fingerprint
    assert TokenSelectionMask.new([0]).fingerprint != TokenSelectionMask.new([0, 0]).fingerprint
    empty = TokenSelectionMask.new([])
    assert empty.is_empty() and len(empty) == 0 and empty.allowed().shape == (0,)
    # repr is Rust's Debug: no mask dump.
    assert repr(mask) == f"TokenSelectionMask(fingerprint={mask.fingerprint}, len=5, valid_count=3)"
    assert hash(mask) == hash(same[0])


@pytest.mark.parametrize(
    "bad", [[128], [-129], [0.5, 1.0], [[1, 0]], ["1"], np.zeros((2, 2), dtype=np.int8)]
)
def test_token_selection_mask_rejects_what_vec_i8_cannot_hold(bad: Any) -> None:
    with pytest.raises(FerrumError) as exc:
        TokenSelectionMask.new(bad)
    assert exc.value.kind is ErrorKind.INVALID_PARAMETER


def test_token_selection_mask_field_must_be_bytes() -> None:
    with pytest.raises(FerrumError) as exc:
        TokenSelectionMask(1, [1, 0])  # type: ignore[arg-type]
    assert exc.value.kind is ErrorKind.INVALID_PARAMETER


def test_greedy_repetition_penalty_new_and_is_empty() -> None:
    penalty = GreedyRepetitionPenalty.new(1.3, [5, 9, 5])
    assert penalty.penalty == 1.3 and penalty.token_ids == (5, 9, 5)  # not de-duplicated
    assert not penalty.is_empty()
    assert GreedyRepetitionPenalty.new(1.0, [5]).is_empty()
    assert GreedyRepetitionPenalty.new(2.0, []).is_empty()
    assert GreedyRepetitionPenalty.new(np.float32(1.5), np.array([2**32 - 1])).token_ids == (
        2**32 - 1,
    )
    # Rust validates nothing beyond its types, so a penalty below 1 (or 0) is accepted.
    assert GreedyRepetitionPenalty.new(0.0, [1]).penalty == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        penalty.penalty = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("penalty", "ids"),
    [(1.2, (-1,)), (1.2, (2**32,)), (1.2, (True,)), (1.2, (1.0,)), (True, (1,)), ("1.2", (1,))],
)
def test_greedy_repetition_penalty_rejects_what_rust_types_cannot_hold(
    penalty: Any, ids: tuple[Any, ...]
) -> None:
    with pytest.raises(FerrumError) as exc:
        GreedyRepetitionPenalty(penalty, ids)
    assert exc.value.kind is ErrorKind.INVALID_PARAMETER


def test_logits_return_policy_variants() -> None:
    full = LogitsReturnPolicy.FullLogits
    assert full.kind is LogitsReturnPolicyKind.FULL_LOGITS and full.requires_full_logits()
    assert LogitsReturnPolicy.default() is full
    assert [k.value for k in LogitsReturnPolicyKind] == ["FullLogits", "GreedyArgmax"]

    bare = LogitsReturnPolicy.GreedyArgmax()
    assert bare.kind is LogitsReturnPolicyKind.GREEDY_ARGMAX and not bare.requires_full_logits()
    assert bare.token_mask is None and bare.repetition_penalty is None

    mask = TokenSelectionMask.new([1, 1, 0])
    penalty = GreedyRepetitionPenalty.new(1.1, [0])
    greedy = LogitsReturnPolicy.GreedyArgmax(token_mask=mask, repetition_penalty=penalty)
    assert greedy.token_mask is mask and greedy.repetition_penalty is penalty
    assert greedy == LogitsReturnPolicy.GreedyArgmax(TokenSelectionMask.new([1, 1, 0]), penalty)
    assert greedy != bare and hash(greedy) == hash(LogitsReturnPolicy.GreedyArgmax(mask, penalty))
    with pytest.raises(FerrumError) as exc:
        LogitsReturnPolicy(LogitsReturnPolicyKind.FULL_LOGITS, token_mask=mask)
    assert exc.value.kind is ErrorKind.INVALID_PARAMETER


def test_new_input_output_fields_default_to_rust_defaults() -> None:
    """`logits_policy` and `recurrent_state` are keyword-only with Rust's defaults, so 0.7.x
    positional construction keeps its meaning."""
    ids, handle, pos = ShapeTensor([1, 1]), FakeHandle("h"), ShapeTensor([1, 1])
    decode = DecodeInput(ids, handle, pos, {"k": 1})
    assert decode.position_ids is pos and decode.metadata == {"k": 1}
    assert decode.logits_policy is LogitsReturnPolicy.FullLogits and decode.recurrent_state is None
    greedy = LogitsReturnPolicy.GreedyArgmax()
    assert decode.with_logits_policy(greedy).logits_policy is greedy
    assert decode.logits_policy is LogitsReturnPolicy.FullLogits  # builders copy
    assert DecodeInput(ids, handle, logits_policy=greedy).logits_policy is greedy

    item = UnifiedBatchItem("s", [1, 2], handle, 0, True, {"m": 2})
    assert item.metadata == {"m": 2} and item.recurrent_state is None
    assert item.logits_policy is LogitsReturnPolicy.FullLogits
    keyed = UnifiedBatchItem("s", [3], handle, 2, True, logits_policy=greedy)
    assert keyed.logits_policy is greedy and keyed.metadata == {}
    assert UnifiedBatch([item, keyed]).num_sampled_items() == 2

    prefill = PrefillInput(ids, None, None, handle, {})
    assert prefill.kv_cache is handle and prefill.recurrent_state is None
    logits = ShapeTensor([1, 4])
    assert PrefillOutput(logits, handle, None, None).recurrent_state is None
    assert DecodeOutput(logits, handle, None, None).recurrent_state is None
    with pytest.raises(TypeError):
        DecodeInput(ids, handle, None, {}, None)  # type: ignore[misc]


class FakeRecurrentState(RecurrentStateHandle):
    def request_id(self) -> str:
        return "r"

    def device(self) -> Device:
        return Device.CPU

    def num_layers(self) -> int:
        return 1

    def state_bytes(self) -> int:
        return 8

    def clone_handle(self) -> RecurrentStateHandle:
        return self

    def stats(self) -> RecurrentStateHandleStats:
        return RecurrentStateHandleStats(8, 1, 1, 0.0)

    def is_valid(self) -> bool:
        return True

    def cache_id(self) -> str:
        return "r"


def test_recurrent_state_builders_return_copies() -> None:
    state, ids, handle = FakeRecurrentState(), ShapeTensor([1, 1]), FakeHandle("h")
    logits = ShapeTensor([1, 4])
    for base in (
        PrefillInput(ids),
        DecodeInput(ids, handle),
        PrefillOutput(logits, handle),
        DecodeOutput(logits, handle),
    ):
        attached = base.with_recurrent_state(state)
        assert attached.recurrent_state is state and base.recurrent_state is None
