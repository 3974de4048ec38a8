"""`JaxModelExecutor`: Ferrum's `ModelExecutor` (0.6.0 and the 0.7.7 additions) on KV pages.

The executor owns the params and one pool of KV pages (`max_kv_tokens` tokens in pages of
`block_size`). A sequence takes pages as it grows and gives them back when released; its
handle's `block_table()` lists them. Every call becomes ragged steps of the engine
(`engine.ragged_forward`): prompts, prompt chunks continuing at any offset, decodes and draft
verification all pack into one flat batch whose cost follows its live tokens. A prompt
longer than the step's token budget is chunked across steps. `max_batch_size` bounds the
concurrent sequences, not memory.

State is keyed by the sequence's id (`cache_id`), so Ferrum 0.7's engine may pass handles
it allocated itself (`UnifiedBatchItem.seq_id`, or any `KvCacheHandle` as
`PrefillInput.kv_cache`): an unknown id at position 0 starts a sequence.

With `enable_prefix_caching`, full pages are keyed by a hash chained over every token up to
the end of the page (`ferrum_jax.paging`); a new sequence borrows the longest cached
page-aligned prefix and computes only the rest. Shared pages are reference-counted and
never written: before a row writes into a page another owner holds (its last partial page
after `truncate_kv`, say), it takes a private copy.

What keeps a hostile call from hurting anyone else: small mechanisms, each in one place.

1. **Validate, then plan, then touch the device.** Every input is checked on the host, and
   so is the device memory each step's program needs (`_need`: XLA's own memory analysis
   of the compiled step, against the step budget); a budget that no step fits shrinks the
   token budget (longer prompts then take more chunks), down to a floor that is refused.
   Pages are checked for the whole call before any is taken: a call needing more than are
   free (after evicting unreferenced cached pages) is refused whole.
2. **Commit last, with an undo log** (`records.Txn`): records change only after the
   device work succeeded; the log keeps every touched sequence as it was.
3. **One device wrapper** (`_device`): a failed device step fails alone. When the failure
   consumed the donated pool, the pool is rebuilt by replaying every live row's tokens into
   its pages (the host keeps them for exactly this). The state goes to ERROR only if that
   fails too, and the next call retries the rebuild.
4. **Cancellation** (`_run`, `calls.Call`): a call cancelled before it starts never runs;
   one cancelled while it runs, or after it finished but before its result reached the
   caller, is rolled back from its undo log.
5. **Locks** (`_host`): device work runs on one worker thread per executor, in call order,
   holding no lock while it compiles or executes. `_host` guards host bookkeeping and the
   hand-off of the donated pool (`_donate`), so `release_cache`, `status`, `metrics` and
   handle queries never wait for device work; `key_cache`/`value_cache` read the pool, so
   they wait for the step handing it over, never for queued calls.
6. **No stale values**: attention multiplies every masked position's value by an exact
   zero (`models.attention`), so whatever a reused page held before, finite or not, never
   reaches a new sequence.

Deliberate differences from Rust:
- `PrefillOutput.logits` is a lazy `[batch, seq, vocab]` tensor (`LazyLogits`): the LM head
  runs on the positions read; padding positions repeat their row's last real logits, so
  `last_token_logits()` is every row's next-token distribution;
- `unified_decode` returns numpy float32 vectors (not Python lists) for final items;
- `key_cache(layer)` / `value_cache(layer)` return `[rows, kv_heads, num_tokens, head_dim]`
  copies of the sequence's pages (JAX arrays are immutable, not aliasable);
- `batch_prefill([])` and `batch_decode([])` return `[]`, like the trait's default loop;
- `update_params` (not in Ferrum) swaps weights between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import math
import numbers
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax import engine, progress, sharding
from ferrum_jax.cache import init_pages
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import memory, reservation
from ferrum_jax.executor import multihost as mh
from ferrum_jax.executor.calls import Call
from ferrum_jax.executor.handle import JaxKvCacheHandle
from ferrum_jax.executor.lazy_logits import LazyLogits, lm_head_step
from ferrum_jax.executor.records import Row, Txn
from ferrum_jax.executor.records import Sequence as Record
from ferrum_jax.executor.stats import Stats, p95
from ferrum_jax.finite import nonfinite_leaf
from ferrum_jax.interfaces import (
    AttentionType,
    BatchModelExecutor,
    DataType,
    DecodeInput,
    DecodeOutput,
    Device,
    ExecutorCapabilities,
    ExecutorMemoryUsage,
    ExecutorMetrics,
    ExecutorState,
    ExecutorStatus,
    KvCacheHandle,
    KvSlotAllocation,
    KvSlotCapacitySnapshot,
    KvSlotRequest,
    KvSlotReservation,
    LogitsReturnPolicy,
    MemoryRequirements,
    ModelInfo,
    ModelType,
    PrefillInput,
    PrefillOutput,
    SpeculativeDecodeOutput,
    SpeculativeExecutor,
    TensorLike,
    UnifiedBatch,
    UnifiedBatchItem,
    kv_admission_exhausted,
)
from ferrum_jax.model import Model
from ferrum_jax.models import attention, kv_quant, quant
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.paging import PageAllocator, PrefixCache
from ferrum_jax.tensor import JaxTensor, as_numpy, datatype_of

_MODEL_TYPES = {
    "llama": ModelType.Llama,
    "mistral": ModelType.Mistral,
    "qwen2": ModelType.Qwen,
    "qwen3": ModelType.Qwen,
    "gemma2": ModelType.Gemma,
    "gemma3_text": ModelType.Gemma,
    "mixtral": ModelType.Mistral,
    "qwen3_moe": ModelType.Qwen,
    "phi3": ModelType.Phi,
}
_MIN_STEP_TOKENS = 16
"""The smallest token budget a step may shrink to before a request is refused."""
_VERIFY_TOKENS = 16
"""Most draft tokens + 1 whose all-rows verify steps warmup compiles."""

T = TypeVar("T")


def _count(name: str, value: Any, *, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, or a config error naming `name` (bools, floats and
    strings are refused, not converted)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise FerrumError.config(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise FerrumError.config(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclasses.dataclass
class _Work:
    """New tokens for one row: `tokens` at positions `start, start + 1, ...`."""

    row: Row
    tokens: np.ndarray
    start: int
    want: str = "last"
    """`"last"`: logits of the last token; `"hidden"`: those, and references to the final
    hidden states of every token; `"all"`: logits of every token; `"none"`."""
    logits: np.ndarray | None = None
    """On the host once run: `[vocab]` (`"last"`, `"hidden"`) or `[n, vocab]` (`"all"`)."""
    hidden: list[tuple[jax.Array, int, int]] = dataclasses.field(default_factory=list)
    """Per chunk `(step hidden [T, embed], first row, rows)`, for `"hidden"`: references,
    never sliced on the device (a slice per prompt length would compile per length)."""
    greedy: LogitsReturnPolicy | None = None
    """A `GreedyArgmax` policy for `"last"`: the step picks the token on the device."""
    token: int | None = None
    """The token `greedy` picked, in place of `logits` (None: no id was allowed)."""

    def answer(self) -> np.ndarray | None:
        """The final position's logits, or `[token_id]` as float32 when the device picked
        it (Ferrum main reads any length-1 answer as a token id)."""
        if self.token is not None:
            return np.asarray([self.token], np.float32)
        return self.logits


_greedy_argmax = jax.jit(engine.greedy_argmax)


_copy_pages = jax.jit(
    lambda pages, layout, src, dst: tuple(layout.copy(pool, src, dst) for pool in pages),
    static_argnums=1,
    donate_argnums=0,
)


class JaxModelExecutor(BatchModelExecutor, SpeculativeExecutor):
    """Ferrum executor over the jitted engine: continuous batching on a pool of KV pages."""

    def __init__(
        self,
        model: Model | ModelConfig,
        graphdef: nnx.GraphDef | None = None,
        params: nnx.State | None = None,
        *,
        max_batch_size: int = 8,
        max_sequence_length: int = 2048,
        model_id: str | None = None,
        block_size: int = 16,
        mesh: jax.sharding.Mesh | None = None,
        tokenizer: Any = None,
        model_config: ModelConfig | None = None,
        memory_limit_bytes: int | None = None,
        max_kv_tokens: int | None = None,
        kv_memory_fraction: float | None = None,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = False,
        attention_impl: str = "auto",
        kv_dtype: str | None = None,
        multihost: mh.MultihostConfig | None = None,
    ) -> None:
        """Serves `model` (a `Model`; or the older `config, graphdef, params` triple, with
        `model_config` the checkpoint's own config and `tokenizer`).

        - `max_batch_size`: sequences (rows) live at once;
        - `max_sequence_length`: tokens one sequence may hold (`kv_capacity()`);
        - `max_kv_tokens`: tokens the page pool holds over all sequences (default
          `max_batch_size * max_sequence_length`); `block_size` tokens per page;
        - `kv_memory_fraction`: or size the pool as this share of the device memory free
          now (the smaller of the two when both are given);
        - `max_num_batched_tokens`: tokens one ragged step runs (rounded down to a power of
          two); longer prompts are chunked;
        - `memory_limit_bytes`: device memory (per device) the pool and each step's
          temporaries may use; by default 90% of what the device reports free;
        - `enable_prefix_caching`: share full pages between sequences with equal prefixes;
        - `attention_impl`: `"auto"` (by platform), `"xla"`, `"tpu"` or `"gpu"`;
        - `kv_dtype`: None (the compute dtype), `"int8"` or `"float8_e4m3fn"`: quantized
          KV pages with a scale per token and head (`models.kv_quant`); the Pallas kernels
          read float pages only, so a quantized pool runs the `"xla"` attention (the
          `attention` and `attention_fallback` fields of `model_info().metadata` say so).
        - `multihost`: one global `mesh` over every process of a `jax.distributed` job: on
          process 0 this executor leads, and every other process runs
          `ferrum_jax.serve_follower` with the same arguments (`executor.multihost`).

        With `mesh`, heads are adapted to it and params sharded (exact logits); a model
        already adapted to a mesh is used as is.
        """
        if not isinstance(model, Model):
            if graphdef is None or params is None:
                raise FerrumError.invalid_parameter(
                    "JaxModelExecutor takes a Model, or config, graphdef and params"
                )
            model = Model(model_config or model, graphdef, params, tokenizer=tokenizer)
        max_batch_size = _count("max_batch_size", max_batch_size)
        max_sequence_length = _count("max_sequence_length", max_sequence_length)
        block_size = _count("block_size", block_size)
        max_num_batched_tokens = _count(
            "max_num_batched_tokens", max_num_batched_tokens, minimum=_MIN_STEP_TOKENS
        )
        if kv_memory_fraction is not None and (
            isinstance(kv_memory_fraction, bool)
            or not isinstance(kv_memory_fraction, numbers.Real)
            or not 0 < kv_memory_fraction <= 1
        ):
            raise FerrumError.config(
                f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction!r}"
            )
        if max_kv_tokens is None and kv_memory_fraction is None:
            max_kv_tokens = max_batch_size * max_sequence_length
        if max_kv_tokens is not None:
            max_kv_tokens = _count("max_kv_tokens", max_kv_tokens)
        if memory_limit_bytes is not None:
            memory_limit_bytes = _count("memory_limit_bytes", memory_limit_bytes)
        if not isinstance(enable_prefix_caching, bool):
            raise FerrumError.config(
                f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}"
            )
        asked = attention.resolve_implementation(attention_impl)
        self._impl = kv_quant.implementation(asked, kv_dtype)
        self._kv_dtype = kv_dtype
        self._state = ExecutorState.INITIALIZING
        self._host = threading.Condition()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ferrum-jax")
        self._id = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        if mesh is not None and model.runtime_config == model.config:
            model = model.on_mesh(mesh)
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.block_size = block_size
        self.mesh = mesh
        self._graphdef, self._params = model.graphdef, model.params
        self.params_version = 0
        runtime = model.runtime_config
        self.kv_bytes_per_token = kv_quant.bytes_per_token(
            attention.IMPLEMENTATIONS[self._impl].layout,
            runtime.num_layers,
            runtime.num_kv_heads,
            runtime.head_dim,
            model.dtype,
        )
        self._devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
        if kv_memory_fraction is not None:
            max_kv_tokens = self._tokens_in_memory(kv_memory_fraction, max_kv_tokens)
        self._num_pages = attention.pages_for(max_kv_tokens, block_size)
        self._pages_per_seq = attention.pages_for(max_sequence_length, block_size)
        self._pool_bytes = self._num_pages * block_size * self.kv_bytes_per_token
        self._step_budget = self._check_pool_fits(memory_limit_bytes)
        self._pages: tuple[attention.Pool, ...] | None = self._new_pool()
        if memory_limit_bytes is None:
            self._step_budget = memory.budget(self._devices)
        # No step holds more than every row's whole sequence: no program past that bucket.
        self._token_budget = min(
            1 << (max_num_batched_tokens.bit_length() - 1),
            engine.bucket(max_batch_size * max_sequence_length),
        )
        self._programs: dict[tuple[int, int, int], Any] = {}
        self._needs: dict[tuple[int, int, int], int] = {}
        self._greedy_mask: tuple[tuple, jax.Array] | None = None
        """The last step's stacked greedy masks on the device, by `mask_key`: a decode
        batch that keeps its requests uploads them once."""
        self._allocator = PageAllocator(self._num_pages)
        self._prefix = PrefixCache(self._allocator, block_size) if enable_prefix_caching else None
        self._live: dict[str, Record] = {}
        self._released_by_update: set[str] = set()
        # One clock for call issues and releases: a call commits nothing for a sequence
        # released after the call was issued (a release wins over calls already queued).
        self._clock = itertools.count()
        self._pending: dict[int, None] = {}
        """Issue times of the calls not finished yet, oldest first."""
        self._released_at: dict[str, int] = {}
        """Release times of sequences released while calls were pending, oldest first."""
        self._stats = Stats()
        self._last_operation: float | None = None
        self._failure = ""
        shown = model.config
        self._info = ModelInfo(
            model_id=model_id or model.source,
            model_type=_MODEL_TYPES.get(shown.model_type, ModelType.Custom(shown.model_type)),
            num_parameters=shown.num_params,
            hidden_size=shown.hidden_size,
            num_layers=shown.num_layers,
            num_heads=shown.num_heads,
            num_kv_heads=shown.num_kv_heads,
            vocab_size=shown.vocab_size,
            max_sequence_length=max_sequence_length,
            dtype=datatype_of(model.param_dtype),
            device=JaxTensor(jnp.zeros((), device=jax.local_devices()[0])).device,
            metadata={
                "architecture": shown.architecture,
                "executor": "ferrum-jax",
                "attention": self._impl,
                "kv_dtype": kv_dtype or str(model.dtype),
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "quantization": model.quantization,
                "param_bytes": model.param_bytes,
                "block_size": block_size,
                "num_pages": self._num_pages,
            },
        )
        if asked != "xla" and kv_dtype is not None:
            self._info.metadata["attention_fallback"] = (
                f"the {asked} kernel cannot read {kv_dtype} KV pages; xla runs instead"
            )
        self._link: mh.Leader | mh.FollowerLink | None = None
        # Step inputs and outputs every process of a global mesh can address.
        self._arg_sharding = None
        self._step_program = engine.ragged_forward
        if multihost is not None:
            self._join(multihost)
        self._state = ExecutorState.READY

    # -----------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        max_batch_size: int = 8,
        max_sequence_length: int = 2048,
        dtype: str = "float32",
        mesh: jax.sharding.Mesh | None = None,
        quantize: str | None = None,
        allow_non_finite: bool = False,
        **options: Any,
    ) -> JaxModelExecutor:
        """Loads an HF directory, a `.gguf` file or an orbax directory (None: SmolLM2), with
        linear weights quantized to `quantize` (`"int8"`, `"int4"`; `load_model`; weights
        holding NaN or infinity are refused unless `allow_non_finite`); `options` are the
        constructor's keywords (`max_kv_tokens`, `kv_dtype`, ...)."""
        from ferrum_jax.checkpoint import load_model

        model_dtype(dtype)
        quant.quantization_format(quantize)
        kv_quant.check_kv_dtype(options.get("kv_dtype"))
        max_batch_size = _count("max_batch_size", max_batch_size)
        max_sequence_length = _count("max_sequence_length", max_sequence_length)
        loaded = load_model(
            model, dtype=dtype, mesh=mesh, quantize=quantize, allow_non_finite=allow_non_finite
        )
        if max_sequence_length > loaded.config.max_position_embeddings:
            raise FerrumError.config(
                f"max_sequence_length {max_sequence_length} exceeds the model's "
                f"max_position_embeddings {loaded.config.max_position_embeddings}"
            )
        return cls(
            loaded,
            max_batch_size=max_batch_size,
            max_sequence_length=max_sequence_length,
            mesh=mesh,
            **options,
        )

    def _tokens_in_memory(self, fraction: float, cap: int | None) -> int:
        """KV tokens `fraction` of the devices' free memory holds (the pool spreads over
        every device of the mesh: pages over `data`, KV heads over `model`)."""
        free = memory.free_device_bytes(self._devices)
        if free is None:
            raise FerrumError.config(
                "kv_memory_fraction needs a device that reports its memory; give max_kv_tokens"
            )
        tokens = int(fraction * free * len(self._devices)) // self.kv_bytes_per_token
        if tokens < self.block_size:
            raise FerrumError.resource_exhausted(
                f"{fraction:g} of the free device memory ({memory.mib(free)}) holds no KV page"
            )
        return tokens if cap is None else min(tokens, cap)

    def _check_pool_fits(self, limit: int | None) -> int | None:
        """Refuses a pool the device cannot hold, before allocating it; returns the step
        budget implied by an explicit `limit` (None: measured after the allocation)."""
        share = self._pool_bytes // len(self._devices)  # an even split over a mesh
        budget = memory.budget(self._devices) if limit is None else limit
        if budget is not None and share > budget:
            raise FerrumError.resource_exhausted(
                f"a KV pool of {self._num_pages} pages x {self.block_size} tokens needs "
                f"{memory.mib(share)} per device ({self.kv_bytes_per_token} bytes per token), "
                f"only {memory.mib(budget)} available; lower max_kv_tokens (or max_batch_size "
                "x max_sequence_length)"
            )
        return None if limit is None else limit - share

    def _new_pool(self) -> tuple[attention.Pool, ...]:
        pages = init_pages(
            self.model.runtime_config,
            self._num_pages,
            self.block_size,
            self.model.dtype,
            self._impl,
        )
        if self.mesh is None:
            return pages
        # Sequences own pages anywhere in the pool: replicated over `data`, so no step
        # gathers across data shards; KV heads shard on `model` like the heads that write them.
        rules = {**sharding.LOGICAL_RULES, "pages": None}
        layout = attention.IMPLEMENTATIONS[self._impl].layout
        return jax.device_put(pages, sharding.page_shardings(pages, layout, self.mesh, rules))

    def _join(self, config: mh.MultihostConfig) -> None:
        """Links this executor to the other processes of its global mesh: process 0 leads
        (and checks that every follower was built alike), the others follow."""
        if self.mesh is None or not self.mesh.is_multi_process:
            raise FerrumError.config(
                "multihost needs a mesh over the devices of every process (sharding.make_mesh "
                "after sharding.initialize)"
            )
        self._arg_sharding = mh.replicated(self.mesh)
        self._step_program = mh.ragged_forward_replicated(self.mesh)
        if jax.process_index() != 0:
            self._link = mh.FollowerLink(config, "mesh")
            return
        self._link = mh.Leader(config, range(1, jax.process_count()), "mesh")
        self._link.send(mh.Op.HELLO, [self.fingerprint()])
        self._link.collect()

    def fingerprint(self) -> np.ndarray:
        """`[k]` int32: what leader and followers must agree on to run the same programs."""
        c = self.model.runtime_config
        return np.asarray(
            [
                self._num_pages,
                self._pages_per_seq,
                self.block_size,
                self.max_batch_size,
                c.vocab_size,
                c.num_layers,
                c.num_kv_heads,
                c.hidden_size,
                sorted(attention.IMPLEMENTATIONS).index(self._impl),
            ],
            np.int32,
        )

    def _put(self, x: np.ndarray) -> jax.Array:
        # device_put, not jnp.asarray: asarray stages numpy through a program per shape.
        if self._arg_sharding is None:
            return jax.device_put(x)
        return jax.device_put(x, self._arg_sharding)

    def _single_host(self, what: str) -> None:
        """Refuses `what` on a multi-host executor: it would run a program on the leader's
        devices only, and the others' would wait for it forever."""
        if self._link is not None:
            raise FerrumError.unsupported(f"{what} is not supported on a multi-host executor")

    @property
    def _layout(self) -> attention.PageLayout:
        return attention.IMPLEMENTATIONS[self._impl].layout

    # -----------------------------------------------------------------------------------------
    # Mechanism 1: host-side validation (no state changes; callers hold `_host`)

    def _ensure_ready(self) -> None:
        if self._state is ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down; create a new one")
        if self._state is ExecutorState.ERROR:
            try:
                self._rebuild()
            except Exception as e:
                raise FerrumError.backend(
                    f"executor is in the Error state ({self._failure}); rebuilding the pool "
                    f"failed again: {e}"
                ) from e
            self._state = ExecutorState.READY

    def _is_live(self, cache_id: str) -> bool:
        return self._state is not ExecutorState.SHUTDOWN and cache_id in self._live

    def _key(self, handle: Any) -> str:
        """The sequence id a handle names (ours, or one the engine allocated)."""
        if not isinstance(handle, KvCacheHandle):
            raise FerrumError.invalid_parameter(f"kv_cache must be a KvCacheHandle, got {handle!r}")
        if isinstance(handle, JaxKvCacheHandle) and handle.executor is not self:
            raise FerrumError.invalid_parameter(
                f"cache handle {handle.cache_id()!r} belongs to another executor"
            )
        cache_id = handle.cache_id()
        if not isinstance(cache_id, str) or not cache_id:
            raise FerrumError.invalid_parameter(
                f"cache_id must be a non-empty string, got {cache_id!r}"
            )
        return cache_id

    def _missing(self, cache_id: str) -> FerrumError:
        if cache_id in self._released_by_update:
            return FerrumError.not_found(
                f"sequence {cache_id!r} was released by update_params(keep_cache=False); "
                "prefill it again"
            )
        return FerrumError.not_found(f"cache handle {cache_id!r} is unknown or was released")

    def _record_of(self, handle: Any) -> Record:
        """The live sequence `handle` names (handle queries)."""
        if self._state is ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down; create a new one")
        cache_id = self._key(handle)
        record = self._live.get(cache_id)
        if record is None:
            raise self._missing(cache_id)
        return record

    @staticmethod
    def _host_array(x: Any, what: str) -> np.ndarray:
        """`x` as a numpy array; ragged or non-numeric inputs are refused by name."""
        try:
            array = as_numpy(x)
        except (ValueError, TypeError, OverflowError) as e:
            raise FerrumError.invalid_parameter(
                f"{what} is not a rectangular numeric array: {e}"
            ) from e
        if array.dtype.kind not in "biuf":
            raise FerrumError.invalid_parameter(
                f"{what} must be numeric, got dtype {array.dtype} ({array.ravel()[:4]})"
            )
        return array

    def _token_array(self, x: Any, what: str) -> np.ndarray:
        ids = engine.check_token_ids(self._host_array(x, what), self.model.config.vocab_size, what)
        return np.asarray(ids, np.int32)

    def _check_length(self, cache_id: str, length: int) -> None:
        if length > self.max_sequence_length:
            raise FerrumError.request_validation(
                f"sequence {cache_id!r} would hold {length} tokens, more than kv_capacity "
                f"{self.max_sequence_length} (max_sequence_length)"
            )

    def _prompt_rows(self, input: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`input_ids [b, s]`, per-row lengths from the attention mask (right padding), and
        per-row first positions from `position_ids` (None: 0)."""
        if not isinstance(input, PrefillInput):
            raise FerrumError.invalid_parameter(f"expected a PrefillInput, got {input!r}")
        ids = self._token_array(input.input_ids, "input_ids")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise FerrumError.invalid_parameter(
                f"input_ids must be [batch, seq], got shape {ids.shape}"
            )
        b, s = ids.shape
        if b == 0 or s == 0:
            raise FerrumError.request_validation("empty prompt: input_ids has no tokens")
        lengths = np.full((b,), s, np.int32)
        if input.attention_mask is not None:
            mask = self._host_array(input.attention_mask, "attention_mask")
            if mask.shape != (b, s):
                raise FerrumError.invalid_parameter(
                    f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}"
                )
            if not np.all((mask == 0) | (mask == 1)):
                bad = mask[(mask != 0) & (mask != 1)].ravel()[:4]
                raise FerrumError.invalid_parameter(
                    f"attention_mask must hold only 0 and 1, got {bad.tolist()}"
                )
            mask = mask.astype(bool)
            lengths = mask.sum(axis=1).astype(np.int32)
            if np.any(mask != (np.arange(s)[None] < lengths[:, None])):
                raise FerrumError.unsupported("attention_mask must be right padding (1s then 0s)")
            if np.any(lengths == 0):
                raise FerrumError.request_validation("empty prompt: a row's attention_mask is 0")
        starts = None
        if input.position_ids is not None:
            positions = self._host_array(input.position_ids, "position_ids")
            if positions.ndim == 1:
                positions = positions[None]
            first = positions[:, :1]
            if positions.shape != (b, s) or np.any(positions != first + np.arange(s)[None]):
                raise FerrumError.invalid_parameter(
                    f"prefill position_ids must count up by one from each row's first position "
                    f"(shape {(b, s)}), got shape {positions.shape}"
                )
            starts = first[:, 0].astype(np.int64)
            if np.any(starts < 0):
                raise FerrumError.invalid_parameter(
                    f"position_ids start below 0: {starts.tolist()}"
                )
        if s > self.max_sequence_length:
            raise FerrumError.request_validation(
                f"prompt of {s} tokens exceeds max_sequence_length {self.max_sequence_length}"
            )
        return ids, lengths, starts

    def _decode_rows(self, input: Any) -> tuple[Record, np.ndarray]:
        if not isinstance(input, DecodeInput):
            raise FerrumError.invalid_parameter(f"expected a DecodeInput, got {input!r}")
        cache_id = self._key(input.kv_cache)
        record = self._live.get(cache_id)
        if record is None:
            raise self._missing(cache_id)
        ids = self._token_array(input.input_ids, "input_ids")
        rows = len(record.rows)
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        if ids.ndim != 1 or ids.shape[0] != rows:
            raise FerrumError.invalid_parameter(
                f"decode input_ids shape {ids.shape} does not match the handle's {rows} row(s) "
                f"(expected [{rows}, 1])"
            )
        if input.position_ids is not None:
            positions = self._host_array(input.position_ids, "position_ids").reshape(-1)
            if positions.shape != (rows,) or np.any(positions != np.asarray(record.lengths)):
                raise FerrumError.invalid_parameter(
                    f"position_ids {positions.tolist()} differ from the cached lengths "
                    f"{record.lengths}"
                )
        for length in record.lengths:
            self._check_length(cache_id, length + 1)
        self._greedy_policy(input)  # checked before any change; the step reads it again
        return record, ids

    def _drafts(self, draft_tokens: Any) -> np.ndarray:
        """Draft ids: a 1-D sequence of integers in the vocabulary (floats and bools refused,
        as for prompts)."""
        if draft_tokens is None or isinstance(draft_tokens, str | bytes):
            raise FerrumError.invalid_parameter(
                f"draft_tokens must be a sequence of token ids, got {draft_tokens!r}"
            )
        drafts = self._host_array(draft_tokens, "draft_tokens")
        if drafts.size == 0:
            drafts = drafts.astype(np.int32)
        if drafts.ndim != 1:
            raise FerrumError.invalid_parameter(
                f"draft_tokens must be 1-D, got shape {drafts.shape}"
            )
        return self._token_array(drafts, "draft_tokens")

    @staticmethod
    def _threshold(value: Any) -> float:
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise FerrumError.invalid_parameter(
                f"acceptance_threshold must be a number, got {value!r}"
            )
        if not math.isfinite(value):
            raise FerrumError.invalid_parameter(
                f"acceptance_threshold must be finite, got {value!r}"
            )
        return float(value)

    def _check_rows_available(self, new_rows: int) -> None:
        live = sum(len(r.rows) for r in self._live.values())
        if live + new_rows > self.max_batch_size:
            raise FerrumError.resource_exhausted(
                f"{new_rows} new sequence row(s) would make {live + new_rows} live, "
                f"max_batch_size is {self.max_batch_size}"
            )

    # -----------------------------------------------------------------------------------------
    # Pages (worker thread, under `_host`)

    def _pages_needed(self, row: Row, length: int) -> int:
        """Pages `row` must take to hold `length` tokens, counting a private copy of a shared
        page it would write into."""
        need = max(attention.pages_for(length, self.block_size) - len(row.pages), 0)
        return need + int(self._shared_write_page(row) is not None)

    def _shared_write_page(self, row: Row) -> int | None:
        """Index of the page the row's next token goes to, when another owner holds it."""
        index = len(row) // self.block_size
        if index < len(row.pages) and self._allocator.refcount(row.pages[index]) > 1:
            return index
        return None

    def _check_pages(self, needed: int) -> None:
        if not self._allocator.can_allocate(needed):
            raise FerrumError.resource_exhausted(
                f"the request needs {needed} KV page(s) of {self.block_size} tokens, "
                f"{self._allocator.num_free} of {self._num_pages} are free"
                + (
                    f" ({self._prefix.reclaimable()} more cached and evictable)"
                    if self._prefix is not None
                    else ""
                )
            )

    def _grow(self, row: Row, length: int, copies: list[tuple[int, int]]) -> None:
        """Gives `row` the pages `length` tokens need; a shared page it is about to write is
        replaced by a private copy (`copies` collects `(src, dst)` for the device)."""
        index = self._shared_write_page(row)
        if index is not None:
            (fresh,) = self._allocator.allocate(1)
            copies.append((row.pages[index], fresh))
            self._allocator.release([row.pages[index]])
            row.pages[index] = fresh
            row.shared = min(row.shared, index)
        missing = attention.pages_for(length, self.block_size) - len(row.pages)
        if missing > 0:
            row.pages.extend(self._allocator.allocate(missing))

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """Device copies of shared pages a row is about to write (copy-on-write)."""
        if not copies:
            return
        n = engine.bucket(len(copies))
        src = np.full((n,), self._num_pages, np.int32)
        dst = np.full((n,), self._num_pages, np.int32)
        src[: len(copies)], dst[: len(copies)] = zip(*copies, strict=True)
        if self._link is not None:
            self._link.send(mh.Op.COPY, [src, dst])
        self._run_copy(src, dst)

    def _run_copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Page copies `src[i] -> dst[i]` on this process's devices (`[n]` int32 each)."""
        s, d = self._put(src), self._put(dst)
        self._donate(lambda pages: (None, _copy_pages(pages, self._layout, s, d)))

    def _release_rows(self, rows: Sequence[Row]) -> None:
        """Gives the rows' pages back (full pages go to the prefix cache first, if enabled)."""
        self._cache_full_pages(rows)
        for row in rows:
            self._allocator.release(row.pages)
            row.pages = []

    def _cacheable(self, row: Row) -> bool:
        """Whether the row's pages may meet the prefix cache: KV of the current weights only."""
        return row.params_version == self.params_version

    def _borrow_prefix(self, row: Row, tokens: np.ndarray, final: bool = True) -> int:
        """Prefix-cache hit for a row about to take `tokens`: cached full pages that continue
        its borrowed ones take over the row's own pages at those places (same tokens, same
        positions: the same keys and values) and the `tokens` they hold are not computed
        again; returns the tokens reused. Chunks need not be page-aligned: a chunk that ended
        inside a page borrows that page once a later chunk completes it in the cache. A
        `final` chunk keeps at least one token to compute (its logits are wanted)."""
        if self._prefix is None or not self._cacheable(row):
            return 0
        full = [*row.tokens, *tokens.tolist()]
        limit = (len(full) - 1 if final else len(full)) // self.block_size
        if limit * self.block_size <= len(row):
            return 0
        pages = self._prefix.lookup(full, max_pages=limit, held=row.shared)
        end = row.shared + len(pages)
        if end * self.block_size <= len(row):
            self._allocator.release(pages)
            return 0
        for j, page in enumerate(pages, start=row.shared):
            if j < len(row.pages):
                self._allocator.release([row.pages[j]])
                row.pages[j] = page
            else:
                row.pages.append(page)
        row.shared = end
        reused = end * self.block_size - len(row)
        row.tokens.extend(tokens[:reused].tolist())
        self._stats.prefill_tokens_reused += reused
        return reused

    def _unborrow(self, row: Row, reused: int) -> None:
        """Takes back `_borrow_prefix`'s `reused` tokens of a row that existed before a
        failed call; the borrowed pages stay (they hold the row's own tokens' keys and
        values), past-the-end ones go with `_shrink`."""
        if reused:
            self._stats.prefill_tokens_reused -= reused
            del row.tokens[-reused:]
            row.shared = min(row.shared, len(row) // self.block_size)

    # -----------------------------------------------------------------------------------------
    # Mechanism 1: device memory, from XLA's memory analysis of each compiled step

    def _program(self, tokens: int, items: int, rows: int | None = None) -> Any:
        """The compiled ragged step of `tokens` tokens, `items` items and `rows` logit rows
        (default one per item; `tokens` for all-rows verify steps), compiled once and kept:
        the executor calls it directly, so the compile that measures its memory is the one
        that runs."""
        key = (tokens, items, items if rows is None else rows)
        if key not in self._programs:
            i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._arg_sharding)
            self._programs[key] = self._step_program.lower(
                self._graphdef,
                self._params,
                self._pages,
                i32(tokens),
                i32(items + 1),
                i32(items),
                i32(items, self._pages_per_seq),
                i32(key[2]),
                self._impl,
            ).compile()
        return self._programs[key]

    def _need(self, tokens: int, items: int, rows: int) -> int:
        """Device bytes the step needs beyond its arguments, per device. Kept per program:
        XLA's analysis costs tens of milliseconds, as much as a small step itself."""
        key = (tokens, items, rows)
        if key not in self._needs:
            analysis = self._program(tokens, items, rows).memory_analysis()
            self._needs[key] = (
                0
                if analysis is None
                else analysis.temp_size_in_bytes
                + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes
            )
        return self._needs[key]

    def _fits(self, tokens: int, items: int, rows: int | None = None) -> bool:
        rows = items if rows is None else rows
        return self._step_budget is None or self._need(tokens, items, rows) <= self._step_budget

    @property
    def compiled_programs(self) -> list[tuple[int, int, int]]:
        """`(token bucket, item bucket, logit rows)` of every ragged step compiled so far."""
        return sorted(self._programs)

    # -----------------------------------------------------------------------------------------
    # Device programs (worker thread only)

    def _donate(self, program: Callable[[Any], tuple[T, Any]]) -> T:
        """Runs `program(pages) -> (out, pages')`: the one place the pool is handed to a
        donating program. While it is out, `_pages` is None and views wait (`_pages_view`)."""
        with self._host:
            pages, self._pages = self._pages, None
        try:
            out, pages = program(pages)
        finally:
            with self._host:
                self._pages = pages
                self._host.notify_all()
        return out

    def _forward(self, works: list[_Work]) -> None:
        """Runs `works` as ragged steps: each step takes the next chunks of the works in
        order, at most the token budget and `max_batch_size` items; a work's chunks run in
        consecutive steps. A step whose program would not fit the device halves the budget
        (more, smaller chunks), down to `_MIN_STEP_TOKENS`. Fills each work's `logits` /
        `hidden`."""
        works = [w for w in works if len(w.tokens)]  # wholly reused chunks compute nothing
        if not works:
            return
        budget = self._token_budget
        while True:
            steps = self._chunk(works, budget)
            batches = [self._pack(step) for step in steps]
            if all(self._fits(*_shape(b)) for b in batches):
                break
            budget //= 2
            if budget < _MIN_STEP_TOKENS:
                raise FerrumError.resource_exhausted(
                    f"no ragged step of {_MIN_STEP_TOKENS}+ tokens fits the "
                    f"{memory.mib(self._step_budget or 0)} free for steps"
                )
        for step, batch in zip(steps, batches, strict=True):
            arrays = (
                batch.tokens,
                batch.cu_q_lens,
                batch.kv_lens,
                batch.page_table,
                batch.logits_at,
            )
            # Followers run every device program in lockstep: device greedy is single-host,
            # and full logits are always an accepted answer.
            greedy = {
                batch.logit_rows[i][0]: work.greedy
                for i, (work, _, _) in enumerate(step)
                if work.greedy is not None and batch.logit_rows[i]
            }
            if greedy and self._link is None:
                needed = sum(map(len, batch.logit_rows))
                host, hidden, tokens = self._greedy_step(arrays, greedy, needed)
            else:
                (host, hidden), tokens = self._step(arrays), {}
            self._stats.steps += 1
            for i, (work, _, n) in enumerate(step):
                rows = batch.logit_rows[i]
                if rows and rows[0] in tokens:
                    work.token = tokens[rows[0]]
                elif work.want == "all":
                    part = host[rows]
                    if work.logits is not None:
                        part = np.concatenate([work.logits, part])
                    work.logits = part
                elif rows:
                    work.logits = host[rows[0]]
                if work.want == "hidden":
                    work.hidden.append((hidden, int(batch.cu_q_lens[i]), n))

    def _step(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, jax.Array | None]:
        """One ragged step on packed host arrays `(tokens [T], cu_q_lens [I + 1], kv_lens [I],
        page_table [I, pages_per_seq], logits_at [R])`, on every process of a multi-host
        executor: logits `[R, vocab]` on the host, and the step's hidden states `[T, embed]`."""
        if self._link is not None:
            self._link.send(mh.Op.STEP, arrays)
        return self._run_step(arrays)

    def _run_step(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, jax.Array | None]:
        """`_step` on this process's devices."""
        logits, hidden = self._dispatch(arrays)
        host = np.asarray(logits)  # one transfer; rows are picked on the host
        self._stats.logits_bytes_to_host += host.nbytes
        return host, hidden

    def _dispatch(self, arrays: tuple[np.ndarray, ...]) -> tuple[jax.Array, jax.Array | None]:
        """The ragged step on this process's devices; logits `[R, vocab]` stay there."""
        tokens, _, kv_lens, _, logits_at = arrays
        program = self._program(len(tokens), len(kv_lens), len(logits_at))
        args = [self._put(x) for x in arrays]
        params = self._params
        return self._donate(lambda pages: _unpack(program(params, pages, *args)))

    def _greedy_step(
        self, arrays: tuple[np.ndarray, ...], greedy: dict[int, LogitsReturnPolicy], needed: int
    ) -> tuple[np.ndarray | None, jax.Array | None, dict[int, int]]:
        """A single-host step whose logit rows `greedy` pick their token on the device
        (`engine.greedy_argmax`): `(host logits or None, hidden, {row: token})`. Only the
        `[R]` token ids travel to the host, plus the full logits when some of the `needed`
        rows still want them (a full-logits row, or a greedy row whose mask allowed no id)."""
        logits, hidden = self._dispatch(arrays)
        rows = len(arrays[4])
        policies = [LogitsReturnPolicy.FullLogits] * rows
        for row, policy in greedy.items():
            policies[row] = policy
        packed = engine.pack_greedy(policies, logits.shape[-1], rows)
        if self._greedy_mask is None or self._greedy_mask[0] != packed.mask_key:
            self._greedy_mask = (packed.mask_key, self._put(packed.mask))
        ids, allowed = _greedy_argmax(
            logits, self._greedy_mask[1], self._put(packed.penalty), self._put(packed.penalty_ids)
        )
        ids, allowed = np.asarray(ids), np.asarray(allowed)
        tokens = {row: int(ids[row]) for row in greedy if allowed[row]}
        host = np.asarray(logits) if len(tokens) < needed else None
        self._stats.logits_bytes_to_host += ids.nbytes + allowed.nbytes
        self._stats.logits_bytes_to_host += 0 if host is None else host.nbytes
        return host, hidden, tokens

    def _chunk(self, works: list[_Work], budget: int) -> list[list[tuple[_Work, int, int]]]:
        """`(work, offset, n)` chunks grouped into steps of at most `budget` tokens and
        `max_batch_size` items."""
        steps: list[list[tuple[_Work, int, int]]] = [[]]
        used = 0
        for work in works:
            offset = 0
            while offset < len(work.tokens):
                if used == budget or len(steps[-1]) == self.max_batch_size:
                    steps.append([])
                    used = 0
                n = min(budget - used, len(work.tokens) - offset)
                steps[-1].append((work, offset, n))
                used += n
                offset += n
        return steps

    def _pack(self, step: list[tuple[_Work, int, int]]) -> engine.RaggedBatch:
        items = []
        for work, offset, n in step:
            final = offset + n == len(work.tokens)
            if work.want == "all":
                logits = "all"
            else:
                logits = "last" if final and work.want in ("last", "hidden") else "none"
            chunk = work.tokens[offset : offset + n]
            items.append(engine.RaggedItem(chunk, work.start + offset, work.row.pages, logits))
        return engine.pack_ragged(
            items, pages_per_item=self._pages_per_seq, num_pages=self._num_pages
        )

    def _device(self, kind: str | None, tokens: int, rows: int, fn: Callable[[], T]) -> T:
        """Runs one call's device work (mechanism 3). On failure the pool is rebuilt if it
        was consumed, the state stays READY, and the error is a `FerrumError`; `kind` None
        records no statistics (warmup)."""
        self._state = ExecutorState.BUSY
        start = time.perf_counter()
        try:
            out = jax.block_until_ready(fn())
        except Exception as e:
            self._recover(kind or "warmup", e)
        if kind is not None:
            self._stats.record(kind, (time.perf_counter() - start) * 1e3, tokens, rows)
            self._last_operation = time.monotonic()
        self._state = ExecutorState.READY
        return out

    def _recover(self, kind: str, error: Exception) -> NoReturn:
        if isinstance(self._link, mh.Leader) and not isinstance(error, FerrumError):
            # The followers may or may not have run the step: out of step for good.
            self._link.fail(f"{kind} failed on the device: {error}")
            self._state = ExecutorState.ERROR
            self._failure = self._link.lost or ""
            raise FerrumError.device(
                f"{kind} failed on the device of a multi-host executor: {error}; restart the job"
            ) from error
        try:
            if not self._pool_intact():
                self._rebuild()
        except Exception as again:
            self._state = ExecutorState.ERROR
            self._failure = (
                f"{kind} failed on the device: {error}; restoring the pool failed: {again}"
            )
            raise FerrumError.device(f"{self._failure} (the next call retries)") from again
        self._state = ExecutorState.READY
        if isinstance(error, FerrumError):
            raise error
        build = (
            FerrumError.resource_exhausted
            if "RESOURCE_EXHAUSTED" in str(error)
            else FerrumError.device
        )
        raise build(
            f"{kind} failed on the device: {error}; the request was dropped, every other "
            "sequence is intact"
        ) from error

    def _pool_intact(self) -> bool:
        pages = self._pages
        if pages is None:
            return False
        leaves = jax.tree.leaves(pages)
        if any(x.is_deleted() for x in leaves):
            return False
        try:
            jax.block_until_ready(leaves)
        except Exception:
            return False
        return True

    def _replay(self, rows: list[Row]) -> None:
        """Writes `rows`' tokens into their pages again (their pool content was lost)."""
        works = [_Work(r, np.asarray(r.tokens, np.int32), 0, "none") for r in rows if r.tokens]
        self._forward(works)

    def _rebuild(self) -> None:
        """A fresh pool with every live row's tokens replayed into its pages (mechanism 3);
        the prefix cache forgets pages only it held (their content is gone)."""
        if self._link is not None:
            self._link.send(mh.Op.POOL)
        self._fresh_pool()
        with self._host:
            if self._prefix is not None:
                self._prefix.clear()
            rows = [row for record in self._live.values() for row in record.rows]
        self._replay(rows)
        jax.block_until_ready(self._pages)

    def _fresh_pool(self) -> None:
        """Replaces the pool by a new, empty one on this process's devices."""
        with self._host:
            old, self._pages = self._pages, None
        for x in jax.tree.leaves(old):
            if not x.is_deleted():
                x.delete()
        fresh = self._new_pool()
        with self._host:
            self._pages = fresh
            self._host.notify_all()

    def _roll_back(self, txn: Txn | None) -> None:
        """Undoes a committed call whose caller is gone (mechanism 4): every sequence it
        touched goes back to its record from before the call, unless a later call changed it
        since; rows whose pages no longer hold their tokens are replayed."""
        if txn is None:
            return
        replay: list[Row] = []
        with self._host:
            for cache_id, before in txn.before.items():
                now = self._live.get(cache_id)
                if now is None or now.version != txn.after.get(cache_id):
                    continue  # released, or changed by a later call: theirs now
                if before is None:
                    del self._live[cache_id]
                    self._release_rows(now.rows)
                    continue
                for old, new in zip(before.rows, now.rows, strict=True):
                    if new.tokens[: len(old)] == old.tokens and len(old.pages) <= len(new.pages):
                        # An append: the pages hold the old tokens; give back the rest.
                        keep = attention.pages_for(len(old), self.block_size)
                        self._allocator.release(new.pages[keep:])
                        old.pages = new.pages[:keep]
                        old.shared = min(old.shared, new.shared)
                    else:
                        self._allocator.release(new.pages)
                        old.pages = self._allocator.allocate(
                            attention.pages_for(len(old), self.block_size)
                        )
                        old.shared = 0
                        replay.append(old)
                before.version = now.version + 1
                self._live[cache_id] = before
        try:
            self._replay(replay)
        except Exception as e:
            self._state = ExecutorState.ERROR
            self._failure = f"rolling back a cancelled call failed: {e}"

    # -----------------------------------------------------------------------------------------
    # Mechanisms 4 and 5: the worker thread, cancellation

    async def _run(self, work: Callable[[Txn], T], *, opening: bool = True) -> T:
        """Runs `work(txn)` on the worker thread, in call order; see `calls.Call`."""
        if self._state is ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down; create a new one")
        call = Call()
        with self._host:
            issued = next(self._clock)
            self._pending[issued] = None
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._worker, self._execute, call, work, opening, issued
            )
        except RuntimeError as e:  # the worker stopped under a concurrent shutdown()
            self._finished(issued)
            raise FerrumError.backend("executor is shut down; create a new one") from e
        try:
            return await future
        except asyncio.CancelledError:
            if call.abandon():
                with contextlib.suppress(RuntimeError):  # the executor shut down meanwhile
                    self._worker.submit(self._roll_back, call.txn)
            raise

    def _execute(self, call: Call, work: Callable[[Txn], T], opening: bool, issued: int) -> T:
        try:
            if not call.begin():
                raise FerrumError.cancelled("the call was cancelled before it ran")
            if opening:
                self._ensure_ready()
            txn = Txn(issued)
            result = work(txn)
            with self._host:
                self._stats.peak_bytes = max(self._stats.peak_bytes, self._used_bytes())
            if not call.finish(txn):
                self._roll_back(txn)
                raise FerrumError.cancelled(
                    "the call was cancelled while it ran; it was rolled back"
                )
            return result
        finally:
            self._finished(issued)

    def _finished(self, issued: int) -> None:
        """Forgets a finished call, and the releases no pending call was issued before."""
        with self._host:
            del self._pending[issued]
            oldest = next(iter(self._pending), None)
            if self._released_at:
                self._released_at = {
                    cache_id: at
                    for cache_id, at in self._released_at.items()
                    if oldest is not None and at > oldest
                }

    # -----------------------------------------------------------------------------------------
    # Commits (worker thread, under `_host`)

    def _commit(self, txn: Txn, record: Record) -> None:
        """Marks `record` changed by this call (after its device work succeeded); a sequence
        released after the call was issued stays released, and what the call gave it is
        given back."""
        record.version += 1
        record.last_access = time.monotonic()
        txn.committed(record)
        if self._released_at.get(record.cache_id, -1) > txn.issued:
            if self._live.get(record.cache_id) is record:
                del self._live[record.cache_id]
            self._release_rows(record.rows)

    def _new_record(self, txn: Txn, cache_id: str, rows: list[Row]) -> Record:
        txn.touch(cache_id, None)
        record = Record(cache_id, rows, time.monotonic())
        self._live[cache_id] = record
        self._released_by_update.discard(cache_id)
        return record

    def _cache_full_pages(self, rows: Sequence[Row]) -> None:
        for row in rows:
            # A row released while its call ran holds no pages any more: nothing to cache.
            if self._prefix is not None and self._cacheable(row) and row.pages:
                self._prefix.insert(row.tokens, row.pages)

    # -----------------------------------------------------------------------------------------
    # ModelExecutor

    def info(self) -> ModelInfo:
        return dataclasses.replace(
            self._info, metadata={**self._info.metadata, "params_version": self.params_version}
        )

    def supports_native_unified_decode(self) -> bool:
        return True

    def kv_capacity(self) -> int | None:
        """Tokens one sequence may hold (`max_sequence_length`)."""
        return self.max_sequence_length

    def _allocatable(self) -> int:
        """Pages an allocation may take now: free ones and cached ones it would evict."""
        reclaimable = self._prefix.reclaimable() if self._prefix is not None else 0
        return self._allocator.num_free + reclaimable

    def kv_slot_capacity_snapshot(self) -> KvSlotCapacitySnapshot | None:
        """The page pool (Ferrum main): `free_blocks` counts evictable prefix-cache pages, as
        an allocation would reclaim them."""
        with self._host:
            if self._state is ExecutorState.SHUTDOWN:
                raise FerrumError.backend("executor is shut down; create a new one")
            return KvSlotCapacitySnapshot(self.block_size, self._num_pages, self._allocatable())

    def reserve_kv_slots(self, requests: Sequence[KvSlotRequest]) -> KvSlotReservation | None:
        """Makes each `cache_id` hold the pages of `target_len` tokens before the next forward
        (Ferrum main); all or nothing.

        Unknown ids become empty sequences holding their pages (a `unified_decode` item at
        `pos_offset` 0 fills them); duplicate ids merge to the largest bounds; a repeat
        allocates nothing. `admission_target_len` is only checked: the pages it needs beyond
        the targets must be free too, or the whole call fails with the `resource_exhausted`
        text Ferrum's engine parses (`kv_admission_exhausted`) and changes nothing. Host
        bookkeeping only, so it never waits for device work.
        """
        merged = reservation.merge(requests)
        with self._host:
            if self._state is ExecutorState.SHUTDOWN:
                raise FerrumError.backend("executor is shut down; create a new one")
            plan = []
            immediate = admission = new_rows = 0
            for cache_id, (target, bound) in merged.items():
                record = self._live.get(cache_id)
                if record is not None and len(record.rows) != 1:
                    raise FerrumError.invalid_parameter(
                        f"sequence {cache_id!r} holds {len(record.rows)} rows; KV slots are "
                        "reserved for single-row sequences"
                    )
                self._check_length(cache_id, target)
                # A bound past the context cannot be reached: the sequence ends there first.
                bound = min(bound, self.max_sequence_length)
                row = (
                    record.rows[0]
                    if record is not None
                    else Row([], [], params_version=self.params_version)
                )
                new_rows += record is None
                pages = max(attention.pages_for(target, self.block_size) - len(row.pages), 0)
                # A shared page the next token writes is copied at the step: count it here.
                immediate += self._pages_needed(row, target) if target > len(row) else 0
                admission += self._pages_needed(row, bound) if bound > len(row) else 0
                plan.append((cache_id, record, row, pages))
            free = self._allocatable()
            if admission > free:
                raise kv_admission_exhausted(admission, immediate, free)
            self._check_rows_available(new_rows)
            allocations = []
            for cache_id, record, row, pages in plan:
                before = len(row.pages)
                row.pages.extend(self._allocator.allocate(pages))
                if record is None:
                    self._live[cache_id] = Record(cache_id, [row], time.monotonic())
                    self._released_by_update.discard(cache_id)
                allocations.append(KvSlotAllocation(cache_id, before, len(row.pages), pages))
            return KvSlotReservation(
                block_size=self.block_size,
                total_blocks=self._num_pages,
                free_blocks_before=free,
                free_blocks_after=self._allocatable(),
                allocations=allocations,
            )

    async def prefill(self, input: PrefillInput) -> PrefillOutput:
        return (await self.batch_prefill([input]))[0]

    async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]:
        """All prompts of all inputs in ragged steps (one, unless they exceed the token
        budget). An input with `kv_cache` continues that sequence when its `position_ids`
        start at the sequence's length (a chunked prefill), or starts it over from 0."""
        inputs = _as_list(inputs, "batch_prefill inputs")
        if not inputs:
            return []

        def work(txn: Txn) -> list[PrefillOutput]:
            with self._host:
                plans = self._plan_prefill(inputs)
                copies: list[tuple[int, int]] = []
                works, firsts = [], []
                for cache_id, record, ids, lengths, fresh in plans:
                    for r in range(len(ids)):
                        tokens = ids[r, : lengths[r]]
                        if fresh:  # a new sequence, or one started over
                            row = Row([], [], params_version=self.params_version)
                            reused = self._borrow_prefix(row, tokens)
                        else:
                            row, reused = record.rows[r], 0
                        self._grow(row, len(row) + len(tokens) - reused, copies)
                        works.append(_Work(row, tokens[reused:], len(row), "hidden"))
                        firsts.append(reused)
                    txn.touch(cache_id, record)
            computed = sum(len(w.tokens) for w in works)
            try:
                self._device(
                    "prefill", computed, len(works), lambda: self._run_works(copies, works)
                )
            except BaseException:
                with self._host:
                    fresh = [plan[4] for plan in plans for _ in range(len(plan[2]))]
                    self._undo_growth(works, fresh)
                raise
            return self._commit_prefill(txn, inputs, plans, works, firsts)

        return await self._run(work)

    def _plan_prefill(self, inputs: Sequence[PrefillInput]) -> list[tuple]:
        """Per input `(cache_id, record or None, ids, lengths, fresh)` (`fresh`: new rows, for
        a new sequence or one started over); checks every input, the row count and the page
        need before anything changes (caller holds `_host`)."""
        plans, seen, new_rows, pages = [], set(), 0, 0
        for input in inputs:
            ids, lengths, starts = self._prompt_rows(input)
            if input.kv_cache is None:
                cache_id, record = None, None  # named below, once every caller id is known
            else:
                cache_id = self._key(input.kv_cache)
                record = self._live.get(cache_id)
                if record is None and isinstance(input.kv_cache, JaxKvCacheHandle):
                    raise self._missing(cache_id)
            if cache_id in seen:
                raise FerrumError.invalid_parameter(
                    f"cache handle {cache_id!r} appears twice in one batch_prefill"
                )
            if cache_id is not None:
                seen.add(cache_id)
            continuing = starts is not None and np.any(starts > 0)
            if continuing:
                if record is None:
                    raise FerrumError.invalid_parameter(
                        f"position_ids start at {starts.tolist()} for "
                        + (
                            "a new sequence"
                            if cache_id is None
                            else f"unknown sequence {cache_id!r}"
                        )
                        + ": a new sequence starts at 0"
                    )
                if len(record.rows) != len(ids) or starts.tolist() != record.lengths:
                    raise FerrumError.invalid_parameter(
                        f"position_ids start at {starts.tolist()}, sequence {cache_id!r} "
                        f"holds {record.lengths} tokens: a chunk continues at its length"
                    )
                for row, n in zip(record.rows, lengths, strict=True):
                    self._check_length(cache_id, len(row) + int(n))
                    pages += self._pages_needed(row, len(row) + int(n))
                plans.append((cache_id, record, ids, lengths, False))
                continue
            if record is not None and len(record.rows) != len(ids):
                raise FerrumError.invalid_parameter(
                    f"input_ids batch {len(ids)} does not match the handle's "
                    f"{len(record.rows)} row(s)"
                )
            if record is None:
                new_rows += len(ids)
            pages += sum(attention.pages_for(int(n), self.block_size) for n in lengths)
            plans.append((cache_id, record, ids, lengths, True))
        self._check_rows_available(new_rows)
        self._check_pages(pages)
        return [(self._fresh_id(seen), *plan[1:]) if plan[0] is None else plan for plan in plans]

    def _fresh_id(self, taken: set[str]) -> str:
        """An id for a sequence the executor names. Callers choose their own ids (any
        string, an id of ours included, since our handles show them), so one in use by a
        live sequence or by this batch is skipped rather than taken over."""
        while True:
            cache_id = f"{self._id}-{next(self._ids)}"
            if cache_id not in self._live and cache_id not in taken:
                taken.add(cache_id)
                return cache_id

    def _run_works(self, copies: list[tuple[int, int]], works: list[_Work]) -> Any:
        self._copy(copies)
        self._forward(works)
        return self._pages

    def _undo_growth(self, works: list[_Work], fresh: list[bool]) -> None:
        """A failed call's page growth, given back: fresh rows entirely, existing rows past
        the pages their tokens need (caller holds `_host`)."""
        for work, new in zip(works, fresh, strict=True):
            row = work.row
            keep = 0 if new else attention.pages_for(len(row), self.block_size)
            self._allocator.release(row.pages[keep:])
            del row.pages[keep:]

    def _commit_prefill(
        self,
        txn: Txn,
        inputs: Sequence[PrefillInput],
        plans: list[tuple],
        works: list[_Work],
        firsts: list[int],
    ) -> list[PrefillOutput]:
        outputs, k = [], 0
        with self._host:
            self._stats.prefill_tokens_computed += sum(len(w.tokens) for w in works)
            for input, (cache_id, record, ids, lengths, fresh) in zip(inputs, plans, strict=True):
                mine = works[k : k + len(ids)]
                first = firsts[k : k + len(ids)]
                k += len(ids)
                for work in mine:
                    work.row.tokens.extend(work.tokens.tolist())
                if fresh:
                    if record is not None:
                        self._release_rows(record.rows)
                        record.rows = [w.row for w in mine]
                    else:
                        record = self._new_record(txn, cache_id, [w.row for w in mine])
                self._commit(txn, record)
                self._cache_full_pages(record.rows)
                prompts = [ids[r, : lengths[r]] for r in range(len(ids))]
                handle = (
                    input.kv_cache
                    if input.kv_cache is not None
                    else JaxKvCacheHandle(self, cache_id)
                )
                outputs.append(
                    PrefillOutput(
                        LazyLogits(
                            ids.shape[1],
                            [w.logits for w in mine],
                            [w.hidden for w in mine],
                            first,
                            functools.partial(self._head, self.params_version),
                            functools.partial(self._recompute, self.params_version, prompts),
                        ),
                        handle,
                    )
                )
        return outputs

    def _head(self, version: int, hidden: jax.Array, rows: np.ndarray) -> np.ndarray:
        """LM head on rows `rows` of a step's `hidden: [T, embed]`, the rows padded to a
        power-of-two bucket (one program per (T, bucket)); the step ran under params
        `version`."""
        self._single_host("reading prefill logits other than the last position")
        params = self._weights_of(version)
        index = np.zeros((engine.bucket(len(rows)),), np.int32)
        index[: len(rows)] = rows
        logits = lm_head_step(self._graphdef, params, hidden, jax.device_put(index))
        return np.asarray(logits)[: len(rows)]

    def _recompute(
        self, version: int, prompts: list[np.ndarray], row: int, upto: int
    ) -> np.ndarray:
        """Logits of a prompt's first `upto` positions, which a prefix-cache hit skipped. A
        quantized pool's attention read quantized keys and values: the forward quantizes
        them alike (a float forward differs by up to 0.08)."""
        self._single_host("reading prefill logits other than the last position")
        params = self._weights_of(version)
        impl = self._impl if self._kv_dtype is not None else "xla"
        logits = engine.forward(
            self._graphdef, params, prompts[row][None, :upto], attention_impl=impl
        )
        return np.asarray(logits)[0]

    def _weights_of(self, version: int) -> nnx.State:
        """The params of `version`, which must still be served: prefill logits are never
        finished with other weights than their step's, and keeping old weights alive for
        them could double the memory of an RL loop."""
        with self._host:
            if version != self.params_version:
                raise FerrumError.unsupported(
                    f"these prefill logits were computed under params version {version}; the "
                    f"executor now serves version {self.params_version} (update_params), "
                    "and positions other than each row's last are computed when read: read "
                    "them before swapping the weights"
                )
            return self._params

    async def decode(self, input: DecodeInput) -> DecodeOutput:
        return (await self.batch_decode([input]))[0]

    async def batch_decode(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """One ragged step for every row of every input."""
        inputs = _as_list(inputs, "batch_decode inputs")
        if not inputs:
            return []

        def work(txn: Txn) -> list[DecodeOutput]:
            with self._host:
                checked = [self._decode_rows(x) for x in inputs]
                seen: set[str] = set()
                for record, _ in checked:
                    if record.cache_id in seen:
                        raise FerrumError.invalid_parameter(
                            f"cache handle {record.cache_id!r} appears twice in one batch"
                        )
                    seen.add(record.cache_id)
                self._check_pages(
                    sum(
                        self._pages_needed(row, len(row) + 1)
                        for record, _ in checked
                        for row in record.rows
                    )
                )
                copies: list[tuple[int, int]] = []
                works = []
                for input, (record, ids) in zip(inputs, checked, strict=True):
                    txn.touch(record.cache_id, record)
                    # One policy per input: it picks a token only for a single-row sequence.
                    policy = self._greedy_policy(input) if len(record.rows) == 1 else None
                    for row, token in zip(record.rows, ids, strict=True):
                        self._grow(row, len(row) + 1, copies)
                        works.append(
                            _Work(row, np.asarray([token], np.int32), len(row), greedy=policy)
                        )
            n = len(works)
            try:
                self._device("decode", n, n, lambda: self._run_works(copies, works))
            except BaseException:
                with self._host:
                    self._shrink(works)
                raise
            outputs = []
            with self._host:
                start = 0
                for input, (record, _) in zip(inputs, checked, strict=True):
                    rows = len(record.rows)
                    for work in works[start : start + rows]:
                        work.row.tokens.extend(work.tokens.tolist())
                    self._commit(txn, record)
                    logits = np.stack([w.answer() for w in works[start : start + rows]])
                    outputs.append(DecodeOutput(JaxTensor(jax.device_put(logits)), input.kv_cache))
                    start += rows
            return outputs

        return await self._run(work)

    def _shrink(self, works: list[_Work]) -> None:
        """A failed call's new pages, given back (rows keep what their tokens need)."""
        for work in works:
            keep = attention.pages_for(len(work.row), self.block_size)
            self._allocator.release(work.row.pages[keep:])
            del work.row.pages[keep:]

    async def unified_decode(self, batch: UnifiedBatch) -> list[np.ndarray | None]:
        """One ragged forward for a mixed batch (Ferrum 0.7): per item, in order, the final
        position's logits (a float32 vector of vocab size) for `is_final_chunk` items, None
        for intermediate chunks (their LM head is not run).

        An unknown `seq_id` at `pos_offset` 0 starts a sequence; otherwise `pos_offset`
        must equal the sequence's length. The whole batch is checked first and refused
        whole (nothing changes) when any item is bad or the pages do not suffice.
        """
        if not isinstance(batch, UnifiedBatch):
            raise FerrumError.invalid_parameter(f"expected a UnifiedBatch, got {batch!r}")
        items = _as_list(batch.items, "UnifiedBatch.items")
        if not items:
            return []

        def work(txn: Txn) -> list[np.ndarray | None]:
            with self._host:
                plan = self._plan_unified(items)
                copies: list[tuple[int, int]] = []
                works = []
                borrowed = []
                for item, record, tokens, _ in plan:
                    txn.touch(item.seq_id, record)
                    policy = self._greedy_policy(item) if item.is_final_chunk else None
                    row = (
                        record.rows[0]
                        if record is not None
                        else Row([], [], params_version=self.params_version)
                    )
                    reused = self._borrow_prefix(row, tokens, bool(item.is_final_chunk))
                    borrowed.append(reused)
                    self._grow(row, item.pos_offset + len(tokens), copies)
                    want = "last" if item.is_final_chunk else "none"
                    works.append(
                        _Work(row, tokens[reused:], item.pos_offset + reused, want, greedy=policy)
                    )
                self._presize(plan, works)
            tokens = sum(len(w.tokens) for w in works)
            try:
                self._device("decode", tokens, len(works), lambda: self._run_works(copies, works))
            except BaseException:
                with self._host:
                    self._release_fresh(plan, works)
                    kept = [
                        (w, n)
                        for w, n, (_, r, _, _) in zip(works, borrowed, plan, strict=True)
                        if r
                    ]
                    for w, n in kept:
                        self._unborrow(w.row, n)
                    self._shrink([w for w, _ in kept])
                raise
            with self._host:
                for (item, record, tokens, _), w in zip(plan, works, strict=True):
                    w.row.tokens.extend(w.tokens.tolist())
                    if record is None:
                        record = self._new_record(txn, item.seq_id, [w.row])
                    # A one-token item continuing a sequence is taken for a decode.
                    prefill = len(tokens) > 1 or item.pos_offset == 0
                    if prefill:
                        self._stats.prefill_tokens_computed += len(w.tokens)
                    self._commit(txn, record)
                    if prefill:
                        self._cache_full_pages(record.rows)
            return [w.answer() for w in works]

        return await self._run(work)

    @staticmethod
    def _greedy_policy(input: Any) -> LogitsReturnPolicy | None:
        """An item's `GreedyArgmax` policy, None for `FullLogits`."""
        policy = input.logits_policy
        if not isinstance(policy, LogitsReturnPolicy):
            raise FerrumError.invalid_parameter(
                f"logits_policy must be a LogitsReturnPolicy, got {policy!r}"
            )
        return None if policy.requires_full_logits() else policy

    def _plan_unified(self, items: list[Any]) -> list[tuple]:
        """Per item `(item, record or None, tokens, capacity hint or None)`; every check
        before any change. Pages that do not suffice for the items, or for their metadata's
        `ferrum_kv_admission_target_len` bounds (checked, never allocated), fail the whole
        batch with the text Ferrum's engine parses."""
        plan, seen, new_rows, pages, admission = [], set(), 0, 0, 0
        for item in items:
            if not isinstance(item, UnifiedBatchItem):
                raise FerrumError.invalid_parameter(f"expected a UnifiedBatchItem, got {item!r}")
            if not isinstance(item.seq_id, str) or not item.seq_id:
                raise FerrumError.invalid_parameter(
                    f"seq_id must be a non-empty string, got {item.seq_id!r}"
                )
            if item.seq_id in seen:
                raise FerrumError.invalid_parameter(
                    f"seq_id {item.seq_id!r} appears twice in one unified batch"
                )
            seen.add(item.seq_id)
            if isinstance(item.kv_cache, JaxKvCacheHandle) and item.kv_cache.executor is not self:
                raise FerrumError.invalid_parameter(
                    f"item {item.seq_id!r} carries a handle of another executor"
                )
            tokens = self._token_array(item.q_tokens, f"q_tokens of {item.seq_id!r}")
            if tokens.ndim != 1 or tokens.size == 0:
                raise FerrumError.invalid_parameter(
                    f"q_tokens of {item.seq_id!r} must be a non-empty 1-D sequence, got shape "
                    f"{tokens.shape}"
                )
            offset = item.pos_offset
            if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
                raise FerrumError.invalid_parameter(
                    f"pos_offset of {item.seq_id!r} must be an integer >= 0, got {offset!r}"
                )
            if not isinstance(item.is_final_chunk, bool | np.bool_):
                raise FerrumError.invalid_parameter(
                    f"is_final_chunk of {item.seq_id!r} must be a bool, got {item.is_final_chunk!r}"
                )
            self._greedy_policy(item)  # checked before any change; the step reads it again
            metadata = item.metadata if isinstance(item.metadata, dict) else None
            target = int(offset) + len(tokens)
            bound = reservation.metadata_length(metadata, reservation.ADMISSION_KEY, item.seq_id)
            bound = min(max(bound or 0, target), self.max_sequence_length)
            hint = reservation.metadata_length(metadata, reservation.CAPACITY_HINT_KEY, item.seq_id)
            record = self._live.get(item.seq_id)
            if record is None:
                if offset != 0:
                    raise FerrumError.not_found(
                        f"sequence {item.seq_id!r} is unknown (or was released) and pos_offset "
                        f"is {offset}: a new sequence starts at 0"
                    )
                new_rows += 1
                pages += attention.pages_for(len(tokens), self.block_size)
                admission += attention.pages_for(bound, self.block_size)
            else:
                if len(record.rows) != 1:
                    raise FerrumError.invalid_parameter(
                        f"sequence {item.seq_id!r} holds {len(record.rows)} rows; unified "
                        "items are single-row"
                    )
                if offset != len(record.rows[0]):
                    raise FerrumError.invalid_parameter(
                        f"pos_offset {offset} of {item.seq_id!r} differs from its length "
                        f"{len(record.rows[0])}"
                    )
                pages += self._pages_needed(record.rows[0], target)
                admission += self._pages_needed(record.rows[0], bound)
            self._check_length(item.seq_id, target)
            plan.append((item, record, tokens, hint if offset == 0 else None))
        self._check_rows_available(new_rows)
        if admission > (free := self._allocatable()):
            raise kv_admission_exhausted(admission, pages, free)
        return plan

    def _presize(self, plan: list[tuple], works: list[_Work]) -> None:
        """New sequences take the pages of their `ferrum_kv_capacity_hint` up front, as the
        reference does, where the pool has them beyond this batch's needs (else they grow
        step by step): their decodes then never wait on the pool."""
        for (_, _, _, hint), work in zip(plan, works, strict=True):
            if hint is None:
                continue
            length = min(hint, self.max_sequence_length)
            extra = attention.pages_for(length, self.block_size) - len(work.row.pages)
            if extra > 0 and self._allocator.can_allocate(extra):
                work.row.pages.extend(self._allocator.allocate(extra))

    def _release_fresh(self, plan: list[tuple], works: list[_Work]) -> None:
        for (_, record, _, _), work in zip(plan, works, strict=True):
            if record is None:
                self._allocator.release(work.row.pages)
                work.row.pages = []

    async def speculative_decode(
        self, input: DecodeInput, draft_tokens: Sequence[int], acceptance_threshold: float
    ) -> SpeculativeDecodeOutput:
        """Scores `input_ids` then all drafts in one forward and keeps the accepted prefix.

        Draft `i` is accepted while it is the target's argmax at its position, or its target
        probability is >= `acceptance_threshold`; the first rejection stops acceptance. A
        threshold >= 1 accepts only argmax tokens: exactly greedy decoding. The cache then
        holds the input token and the accepted drafts; `next_logits` `[1, vocab]` follow the
        last accepted token.
        """

        def work(txn: Txn) -> SpeculativeDecodeOutput:
            with self._host:
                record, ids = self._decode_rows(input)
                if len(record.rows) != 1:
                    raise FerrumError.invalid_parameter(
                        f"speculative_decode needs a single-row handle, got {len(record.rows)} rows"
                    )
                drafts = self._drafts(draft_tokens)
                threshold = self._threshold(acceptance_threshold)
                row = record.rows[0]
                k = len(drafts)
                self._check_length(record.cache_id, len(row) + 1 + k)
                self._check_pages(self._pages_needed(row, len(row) + 1 + k))
                tokens = np.concatenate([ids, drafts]).astype(np.int32)
                copies: list[tuple[int, int]] = []
                self._grow(row, len(row) + 1 + k, copies)
                verify = _Work(row, tokens, len(row), "all")
                txn.touch(record.cache_id, record)
            try:
                self._device("decode", k + 1, 1, lambda: self._run_works(copies, [verify]))
            except BaseException:
                with self._host:
                    self._shrink([verify])
                raise
            logits = verify.logits
            scores = logits[:k].astype(np.float64)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            accepted = 0
            for i in range(k):
                d = int(drafts[i])
                if d == probs[i].argmax() or probs[i, d] >= threshold:
                    accepted += 1
                else:
                    break
            with self._host:
                row.tokens.extend(tokens[: 1 + accepted].tolist())
                self._shrink([verify])
                self._commit(txn, record)
            return SpeculativeDecodeOutput(
                accepted_tokens=[int(t) for t in drafts[:accepted]],
                next_logits=JaxTensor(jax.device_put(logits[accepted][None])),
                kv_cache=input.kv_cache,
                acceptance_count=accepted,
            )

        return await self._run(work)

    async def forward_verify(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """One forward over N+1 positions (Ferrum 0.7.1): the inputs share one handle and
        continue it in order; one `DecodeOutput` (`[1, vocab]` logits) per position. All N+1
        tokens are appended; `truncate_kv` then keeps the accepted prefix."""
        inputs = _as_list(inputs, "forward_verify inputs")
        if not inputs:
            return []

        def work(txn: Txn) -> list[DecodeOutput]:
            with self._host:
                record, first = self._decode_rows(inputs[0])
                if len(record.rows) != 1:
                    raise FerrumError.invalid_parameter(
                        f"forward_verify needs a single-row handle, got {len(record.rows)} rows"
                    )
                ids = [first]
                for i, input in enumerate(inputs[1:], 1):
                    if not isinstance(input, DecodeInput):
                        raise FerrumError.invalid_parameter(
                            f"expected a DecodeInput, got {input!r}"
                        )
                    if self._key(input.kv_cache) != record.cache_id:
                        raise FerrumError.invalid_parameter(
                            f"forward_verify input {i} names another sequence than input 0"
                        )
                    token = self._token_array(input.input_ids, f"input_ids of input {i}")
                    if token.size != 1:
                        raise FerrumError.invalid_parameter(
                            f"input {i} of forward_verify holds {token.size} tokens, expected 1"
                        )
                    ids.append(token.reshape(1))
                tokens = np.concatenate(ids).astype(np.int32)
                row = record.rows[0]
                self._check_length(record.cache_id, len(row) + len(tokens))
                self._check_pages(self._pages_needed(row, len(row) + len(tokens)))
                copies: list[tuple[int, int]] = []
                self._grow(row, len(row) + len(tokens), copies)
                verify = _Work(row, tokens, len(row), "all")
                txn.touch(record.cache_id, record)
            n = len(tokens)
            try:
                self._device("decode", n, 1, lambda: self._run_works(copies, [verify]))
            except BaseException:
                with self._host:
                    self._shrink([verify])
                raise
            logits = verify.logits
            with self._host:
                row.tokens.extend(tokens.tolist())
                self._commit(txn, record)
            return [
                DecodeOutput(JaxTensor(jax.device_put(logits[i][None])), x.kv_cache)
                for i, x in enumerate(inputs)
            ]

        return await self._run(work)

    async def truncate_kv(self, kv_cache: KvCacheHandle, new_len: int) -> None:
        """Rolls the sequence back to `new_len` tokens (every row), freeing whole pages past
        it. A page it keeps that another owner holds is copied before it is written again."""

        def work(txn: Txn) -> None:
            with self._host:
                cache_id = self._key(kv_cache)
                record = self._live.get(cache_id)
                if record is None:
                    raise self._missing(cache_id)
                if isinstance(new_len, bool) or not isinstance(new_len, numbers.Integral):
                    raise FerrumError.invalid_parameter(
                        f"new_len must be an integer, got {new_len!r}"
                    )
                if not 0 <= new_len <= min(record.lengths):
                    raise FerrumError.invalid_parameter(
                        f"cannot truncate {cache_id!r} to {new_len} tokens: it holds "
                        f"{record.lengths}"
                    )
                txn.touch(cache_id, record)
                keep = attention.pages_for(int(new_len), self.block_size)
                for row in record.rows:
                    del row.tokens[new_len:]
                    self._allocator.release(row.pages[keep:])
                    del row.pages[keep:]
                    row.shared = min(row.shared, int(new_len) // self.block_size)
                self._commit(txn, record)

        await self._run(work)

    async def forward(self, input: TensorLike) -> TensorLike:
        """Full-sequence logits `[batch, seq, vocab]`; the page pool is untouched."""

        def work(txn: Txn) -> TensorLike:
            self._single_host("forward")
            ids = self._token_array(input, "input")
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or 0 in ids.shape:
                raise FerrumError.invalid_parameter(f"input must be [batch, seq], got {ids.shape}")
            b, s = ids.shape
            if s > self.max_sequence_length:
                raise FerrumError.request_validation(
                    f"input of {s} tokens exceeds max_sequence_length {self.max_sequence_length}"
                )
            g, p = self._graphdef, self._params
            logits = self._device("prefill", ids.size, b, lambda: engine.forward(g, p, ids))
            return JaxTensor(logits)

        return await self._run(work)

    def update_params(self, params: nnx.State, *, keep_cache: bool = False) -> int:
        """Replaces the weights between steps, without recompiling; returns the new params
        version (also in `info().metadata` and `cache_metrics_snapshot()`).

        `params` must match the current ones in tree structure, shapes, dtypes and
        shardings, and be finite. The executor keeps its own copy, so a trainer may go on
        updating its state in place (`nnx.update`) without reaching the served weights.
        `keep_cache=False` releases every live sequence (their next use fails with a clear
        error); `True` keeps their KV, computed by the old weights: stale-KV semantics, for
        RL loops that accept it. Either way the prefix cache is emptied, and no page
        computed under older weights is reused by another sequence.

        Waits for the calls queued before it (a step never mixes two weights). Called from
        a coroutine (an event loop running in this thread) that wait would stall the loop,
        so it is refused there: `await update_params_async(...)` instead.
        """
        keep = self._swap_options(keep_cache)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no event loop in this thread: waiting stalls nobody
        else:
            raise FerrumError.invalid_parameter(
                "update_params blocks until the queued calls have run, which would stall "
                "the event loop running in this thread: use `await "
                "executor.update_params_async(params)` from a coroutine"
            )
        return self._submit_swap(self._own_params(params), keep).result()

    async def update_params_async(self, params: nnx.State, *, keep_cache: bool = False) -> int:
        """`update_params` for coroutines: the loop runs on while the queued calls finish
        and the weights are checked and swapped. Cancelled before the swap starts, the
        weights stay; once it started, it completes."""
        keep = self._swap_options(keep_cache)
        return await asyncio.wrap_future(self._submit_swap(self._own_params(params), keep))

    def _swap_options(self, keep_cache: Any) -> bool:
        if self._state is ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down; create a new one")
        if not isinstance(keep_cache, bool | np.bool_):
            raise FerrumError.invalid_parameter(
                f"update_params: keep_cache must be True or False, got {keep_cache!r}"
            )
        return bool(keep_cache)

    def _own_params(self, params: nnx.State) -> nnx.State:
        """A copy of `params` (same shardings) once they match the current weights."""
        old_leaves, old_tree = jax.tree.flatten(self._params)
        new_leaves, new_tree = jax.tree.flatten(params)
        if new_tree != old_tree:
            raise FerrumError.invalid_parameter(
                "update_params: the new params have another tree structure than the model's"
            )
        for path, (a, b) in zip(
            (jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)),
            zip(old_leaves, new_leaves, strict=True),
            strict=True,
        ):
            if not isinstance(b, jax.Array) or a.shape != b.shape or a.dtype != b.dtype:
                raise FerrumError.invalid_parameter(
                    f"update_params: {path} is {getattr(b, 'dtype', type(b).__name__)}"
                    f"{list(getattr(b, 'shape', []))}, expected {a.dtype}{list(a.shape)} "
                    "(a jax.Array)"
                )
            if not a.sharding.is_equivalent_to(b.sharding, a.ndim):
                raise FerrumError.invalid_parameter(
                    f"update_params: {path} is sharded {b.sharding}, expected {a.sharding}"
                )
        # The caller's tree may hold the trainer's live variables: copy containers and arrays.
        return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)

    def _submit_swap(self, params: nnx.State, keep_cache: bool) -> concurrent.futures.Future:
        """Queues the swap on the worker, after the calls already queued."""
        try:
            return self._worker.submit(self._swap, params, keep_cache)
        except RuntimeError as e:  # the worker stopped under a concurrent shutdown()
            raise FerrumError.backend("executor is shut down; create a new one") from e

    def _swap(self, params: nnx.State, keep_cache: bool) -> int:
        """Worker: checks the owned copy is finite, then serves it from the next step on."""
        bad = nonfinite_leaf(params)
        if bad is not None:
            raise FerrumError.invalid_parameter(
                f"update_params: {bad} holds NaN or infinity; the weights were not changed"
            )
        with self._host:
            if self._state is ExecutorState.SHUTDOWN:
                raise FerrumError.backend("executor is shut down; create a new one")
            self._params = params
            self.model = self.model.with_params(params)
            self.params_version += 1
            if self._link is not None:
                self._link.send(mh.Op.PARAMS, aux=self.params_version)
            if not keep_cache:
                for record in list(self._live.values()):
                    self._release_rows(record.rows)
                    self._released_by_update.add(record.cache_id)
                self._live.clear()
            if self._prefix is not None:
                # Pages of the old weights: a hit would serve their KV to a new sequence.
                self._prefix.clear()
            return self.params_version

    def optimal_batch_size(self) -> int:
        return self.max_batch_size

    def supports_batch_size(self, batch_size: int) -> bool:
        return 1 <= batch_size <= self.max_batch_size

    def capabilities(self) -> ExecutorCapabilities:
        c = self.model.config
        if c.num_kv_heads == 1 and c.num_heads > 1:
            kinds = [AttentionType.MULTI_QUERY]
        elif c.num_kv_heads < c.num_heads:
            kinds = [AttentionType.GROUPED_QUERY]
        else:
            kinds = [AttentionType.MULTI_HEAD]
        if c.sliding_window is not None:
            kinds.append(AttentionType.SLIDING_WINDOW)
        kinds.append(AttentionType.PAGED)
        devices = [Device.CPU] + [
            JaxTensor(jnp.zeros((), device=d)).device
            for d in jax.local_devices()
            if d.platform != "cpu"
        ]
        return ExecutorCapabilities(
            max_batch_size=self.max_batch_size,
            max_sequence_length=self.max_sequence_length,
            attention_mechanisms=kinds,
            supports_dynamic_batching=True,
            supports_continuous_batching=True,
            supports_speculative_decoding=True,
            supports_tensor_parallelism=True,
            supports_pipeline_parallelism=False,
            supported_dtypes=[DataType.FP32, DataType.BF16],
            supported_devices=devices,
            memory_requirements=MemoryRequirements(
                parameter_memory=self.model.param_bytes,
                activation_memory_per_token=4
                * (2 * c.hidden_size + c.intermediate_size * 2 + c.vocab_size),
                kv_cache_memory_per_token=self.kv_bytes_per_token // c.num_layers,
                overhead_memory=4 * self._num_pages,  # the page tables, as int32
            ),
        )

    def _used_bytes(self) -> int:
        """KV bytes of pages in use (caller holds `_host`)."""
        return self._allocator.num_used * self.block_size * self.kv_bytes_per_token

    def status(self) -> ExecutorStatus:
        stats = self._stats
        shut = self._state is ExecutorState.SHUTDOWN
        allocated = 0 if shut else self._pool_bytes
        with self._host:
            used = self._used_bytes()
            rows = sum(len(r.rows) for r in self._live.values())
        return ExecutorStatus(
            state=self._state,
            is_ready=self._state is ExecutorState.READY,
            current_batch_size=rows,
            prefill_operations=stats.prefill_ops,
            decode_operations=stats.decode_ops,
            avg_prefill_time_ms=stats.prefill_total_ms / max(stats.prefill_ops, 1),
            avg_decode_time_ms=stats.decode_total_ms / max(stats.decode_ops, 1),
            memory_usage=ExecutorMemoryUsage(
                allocated_bytes=allocated,
                used_bytes=used,
                peak_bytes=stats.peak_bytes,
                utilization_percent=100.0 * used / allocated if allocated else 0.0,
            ),
            last_operation=self._last_operation,
        )

    def metrics(self) -> ExecutorMetrics:
        """Performance counters for `ExecutorRegistry.get_metrics`."""
        stats = self._stats
        busy_s = (stats.prefill_total_ms + stats.decode_total_ms) / 1e3
        with self._host:
            used = self._used_bytes()
        return ExecutorMetrics(
            total_operations=stats.prefill_ops + stats.decode_ops,
            prefill_operations=stats.prefill_ops,
            decode_operations=stats.decode_ops,
            avg_prefill_latency=stats.prefill_total_ms / max(stats.prefill_ops, 1),
            avg_decode_latency=stats.decode_total_ms / max(stats.decode_ops, 1),
            p95_prefill_latency=p95(stats.prefill_ms),
            p95_decode_latency=p95(stats.decode_ms),
            throughput_tps=stats.tokens / busy_s if busy_s else 0.0,
            memory_efficiency=used / self._pool_bytes,
            batch_utilization=(
                stats.decode_rows / (stats.decode_ops * self.max_batch_size)
                if stats.decode_ops
                else 0.0
            ),
        )

    def cache_metrics_snapshot(self) -> dict[str, Any] | None:
        """Page pool and prefix cache counters (JSON values)."""
        with self._host:
            snapshot: dict[str, Any] = {
                "pages_total": self._num_pages,
                "pages_free": self._allocator.num_free,
                "pages_used": self._allocator.num_used,
                "page_size": self.block_size,
                "prefix_caching": self._prefix is not None,
                "prefill_tokens_computed": self._stats.prefill_tokens_computed,
                "prefill_tokens_reused": self._stats.prefill_tokens_reused,
                "steps": self._stats.steps,
                "logits_bytes_to_host": self._stats.logits_bytes_to_host,
                "params_version": self.params_version,
            }
            if self._prefix is not None:
                snapshot.update(self._prefix.metrics())
        return snapshot

    def lora_metrics_snapshot(self) -> dict[str, Any] | None:
        return None

    async def warmup(self) -> dict[str, list]:
        """Compiles every program serving runs: the ragged step for each (token bucket, item
        bucket) pair up to the token budget and `max_batch_size`, the all-rows verify steps
        of `speculative_decode` / `forward_verify` up to 16 positions, and the page copies.
        Serving afterwards compiles nothing (reading prefill logits other than the last
        position compiles the LM head for that many rows, once).

        Each step runs on padding items only (no tokens, no writes), so live sequences are
        untouched. Returns what was compiled: `"ragged"` `(tokens, items)` pairs, `"verify"`
        token buckets, `"copy"` page-copy buckets, and `"skipped"` pairs that do not fit the
        device (never served: their requests run at a smaller token budget). Progress: a bar
        over the programs on a terminal, and stage lines on the `ferrum_jax` logger (see
        `ferrum_jax.progress`).
        """

        def work(txn: Txn) -> dict[str, list]:
            compiled: dict[str, list] = {"ragged": [], "verify": [], "copy": [], "skipped": []}
            items = engine.buckets(engine.bucket(self.max_batch_size))
            tokens = engine.buckets(self._token_budget, minimum=engine.MIN_TOKEN_BUCKET)
            pairs = [(t, i) for t in tokens for i in items if i <= t]
            verify = engine.buckets(
                engine.bucket(_VERIFY_TOKENS, minimum=engine.MIN_TOKEN_BUCKET),
                minimum=engine.MIN_TOKEN_BUCKET,
            )
            copies = engine.buckets(engine.bucket(self.max_batch_size))
            start = time.perf_counter()
            total = len(pairs) + len(verify) + len(copies)
            progress.logger.info("warmup: compiling %d programs", total)
            with progress.bar(total, "warmup", "program") as bar:
                for t, i in pairs:
                    if not self._fits(t, i):
                        compiled["skipped"].append((t, i))
                    else:
                        self._device(None, 0, 0, lambda t=t, i=i: self._padding_step(t, i, i))
                        compiled["ragged"].append((t, i))
                    bar.update()
                for t in verify:
                    if self._fits(t, 1, t):
                        self._device(None, 0, 0, lambda t=t: self._padding_step(t, 1, t))
                        compiled["verify"].append(t)
                    bar.update()
                pad = self._num_pages  # copies from and to the padding page: dropped
                for n in copies:
                    self._device(None, 0, 0, lambda n=n: self._copy([(pad, pad)] * n))
                    compiled["copy"].append(n)
                    bar.update()
            progress.logger.info(
                "warmup: %d programs in %.1f s", total, time.perf_counter() - start
            )
            return compiled

        return await self._run(work)

    def _padding_step(self, tokens: int, items: int, rows: int) -> Any:
        """A step on padding only: it compiles the program, writes nothing."""
        zeros = lambda *shape: np.zeros(shape, np.int32)
        table = np.full((items, self._pages_per_seq), self._num_pages, np.int32)
        return self._step((zeros(tokens), zeros(items + 1), zeros(items), table, zeros(rows)))

    async def shutdown(self) -> None:
        """Frees the pool and params; every later call fails with a clear error. Waits for
        the call in progress, if any."""
        if self._state is ExecutorState.SHUTDOWN:
            return

        def work(txn: Txn) -> None:
            if isinstance(self._link, mh.Leader):
                try:
                    self._link.close()
                except FerrumError as e:  # a follower already gone: nothing left to stop
                    progress.logger.warning("shutdown: %s", e)
            with self._host:
                if self._state is ExecutorState.SHUTDOWN:
                    return
                for x in jax.tree.leaves(self._pages):
                    if not x.is_deleted():
                        x.delete()
                self._live.clear()
                self._state = ExecutorState.SHUTDOWN
                self._host.notify_all()

        await self._run(work, opening=False)
        self._worker.shutdown(wait=False)

    def release_cache(self, cache_id: str) -> None:
        """Frees the sequence's pages (full ones stay in the prefix cache, if enabled);
        idempotent, unknown ids change nothing. Never waits for device work. The release
        wins over calls issued before it and still queued or running: what they create or
        extend of this sequence is released as they finish."""
        if not isinstance(cache_id, str):
            return
        with self._host:
            record = self._live.pop(cache_id, None)
            if record is not None and self._state is not ExecutorState.SHUTDOWN:
                self._release_rows(record.rows)
            if self._pending:  # a call already queued may create or extend it
                self._released_at.pop(cache_id, None)
                self._released_at[cache_id] = next(self._clock)

    def _pages_view(self, handle: JaxKvCacheHandle, layer: int, *, keys: bool) -> TensorLike:
        self._single_host("key_cache / value_cache")
        with self._host:
            self._host.wait_for(
                lambda: self._pages is not None or self._state is ExecutorState.SHUTDOWN
            )
            record = self._record_of(handle)
            layers = self.model.runtime_config.num_layers
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise FerrumError.invalid_parameter(f"layer must be an integer, got {layer!r}")
            if not 0 <= layer < layers:
                raise FerrumError.invalid_parameter(f"layer {layer} out of range [0, {layers})")
            n = max(record.lengths)
            width = attention.pages_for(max(n, 1), self.block_size)
            table = np.full((len(record.rows), width), self._num_pages, np.int32)
            for r, row in enumerate(record.rows):
                used = attention.pages_for(len(row), self.block_size)
                table[r, :used] = row.pages[:used]
            try:
                kv = self._layout.read(self._pages[layer], jax.device_put(table))
            except RuntimeError as e:  # the pool was lost in a device failure, not rebuilt yet
                raise FerrumError.backend(f"the KV pool is being rebuilt: {e}") from e
            return JaxTensor(kv[0 if keys else 1][:, :n].transpose(0, 2, 1, 3))


def _shape(batch: engine.RaggedBatch) -> tuple[int, int, int]:
    """`(tokens, items, logit rows)` of a packed batch: the key of its program."""
    return len(batch.tokens), len(batch.kv_lens), len(batch.logits_at)


def _unpack(out: tuple[jax.Array, jax.Array, Any]) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """`ragged_forward`'s `(logits, hidden, pages)` as `_donate` wants it: `((logits, hidden),
    pages)`."""
    logits, hidden, pages = out
    return (logits, hidden), pages


def _as_list(inputs: Any, what: str) -> list[Any]:
    if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
        raise FerrumError.invalid_parameter(f"{what} must be a sequence, got {inputs!r}")
    return list(inputs)
