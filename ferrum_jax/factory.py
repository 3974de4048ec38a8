"""`JaxExecutorFactory` and `JaxExecutorRegistry`: Ferrum's factory and registry contracts."""

from __future__ import annotations

import asyncio

import jax

from ferrum_jax import sharding
from ferrum_jax.checkpoint.build import check_allow_non_finite
from ferrum_jax.dtypes import MODEL_DTYPES
from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.interfaces import (
    AttentionType,
    DeviceKind,
    ExecutorConfig,
    ExecutorMetrics,
    ExecutorRegistry,
    ExecutorType,
    ModelExecutor,
    ModelExecutorFactory,
)
from ferrum_jax.models.kv_quant import check_kv_dtype
from ferrum_jax.models.quant import quantization_format
from ferrum_jax.tensor import datatype_of

_DTYPES = {datatype_of(dtype): name for name, dtype in MODEL_DTYPES.items()}
_PLATFORMS = {DeviceKind.CUDA: "gpu", DeviceKind.ROCM: "gpu", DeviceKind.TPU: "tpu"}
_OPTIONS = frozenset(
    {
        "model_path",
        "mesh",
        "enable_prefix_caching",
        "max_kv_tokens",
        "kv_memory_fraction",
        "max_num_batched_tokens",
        "attention_impl",
        "kv_dtype",
        "quantize",
        "allow_non_finite",
    }
)
"""`executor_options` keys; all but `model_path` and `mesh` are the executor's keywords."""


class JaxExecutorFactory(ModelExecutorFactory):
    """Builds `JaxModelExecutor`s from an `ExecutorConfig`.

    `executor_options` may hold `model_path` (HF directory, `.gguf` file or orbax directory;
    absent: the embedded SmolLM2), `mesh` (`"data=D,model=M"`), and the executor's
    `enable_prefix_caching`, `max_kv_tokens`, `kv_memory_fraction`, `max_num_batched_tokens`,
    `attention_impl` and `kv_dtype`, and `from_pretrained`'s `quantize` and
    `allow_non_finite`. A paged
    `attention_config.block_size` is the page size.
    """

    async def create_executor(self, config: ExecutorConfig) -> JaxModelExecutor:
        self.validate_config(config)
        options = config.executor_options
        mesh = sharding.mesh_from_spec(options["mesh"]) if options.get("mesh") else None
        keywords = {k: v for k, v in options.items() if k not in ("model_path", "mesh")}
        if config.attention_config.block_size is not None:
            keywords["block_size"] = config.attention_config.block_size
        return await asyncio.to_thread(
            JaxModelExecutor.from_pretrained,
            options.get("model_path"),
            max_batch_size=config.max_batch_size,
            max_sequence_length=config.max_sequence_length,
            dtype=_DTYPES[config.dtype],
            mesh=mesh,
            **keywords,
        )

    async def create_batch_executor(self, config: ExecutorConfig) -> JaxModelExecutor:
        return await self.create_executor(config)

    def supported_types(self) -> list[ExecutorType]:
        return [
            ExecutorType.SEQUENTIAL,
            ExecutorType.BATCH,
            ExecutorType.CONTINUOUS_BATCH,
            ExecutorType.SPECULATIVE,
            ExecutorType.TENSOR_PARALLEL,
        ]

    def validate_config(self, config: ExecutorConfig) -> None:
        """Raises a `FerrumError` naming the first setting this executor cannot honour."""
        if config.dtype not in _DTYPES:
            raise FerrumError.unsupported(
                f"dtype {config.dtype.value} is not supported; use FP32 or BF16"
            )
        kind = config.device.kind
        if kind is DeviceKind.METAL:
            raise FerrumError.device("Metal is not supported by JAX; use CPU, CUDA, ROCm or TPU")
        if kind in _PLATFORMS:
            platform = _PLATFORMS[kind]
            try:
                available = jax.devices(platform)
            except RuntimeError:
                available = []
            if config.device.index is None or config.device.index >= len(available):
                raise FerrumError.device(
                    f"device {config.device} is not available: JAX sees "
                    f"{len(available)} {platform} device(s)"
                )
        if config.max_batch_size < 1:
            raise FerrumError.config(f"max_batch_size must be >= 1, got {config.max_batch_size}")
        if config.max_sequence_length < 1:
            raise FerrumError.config(
                f"max_sequence_length must be >= 1, got {config.max_sequence_length}"
            )
        model_max = config.model_info.max_sequence_length
        if config.max_sequence_length > model_max:
            raise FerrumError.config(
                f"max_sequence_length {config.max_sequence_length} exceeds the model's {model_max}"
            )
        attention = config.attention_config
        if attention.enable_paged_attention and attention.block_size is None:
            raise FerrumError.config("paged attention is enabled but block_size is not set")
        if attention.block_size is not None and attention.block_size < 1:
            raise FerrumError.config(f"block_size must be >= 1, got {attention.block_size}")
        if attention.attention_type is AttentionType.SLIDING_WINDOW and (
            attention.sliding_window_size is None
        ):
            raise FerrumError.config("sliding window attention needs sliding_window_size")
        if not 0 < config.memory_config.max_memory_usage <= 100:
            raise FerrumError.config(
                f"max_memory_usage must be in (0, 100], got {config.memory_config.max_memory_usage}"
            )
        if not 0 <= config.optimization_config.optimization_level <= 3:
            raise FerrumError.config(
                "optimization_level must be 0-3, got "
                f"{config.optimization_config.optimization_level}"
            )
        unknown = sorted(set(config.executor_options) - _OPTIONS)
        if unknown:
            raise FerrumError.config(
                f"unknown executor_options {unknown}; supported: {sorted(_OPTIONS)}"
            )
        if config.executor_options.get("mesh"):
            sharding.parse_mesh(config.executor_options["mesh"])
        # Before any weight is read: bad formats name the supported ones.
        quantization_format(config.executor_options.get("quantize"))
        check_kv_dtype(config.executor_options.get("kv_dtype"))
        check_allow_non_finite(config.executor_options.get("allow_non_finite", False))


