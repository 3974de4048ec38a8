"""ferrum-jax: a JAX/XLA executor for decoder-only LLMs (Llama, Mistral, Qwen2/3, SmolLM).

Two layers of public API:

- the pure-functional core: `load_model` gives a `Model` (configs, graphdef, params,
  tokenizer), `init_model` a random `(graphdef, params)`;
  `init_cache`, `prefill`, `extend`, `decode`, `generate`, `forward` are jitted steps over a
  static KV cache; `SamplingParams` / `sample` are pure sampling; `score` and
  `rolling_loglikelihood` give continuation and whole-text log-probabilities (evaluation);
- many requests at once: `generate_batch` (continuous batching through an executor) and
  `generate_jsonl` (the same over a JSONL file, resumable; `ferrum-jax generate --input-file`);
- the Ferrum `ModelExecutor` contract: `JaxModelExecutor`, `JaxExecutorFactory`,
  `JaxExecutorRegistry` and the interface types of `ferrum_jax.interfaces`; across the hosts of
  a pod, `JaxModelExecutor(multihost=MultihostConfig())` on process 0 with `serve_follower`
  everywhere else, or host-local replicas (`ReplicatedExecutor`).

Importing the package is instant: each public name imports its module on first use
(`import ferrum_jax` used to import JAX, 2-3 s on a small CPU, before `--help` could print).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; `_EXPORTS` is what runs
    from ferrum_jax import progress, sharding
    from ferrum_jax.batch_generation import GenerationRequest, GenerationResult, generate_batch
    from ferrum_jax.cache import KVCache, init_cache
    from ferrum_jax.chat import ChatSession
    from ferrum_jax.checkpoint import (
        checkpoint_layout,
        default_model_path,
        hf_state_dict,
        load_gguf,
        load_hf,
        load_model,
        load_orbax,
        params_from_checkpoint,
        save_orbax,
    )
    from ferrum_jax.engine import (
        GenerateOutput,
        Score,
        bucket,
        bucket_length,
        compile_counts,
        decode,
        extend,
        forward,
        generate,
        prefill,
        rolling_loglikelihood,
        rolling_windows,
        score,
        set_lengths,
    )
    from ferrum_jax.errors import ErrorKind, FerrumError
    from ferrum_jax.executor import (
        JaxKvCacheHandle,
        JaxModelExecutor,
        MultihostConfig,
        ReplicatedExecutor,
        serve_follower,
    )
    from ferrum_jax.factory import JaxExecutorFactory, JaxExecutorRegistry
    from ferrum_jax.interfaces import (
        AttentionType,
        BatchModelExecutor,
        BlockTable,
        CacheHandleStats,
        DataType,
        DecodeInput,
        DecodeOutput,
        Device,
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
    from ferrum_jax.jsonl_batch import JsonlReport, LineDefaults, generate_jsonl
    from ferrum_jax.model import LoadedModel, Model
    from ferrum_jax.models.config import ModelConfig, RopeScaling
    from ferrum_jax.models.family import FAMILIES, Family, family
    from ferrum_jax.models.kv_quant import KV_DTYPES
    from ferrum_jax.models.llama import Llama, abstract_model, init_model
    from ferrum_jax.models.moe import MoE
    from ferrum_jax.models.quant import QUANTIZATIONS, QArray, dequantized_params, quantize_params
    from ferrum_jax.sampling import SamplingParams, row_keys, sample, sample_step, token_logprobs
    from ferrum_jax.streaming import StreamedToken, stream_tokens
    from ferrum_jax.tensor import JaxTensor
    from ferrum_jax.text import IncrementalDetokenizer, Tokenizer
    from ferrum_jax.text.grammar import Constraint

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "ferrum_jax.batch_generation": ("GenerationRequest", "GenerationResult", "generate_batch"),
    "ferrum_jax.cache": ("KVCache", "init_cache"),
    "ferrum_jax.chat": ("ChatSession",),
    "ferrum_jax.checkpoint": (
        "checkpoint_layout",
        "default_model_path",
        "hf_state_dict",
        "load_gguf",
        "load_hf",
        "load_model",
        "load_orbax",
        "params_from_checkpoint",
        "save_orbax",
    ),
    "ferrum_jax.engine": (
        "GenerateOutput",
        "Score",
        "bucket",
        "bucket_length",
        "compile_counts",
        "decode",
        "extend",
        "forward",
        "generate",
        "prefill",
        "rolling_loglikelihood",
        "rolling_windows",
        "score",
        "set_lengths",
    ),
    "ferrum_jax.errors": ("ErrorKind", "FerrumError"),
    "ferrum_jax.executor": (
        "JaxKvCacheHandle",
        "JaxModelExecutor",
        "MultihostConfig",
        "ReplicatedExecutor",
        "serve_follower",
    ),
    "ferrum_jax.factory": ("JaxExecutorFactory", "JaxExecutorRegistry"),
    "ferrum_jax.interfaces": (
        "AttentionType",
        "BatchModelExecutor",
        "BlockTable",
        "CacheHandleStats",
        "DataType",
        "DecodeInput",
        "DecodeOutput",
        "Device",
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
        "KvCacheHandle",
        "MemoryRequirements",
        "ModelExecutor",
        "ModelExecutorFactory",
        "ModelInfo",
        "ModelType",
        "OptimizationConfig",
        "PrefillInput",
        "PrefillOutput",
        "SpeculativeDecodeOutput",
        "SpeculativeExecutor",
        "TensorLike",
        "TensorRef",
        "UnifiedBatch",
        "UnifiedBatchItem",
        "GreedyRepetitionPenalty",
        "KvSlotAllocation",
        "KvSlotCapacitySnapshot",
        "KvSlotRequest",
        "KvSlotReservation",
        "LogitsReturnPolicy",
        "LogitsReturnPolicyKind",
        "RecurrentStateHandle",
        "RecurrentStateHandleStats",
        "RecurrentStateSpec",
        "RecurrentStateTensorSpec",
        "TokenSelectionMask",
        "kv_admission_exhausted",
    ),
    "ferrum_jax.jsonl_batch": ("JsonlReport", "LineDefaults", "generate_jsonl"),
    "ferrum_jax.model": ("LoadedModel", "Model"),
    "ferrum_jax.models.config": ("ModelConfig", "RopeScaling"),
    "ferrum_jax.models.family": ("FAMILIES", "Family", "family"),
    "ferrum_jax.models.kv_quant": ("KV_DTYPES",),
    "ferrum_jax.models.llama": ("Llama", "abstract_model", "init_model"),
    "ferrum_jax.models.moe": ("MoE",),
    "ferrum_jax.models.quant": ("QUANTIZATIONS", "QArray", "dequantized_params", "quantize_params"),
    "ferrum_jax.sampling": (
        "SamplingParams",
        "row_keys",
        "sample",
        "sample_step",
        "token_logprobs",
    ),
    "ferrum_jax.streaming": ("StreamedToken", "stream_tokens"),
    "ferrum_jax.tensor": ("JaxTensor",),
    "ferrum_jax.text": ("IncrementalDetokenizer", "Tokenizer"),
    "ferrum_jax.text.grammar": ("Constraint",),
}
"""Module -> the public names it gives, imported on first use."""

_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "FAMILIES",
    "KV_DTYPES",
    "QUANTIZATIONS",
    "AttentionType",
    "BatchModelExecutor",
    "BlockTable",
    "CacheHandleStats",
    "ChatSession",
    "Constraint",
    "DataType",
    "DecodeInput",
    "DecodeOutput",
    "Device",
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
    "Family",
    "FerrumError",
    "GenerateOutput",
    "GenerationRequest",
    "GenerationResult",
    "GreedyRepetitionPenalty",
    "IncrementalDetokenizer",
    "JaxExecutorFactory",
    "JaxExecutorRegistry",
    "JaxKvCacheHandle",
    "JaxModelExecutor",
    "JaxTensor",
    "JsonlReport",
    "KVCache",
    "KvCacheHandle",
    "KvSlotAllocation",
    "KvSlotCapacitySnapshot",
    "KvSlotRequest",
    "KvSlotReservation",
    "LineDefaults",
    "Llama",
    "LoadedModel",
    "LogitsReturnPolicy",
    "LogitsReturnPolicyKind",
    "MemoryRequirements",
    "MoE",
    "Model",
    "ModelConfig",
    "ModelExecutor",
    "ModelExecutorFactory",
    "ModelInfo",
    "ModelType",
    "MultihostConfig",
    "OptimizationConfig",
    "PrefillInput",
    "PrefillOutput",
    "QArray",
    "RecurrentStateHandle",
    "RecurrentStateHandleStats",
    "RecurrentStateSpec",
    "RecurrentStateTensorSpec",
    "ReplicatedExecutor",
    "RopeScaling",
    "SamplingParams",
    "Score",
    "SpeculativeDecodeOutput",
    "SpeculativeExecutor",
    "StreamedToken",
    "TensorLike",
    "TensorRef",
    "TokenSelectionMask",
    "Tokenizer",
    "UnifiedBatch",
    "UnifiedBatchItem",
    "abstract_model",
    "bucket",
    "bucket_length",
    "checkpoint_layout",
    "compile_counts",
    "decode",
    "default_model_path",
    "dequantized_params",
    "extend",
    "family",
    "forward",
    "generate",
    "generate_batch",
    "generate_jsonl",
    "hf_state_dict",
    "init_cache",
    "init_model",
    "kv_admission_exhausted",
    "load_gguf",
    "load_hf",
    "load_model",
    "load_orbax",
    "params_from_checkpoint",
    "prefill",
    "progress",
    "quantize_params",
    "rolling_loglikelihood",
    "rolling_windows",
    "row_keys",
    "sample",
    "sample_step",
    "save_orbax",
    "score",
    "serve_follower",
    "set_lengths",
    "sharding",
    "stream_tokens",
    "token_logprobs",
]


def __getattr__(name: str) -> Any:
    """Imports the module that gives `name` (a public name, or a submodule such as
    `ferrum_jax.engine`, which an eager `import ferrum_jax` used to make an attribute)."""
    module = _MODULE_OF.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists; something it imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
