"""JaxExecutorFactory (validate_config, create_executor) and JaxExecutorRegistry."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from conftest import params_from_hf, tiny_hf_model

from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.factory import JaxExecutorFactory, JaxExecutorRegistry
from ferrum_jax.interfaces import (
    AttentionType,
    DataType,
    DecodeInput,
    Device,
    ExecutorAttentionConfig,
    ExecutorConfig,
    ExecutorMemoryConfig,
    ExecutorType,
    ModelInfo,
    ModelType,
    OptimizationConfig,
    PrefillInput,
)


def executor_config(**changes) -> ExecutorConfig:
    config = ExecutorConfig(
        model_info=ModelInfo(
            model_id="smollm2",
            model_type=ModelType.Llama,
            num_parameters=134_515_008,
            hidden_size=576,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            vocab_size=49152,
            max_sequence_length=8192,
            dtype=DataType.FP32,
            device=Device.CPU,
        ),
        device=Device.CPU,
        dtype=DataType.FP32,
        max_batch_size=2,
        max_sequence_length=64,
        attention_config=ExecutorAttentionConfig(
            attention_type=AttentionType.GROUPED_QUERY,
            enable_flash_attention=False,
            enable_paged_attention=False,
        ),
        memory_config=ExecutorMemoryConfig(
            enable_memory_pooling=True,
            memory_pool_size=None,
            enable_kv_cache_sharing=False,
            max_memory_usage=0.9,
        ),
        optimization_config=OptimizationConfig(
            enable_cuda_graphs=False,
            enable_kernel_fusion=True,
            enable_mixed_precision=False,
            optimization_level=2,
        ),
    )
    return dataclasses.replace(config, **changes)


def with_attention(**changes) -> ExecutorConfig:
    base = executor_config()
    return dataclasses.replace(
        base, attention_config=dataclasses.replace(base.attention_config, **changes)
    )


@pytest.mark.parametrize(
    ("config", "kind", "words"),
    [
        (executor_config(dtype=DataType.FP16), ErrorKind.UNSUPPORTED, "dtype FP16"),
        (executor_config(dtype=DataType.INT8), ErrorKind.UNSUPPORTED, "dtype INT8"),
        (executor_config(device=Device.CUDA(0)), ErrorKind.DEVICE, "not available"),
        (executor_config(device=Device.TPU(3)), ErrorKind.DEVICE, "not available"),
        (executor_config(device=Device.Metal), ErrorKind.DEVICE, "Metal"),
        (executor_config(max_batch_size=0), ErrorKind.CONFIG, "max_batch_size"),
        (executor_config(max_sequence_length=0), ErrorKind.CONFIG, "max_sequence_length"),
        (executor_config(max_sequence_length=10_000), ErrorKind.CONFIG, "exceeds the model"),
        (with_attention(enable_paged_attention=True), ErrorKind.CONFIG, "block_size"),
        (with_attention(block_size=0), ErrorKind.CONFIG, "block_size"),
        (
            with_attention(attention_type=AttentionType.SLIDING_WINDOW),
            ErrorKind.CONFIG,
            "sliding_window_size",
        ),
        (executor_config(executor_options={"modle_path": "x"}), ErrorKind.CONFIG, "modle_path"),
        (executor_config(executor_options={"mesh": "data=x"}), ErrorKind.INVALID_PARAMETER, "mesh"),
        (
            executor_config(executor_options={"allow_non_finite": "false"}),
            ErrorKind.INVALID_PARAMETER,
            "allow_non_finite",
        ),
    ],
)
def test_validate_config_names_the_problem(config, kind, words):
    with pytest.raises(FerrumError) as e:
        JaxExecutorFactory().validate_config(config)
    assert e.value.kind is kind
    assert words in str(e.value)


def test_validate_accepts_a_good_config():
    factory = JaxExecutorFactory()
    factory.validate_config(executor_config())
    factory.validate_config(with_attention(enable_paged_attention=True, block_size=16))
    factory.validate_config(executor_config(executor_options={"allow_non_finite": True}))
    assert ExecutorType.CONTINUOUS_BATCH in factory.supported_types()
    assert ExecutorType.SPECULATIVE in factory.supported_types()


def test_create_executor_loads_the_default_model():
    factory = JaxExecutorFactory()
    executor = asyncio.run(factory.create_batch_executor(executor_config()))
    assert isinstance(executor, JaxModelExecutor)
    info = executor.info()
    assert info.num_layers == 30 and info.num_kv_heads == 3 and info.vocab_size == 49152
    assert info.model_type == ModelType.Llama
    assert executor.capabilities().max_sequence_length == 64
    assert executor.supports_batch_size(2) and not executor.supports_batch_size(3)
    asyncio.run(executor.shutdown())


def test_registry_tracks_executors_and_metrics():
    config, graphdef, params = params_from_hf(tiny_hf_model("llama"))
    executor = JaxModelExecutor(config, graphdef, params, max_batch_size=2, max_sequence_length=32)
    registry = JaxExecutorRegistry()
    registry.register("tiny", executor)
    with pytest.raises(FerrumError) as e:
        registry.register("tiny", executor)
    assert e.value.kind is ErrorKind.ALREADY_EXISTS
    with pytest.raises(FerrumError):
        registry.register("", executor)
    assert registry.list_names() == ["tiny"] and registry.get("tiny") is executor

    async def work():
        out = await executor.prefill(PrefillInput(np.asarray([[5, 6, 7]])))
        token = out.last_token_logits().argmax_last_dim_u32()[0]
        await executor.decode(DecodeInput(np.asarray([[token]]), out.kv_cache))

    asyncio.run(work())
    metrics = registry.get_metrics("tiny")
    assert metrics.prefill_operations == 1 and metrics.decode_operations == 1
    assert metrics.total_operations == 2 and metrics.throughput_tps > 0
    assert registry.get_metrics("missing") is None
    assert registry.remove("tiny") is executor and registry.remove("tiny") is None
    assert registry.list_names() == []