class JaxExecutorRegistry(ExecutorRegistry):
    """Executors by name, with their live metrics."""

    def __init__(self) -> None:
        self._executors: dict[str, ModelExecutor] = {}

    def register(self, name: str, executor: ModelExecutor) -> None:
        if not name:
            raise FerrumError.invalid_parameter("executor name must not be empty")
        if name in self._executors:
            raise FerrumError.already_exists(f"an executor named {name!r} is registered")
        self._executors[name] = executor

    def get(self, name: str) -> ModelExecutor | None:
        return self._executors.get(name)

    def remove(self, name: str) -> ModelExecutor | None:
        return self._executors.pop(name, None)

    def list_names(self) -> list[str]:
        return sorted(self._executors)

    def get_metrics(self, name: str) -> ExecutorMetrics | None:
        """Live metrics of `name`; executors without `metrics()` report their status."""
        executor = self._executors.get(name)
        if executor is None:
            return None
        if isinstance(executor, JaxModelExecutor):
            return executor.metrics()
        status = executor.status()
        usage = status.memory_usage
        return ExecutorMetrics(
            total_operations=status.prefill_operations + status.decode_operations,
            prefill_operations=status.prefill_operations,
            decode_operations=status.decode_operations,
            avg_prefill_latency=status.avg_prefill_time_ms,
            avg_decode_latency=status.avg_decode_time_ms,
            p95_prefill_latency=status.avg_prefill_time_ms,
            p95_decode_latency=status.avg_decode_time_ms,
            throughput_tps=0.0,
            memory_efficiency=usage.used_bytes / usage.allocated_bytes
            if usage.allocated_bytes
            else 0.0,
            batch_utilization=0.0,
        )
