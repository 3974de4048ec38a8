"""`JaxModelExecutor`: Ferrum's `ModelExecutor` over the pure engine, with a slot pool.

The executor owns the params and one KV cache of `max_batch_size` slots x
`max_sequence_length` tokens. A `KvCacheHandle` names one or more slots (one per batch row
of the prefill that made it). `decode`, `batch_decode` and `batch_prefill` run one jitted
forward for all rows, padded to a power-of-two row bucket, so their cost follows the number
of active rows, not the pool size.

What keeps a hostile call from hurting anyone else: six small mechanisms, each in one place,
written to be carried over unchanged to a paged executor.

1. **Validate, then plan, then touch the device.** Every input is checked on the host, and
   so is the device memory its programs need (`_need`: XLA's own memory analysis of the
   compiled step, against `_step_budget`). A prefill whose one-step program would not fit is
   split into chunks (`_plan_prefill`); one that fits in no chunking is refused. Nothing
   changes before all checks pass.
2. **Commit last, with an undo log** (`_Txn`): host records change only after the device
   work succeeded, and each change registers its inverse.
3. **One device wrapper** (`_device`): a failed device step fails alone. The rows the call
   touched are brought back to their host records (`_resync`); when the failure consumed the
   donated pool, the pool is rebuilt by replaying every live row's tokens, which the host
   keeps for exactly this (`_Sequence.tokens`, `_rebuild`). The state goes to ERROR only if
   that fails too, and the next call retries the rebuild.
4. **Cancellation** (`_run`, `_Call`): a call cancelled before it starts never runs; one
   cancelled while it runs, or after it finished but before its result reached the caller, is
   rolled back with its undo log, so it can neither strand a slot nor apply a decode twice.
5. **Locks** (`_host`): device work runs on one worker thread per executor, in call order,
   and holds no lock while compiling or executing. `_host` guards host bookkeeping and the
   hand-off of the donated pool (`_donate`) and is held only for host updates, so
   `release_cache`, `status`, `metrics` and handle queries never wait for device work on the
   event loop; `key_cache`/`value_cache` read the pool, so they wait for the step handing it
   over (`_donate`: dispatch, and on CPU often the execution too), never for queued calls.
6. **Scrubbed slots** (`_scrub`): a slot is zeroed before a new prompt is written into it.
   Attention multiplies masked probabilities (exact zeros) by whatever a row holds past its
   length, and 0 x NaN left there by an earlier sequence would poison the new one.

Deliberate differences from Rust:
- prefill logits at a row's padding positions repeat the row's last real logits, so
  `PrefillOutput.last_token_logits()` is every row's next-token distribution;
- `key_cache(layer)` / `value_cache(layer)` return `[rows, kv_heads, num_tokens, head_dim]`
  (a fresh array holding the slot's real contents: JAX arrays are immutable, not aliasable);
- the block table describes the slot as `block_size`-token blocks of one contiguous region;
- `batch_prefill([])` and `batch_decode([])` return `[]`, like the trait's default loop.
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
import os
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
from ferrum_jax.cache import KVCache, init_cache, zero_rows
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.interfaces import (
    AttentionType,
    BatchModelExecutor,
    BlockTable,
    CacheHandleStats,
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
    MemoryRequirements,
    ModelInfo,
    ModelType,
    PrefillInput,
    PrefillOutput,
    SpeculativeDecodeOutput,
    SpeculativeExecutor,
    TensorLike,
)
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.tensor import JaxTensor, as_numpy, datatype_of

_MODEL_TYPES = {
    "llama": ModelType.Llama,
    "mistral": ModelType.Mistral,
    "qwen2": ModelType.Qwen,
    "qwen3": ModelType.Qwen,
}
_LATENCY_WINDOW = 1000
_FREE_FRACTION = 0.9
"""Share of the memory a device reports free that the executor plans to use (the rest is
headroom for allocator fragmentation and other processes)."""

T = TypeVar("T")


@dataclasses.dataclass
class _Sequence:
    """Host-side record of a live handle: its slots and every token each row holds.

    The tokens are the ledger the pool is rebuilt from after a device failure (`_rebuild`).
    """

    cache_id: str
    slots: list[int]
    tokens: list[list[int]]
    last_access: float
    version: int = 0
    """Bumped by every committed change; an undo applies only to the version it made."""

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.tokens]


class _Txn:
    """The undo log of one call (mechanism 2): the pool rows it writes and, once it has
    committed, the inverses of its host changes."""

    def __init__(self) -> None:
        self.rows: dict[int, bool] = {}
        """Slot -> whether the call overwrites the slot's earlier tokens (else it appends)."""
        self.undo: list[tuple[list[int], Callable[[], bool]]] = []
        """(slots, inverse); an inverse returns False when a later call changed the record."""

    def writes(self, slots: Sequence[int], *, overwrite: bool) -> None:
        for slot in slots:
            self.rows[slot] = self.rows.get(slot, False) or overwrite


class _Call:
    """One async call's life, shared by the event loop and the worker (mechanism 4).

    Its lock guards three state flips and nothing else; it is never held while device work
    runs, so the event loop may take it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "queued"
        self.txn: _Txn | None = None

    def begin(self) -> bool:
        """Worker: False when the caller gave up before the call started (it must not run)."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "running"
            return True

    def finish(self, txn: _Txn) -> bool:
        """Worker: False when the caller gave up while the call ran (it must be rolled back)."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state, self.txn = "finished", txn
            return True

    def abandon(self) -> bool:
        """Event loop, on cancellation: True when the call had finished, so its result will
        never reach the caller and its effects must be rolled back."""
        with self._lock:
            finished = self._state == "finished"
            self._state = "abandoned"
            return finished


_zero_rows = jax.jit(zero_rows, donate_argnames="cache")


def _prefill_all_logits(graphdef, params, cache, tokens, lengths, slots):
    """`prefill_step` with all logits, `all_logits` passed positionally like every other call
    here: jit keys its dispatch cache on how static arguments are passed."""
    return engine.prefill_step(graphdef, params, cache, tokens, lengths, slots, True)


def _host_available_bytes() -> int | None:
    """Memory the host can still give this process: MemAvailable, capped by a cgroup v2 limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            left = int(limit) - used
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def _free_device_bytes(devices: Sequence[jax.Device]) -> int | None:
    """Bytes free on the least free of `devices`; CPU devices share the host's memory.

    None when no device reports its memory (then no size is refused on memory grounds).
    """
    free = []
    for device in devices:
        if device.platform == "cpu":
            continue
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    cpus = sum(d.platform == "cpu" for d in devices)
    host = _host_available_bytes() if cpus else None
    if host is not None:
        free.append(host // cpus)
    return min(free) if free else None


def _count(name: str, value: Any, *, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, or a config error naming `name` (bools, floats and
    strings are refused, not converted)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise FerrumError.config(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise FerrumError.config(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class JaxKvCacheHandle(KvCacheHandle):
    """Names slots of a `JaxModelExecutor` pool; reads live state from the executor."""

    def __init__(self, executor: JaxModelExecutor, cache_id: str) -> None:
        self._executor = executor
        self._cache_id = cache_id

    @property
    def executor(self) -> JaxModelExecutor:
        return self._executor

    def _record(self) -> _Sequence:
        return self._executor._lookup(self)

    def cache_id(self) -> str:
        return self._cache_id

    def is_valid(self) -> bool:
        return self._executor._is_live(self._cache_id)

    def num_rows(self) -> int:
        """Batch rows (slots) this handle holds."""
        return len(self._record().slots)

    def row_lengths(self) -> list[int]:
        """Tokens stored per row."""
        return list(self._record().lengths)

    def num_tokens(self) -> int:
        """Tokens stored in the longest row (all rows, for a single-row handle)."""
        return max(self._record().lengths)

    def block_table(self) -> BlockTable:
        record = self._record()
        block = self._executor.block_size
        per_slot = -(-self._executor.max_sequence_length // block)
        table = BlockTable.new(block)
        used = BlockTable.blocks_needed_for_length(max(record.lengths), block)
        table.add_blocks([record.slots[0] * per_slot + i for i in range(used)])
        table.sequence_length = max(record.lengths)
        return table

    def device(self) -> Device:
        return self._executor.info().device

    def num_layers(self) -> int:
        return self._executor.model.runtime_config.num_layers

    def num_heads(self) -> int:
        return self._executor.model.runtime_config.num_kv_heads

    def head_dim(self) -> int:
        return self._executor.model.runtime_config.head_dim

    def key_cache(self, layer: int) -> TensorLike | None:
        return self._executor._slot_view(self, layer, keys=True)

    def value_cache(self, layer: int) -> TensorLike | None:
        return self._executor._slot_view(self, layer, keys=False)

    def clone_handle(self) -> KvCacheHandle:
        return JaxKvCacheHandle(self._executor, self._cache_id)

    def stats(self) -> CacheHandleStats:
        record = self._record()
        executor = self._executor
        tokens = sum(record.lengths)
        return CacheHandleStats(
            memory_bytes=tokens * executor.kv_bytes_per_token,
            blocks_allocated=self.block_table().num_blocks() * len(record.slots),
            tokens_stored=tokens,
            utilization=tokens / (len(record.slots) * executor.max_sequence_length),
            last_access=record.last_access,
        )

    def __repr__(self) -> str:
        return f"JaxKvCacheHandle({self._cache_id!r})"


class _Stats:
    """Operation counters and latency windows (milliseconds)."""

    def __init__(self) -> None:
        self.prefill_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.prefill_ops = 0
        self.decode_ops = 0
        self.prefill_total_ms = 0.0
        self.decode_total_ms = 0.0
        self.tokens = 0
        self.decode_rows = 0
        self.peak_bytes = 0

    def record(self, kind: str, ms: float, tokens: int, rows: int) -> None:
        window = self.prefill_ms if kind == "prefill" else self.decode_ms
        window.append(ms)
        del window[:-_LATENCY_WINDOW]
        if kind == "prefill":
            self.prefill_ops += 1
            self.prefill_total_ms += ms
        else:
            self.decode_ops += 1
            self.decode_total_ms += ms
            self.decode_rows += rows
        self.tokens += tokens


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else 0.0


class JaxModelExecutor(BatchModelExecutor, SpeculativeExecutor):
    """Ferrum executor over the jitted engine: continuous batching in a fixed slot pool."""

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
    ) -> None:
        """Serves `model` (a `Model`; or the older `config, graphdef, params` triple, with
        `model_config` the checkpoint's own config and `tokenizer`).

        With `mesh`, heads are adapted to it and params sharded (exact logits); a model
        already adapted to a mesh is used as is. `memory_limit_bytes` is the device memory
        (per device) the KV pool and each step's temporaries may use; by default 90% of what
        the device reports free (on CPU, the host's available memory). The pool is checked
        against it before it is allocated, every step before it runs.
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
        if memory_limit_bytes is not None:
            memory_limit_bytes = _count("memory_limit_bytes", memory_limit_bytes)
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
        runtime = model.runtime_config
        self.kv_bytes_per_token = runtime.kv_bytes_per_token(model.dtype.itemsize)
        self._pool_bytes = max_batch_size * max_sequence_length * self.kv_bytes_per_token
        self._devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
        self._step_budget = self._check_pool_fits(memory_limit_bytes)
        self._cache: KVCache | None = self._new_pool()
        if memory_limit_bytes is None:
            free = _free_device_bytes(self._devices)
            self._step_budget = None if free is None else int(_FREE_FRACTION * free)
        self._needs: dict[tuple, int] = {}
        self._free = list(range(max_batch_size))
        self._dirty: set[int] = set()
        self._live: dict[str, _Sequence] = {}
        self._stats = _Stats()
        self._last_operation: float | None = None
        self._failure = ""
        shown = model.config
        self._info = ModelInfo(
            model_id=model_id or model.source,
            model_type=_MODEL_TYPES[shown.model_type],
            num_parameters=shown.num_params,
            hidden_size=shown.hidden_size,
            num_layers=shown.num_layers,
            num_heads=shown.num_heads,
            num_kv_heads=shown.num_kv_heads,
            vocab_size=shown.vocab_size,
            max_sequence_length=max_sequence_length,
            dtype=datatype_of(model.param_dtype),
            device=JaxTensor(jnp.zeros((), device=jax.devices()[0])).device,
            metadata={"architecture": shown.architecture, "executor": "ferrum-jax"},
        )
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
        memory_limit_bytes: int | None = None,
    ) -> JaxModelExecutor:
        """Loads an HF directory, a `.gguf` file or an orbax directory (None: SmolLM2)."""
        from ferrum_jax.checkpoint import load_model

        model_dtype(dtype)
        max_batch_size = _count("max_batch_size", max_batch_size)
        max_sequence_length = _count("max_sequence_length", max_sequence_length)
        loaded = load_model(model, dtype=dtype, mesh=mesh)
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
            memory_limit_bytes=memory_limit_bytes,
        )

    def _check_pool_fits(self, limit: int | None) -> int | None:
        """Refuses a pool the device cannot hold, before allocating it; returns the step
        budget implied by an explicit `limit` (None: measured after the allocation)."""
        share = self._pool_bytes // len(self._devices)  # an even split over a mesh
        if limit is None:
            free = _free_device_bytes(self._devices)
            budget = None if free is None else int(_FREE_FRACTION * free)
        else:
            budget = limit
        if budget is not None and share > budget:
            raise FerrumError.resource_exhausted(
                f"a KV pool of max_batch_size {self.max_batch_size} x max_sequence_length "
                f"{self.max_sequence_length} needs {_mib(share)} per device "
                f"({self.kv_bytes_per_token} bytes per token), only {_mib(budget)} available; "
                "lower max_batch_size or max_sequence_length"
            )
        return None if limit is None else limit - share

    def _new_pool(self) -> KVCache:
        runtime = self.model.runtime_config
        cache = init_cache(runtime, self.max_batch_size, self.max_sequence_length, self.model.dtype)
        return cache if self.mesh is None else sharding.shard_cache(cache, self.mesh)

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

    def _lookup(self, handle: Any) -> _Sequence:
        if not isinstance(handle, JaxKvCacheHandle):
            raise FerrumError.invalid_parameter(
                f"kv_cache must be a cache handle of this executor, got {handle!r}"
            )
        if handle.executor is not self:
            raise FerrumError.invalid_parameter(
                f"cache handle {handle.cache_id()!r} belongs to another executor"
            )
        if self._state is ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down; create a new one")
        record = self._live.get(handle.cache_id())
        if record is None:
            raise FerrumError.not_found(
                f"cache handle {handle.cache_id()!r} is unknown or was released"
            )
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

    def _prompt_rows(self, input: Any) -> tuple[np.ndarray, np.ndarray]:
        """`input_ids [b, s]` and per-row lengths from the attention mask (right padding)."""
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
        if input.position_ids is not None:
            positions = self._host_array(input.position_ids, "position_ids")
            if positions.shape != (b, s) or np.any(positions != np.arange(s)[None]):
                raise FerrumError.unsupported(
                    f"prefill position_ids must be 0..{s - 1} in every row "
                    f"(shape {(b, s)}), got shape {positions.shape}"
                )
        if s > self.max_sequence_length:
            raise FerrumError.request_validation(
                f"prompt of {s} tokens exceeds max_sequence_length {self.max_sequence_length}"
            )
        return ids, lengths

    def _decode_rows(self, input: Any) -> tuple[_Sequence, np.ndarray]:
        if not isinstance(input, DecodeInput):
            raise FerrumError.invalid_parameter(f"expected a DecodeInput, got {input!r}")
        record = self._lookup(input.kv_cache)
        ids = self._token_array(input.input_ids, "input_ids")
        rows = len(record.slots)
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
            if length + 1 > self.max_sequence_length:
                raise FerrumError.request_validation(
                    f"sequence {record.cache_id!r} is full: {length} tokens, "
                    f"max_sequence_length {self.max_sequence_length}"
                )
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

    # -----------------------------------------------------------------------------------------
    # Mechanism 1: device memory, from XLA's memory analysis of each compiled program

    def _need(self, key: tuple) -> int:
        """Device bytes program `key` needs beyond its arguments (temporaries and outputs that
        do not alias the donated pool), per device; compiled once per shape and cached.

        Compiling here costs nothing extra: the jitted call that follows reuses the program.
        """
        if key not in self._needs:
            analysis = self._lower(key).compile().memory_analysis()
            self._needs[key] = (
                0
                if analysis is None
                else analysis.temp_size_in_bytes
                + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes
            )
        return self._needs[key]

    def _lower(self, key: tuple) -> Any:
        kind, rows, length = key
        i32 = jax.ShapeDtypeStruct((rows,), jnp.int32)
        tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        g, p, cache = self._graphdef, self._params, self._cache
        if kind == "prefill":
            return engine.prefill_step.lower(g, p, cache, tokens, i32, i32, True)
        if kind == "extend":
            return engine.extend_step.lower(g, p, cache, tokens, i32, i32)
        if kind == "forward":
            return engine.forward_step.lower(g, p, tokens, i32)
        active = jax.ShapeDtypeStruct((rows,), jnp.bool_)  # decode; `length` 0: no gather
        return engine.decode_step.lower(g, p, cache, i32, None if length == 0 else i32, active)

    def _fits(self, key: tuple, extra: int = 0) -> bool:
        return self._step_budget is None or self._need(key) + extra <= self._step_budget

    def _require(self, what: str, key: tuple) -> None:
        if not self._fits(key):
            raise FerrumError.resource_exhausted(
                f"{what} needs {_mib(self._need(key))} of device memory in one step, "
                f"{_mib(self._step_budget)} are free for steps"
            )

    def _plan_prefill(self, rows: int, seq: int) -> int:
        """The chunk length a prefill of `rows` prompts of up to `seq` tokens runs in.

        The whole prompt bucket when its program fits the step budget; else the largest
        power-of-two chunk whose programs fit together with the all-logits result assembled
        across chunks (chunks after the first attend to the cache, so no step builds the
        `seq x seq` score matrix). Refuses a prefill that fits in no chunking.
        """
        r = engine.bucket(rows, self.max_batch_size)
        s = engine.bucket_length(seq, self.max_sequence_length)
        if self._fits(("prefill", r, s)):
            return s
        logits = r * s * self.model.config.vocab_size * 4  # float32, kept across chunks
        chunk = s // 2
        # The assembled logits and their padding-filled copy alone must fit before any
        # chunk program is compiled to ask.
        while chunk >= engine.MIN_BUCKET and 2 * logits <= self._step_budget:
            if self._fits(("prefill", r, chunk), 2 * logits) and self._fits(
                ("extend", r, chunk), 2 * logits
            ):
                return chunk
            chunk //= 2
        raise FerrumError.resource_exhausted(
            f"a prefill of {rows} row(s) x {seq} tokens needs {_mib(self._need(('prefill', r, s)))}"
            f" of device memory in one step and does not fit in chunks either (its logits "
            f"alone take {_mib(logits)}); {_mib(self._step_budget)} are free for steps: send "
            "fewer or shorter prompts"
        )

    # -----------------------------------------------------------------------------------------
    # Mechanisms 3 and 5: device work, the pool hand-off, recovery

    def _donate(self, program: Callable[[KVCache], tuple[T, KVCache]]) -> T:
        """Runs `program(pool) -> (out, pool')`: the one place the pool is handed to a
        donating program. While it is out, `_cache` is None and views wait (`_slot_view`)."""
        with self._host:
            cache, self._cache = self._cache, None
        try:
            out, cache = program(cache)
        finally:
            with self._host:
                self._cache = cache
                self._host.notify_all()
        return out

    def _device(
        self, kind: str | None, tokens: int, rows: int, txn: _Txn, fn: Callable[[], T]
    ) -> T:
        """Runs one call's device work (mechanism 3). On failure the pool is restored
        (`_resync`), the state stays READY, and the error is a `FerrumError`; `kind` None
        records no statistics (warmup)."""
        self._state = ExecutorState.BUSY
        start = time.perf_counter()
        try:
            out = jax.block_until_ready(fn())
        except Exception as e:
            self._recover(kind or "warmup", txn, e)
        if kind is not None:
            self._stats.record(kind, (time.perf_counter() - start) * 1e3, tokens, rows)
            self._last_operation = time.monotonic()
        self._state = ExecutorState.READY
        return out

    def _recover(self, kind: str, txn: _Txn, error: Exception) -> NoReturn:
        try:
            self._resync(txn.rows)
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
        cache = self._cache
        if cache is None:
            return False
        leaves = jax.tree.leaves(cache)
        if any(x.is_deleted() for x in leaves):
            return False
        try:
            jax.block_until_ready(leaves)
        except Exception:
            return False
        return True

    def _resync(self, rows: dict[int, bool]) -> None:
        """Makes pool rows `rows` agree with the host records again (after a failed or
        rolled-back call); rebuilds the whole pool when the failure consumed it."""
        if not self._pool_intact():
            self._rebuild()
            return
        if not rows:
            return
        with self._host:
            owners = {
                slot: row
                for record in self._live.values()
                for slot, row in zip(record.slots, record.tokens, strict=True)
            }
        slots = sorted(rows)
        replay = [s for s in slots if rows[s] and s in owners]
        if replay:
            replay_rows = [np.asarray(owners[s], np.int32) for s in replay]
            chunk = self._plan_prefill(len(replay), max(map(len, replay_rows)))
            self._write_rows(replay_rows, replay, chunk)
        lengths = [len(owners.get(s, ())) for s in slots]
        self._donate(lambda cache: (None, engine.set_lengths(cache, slots, lengths)))

    def _rebuild(self) -> None:
        """A fresh pool with every live row's tokens replayed into its slot (mechanism 3)."""
        with self._host:
            old, self._cache = self._cache, None
        for x in jax.tree.leaves(old):
            if not x.is_deleted():
                x.delete()
        fresh = self._new_pool()
        with self._host:
            self._cache = fresh
            self._host.notify_all()
            rows = [
                (slot, np.asarray(row, np.int32))
                for record in self._live.values()
                for slot, row in zip(record.slots, record.tokens, strict=True)
            ]
        self._dirty = set()
        if rows:
            slots, tokens = [s for s, _ in rows], [t for _, t in rows]
            self._write_rows(tokens, slots, self._plan_prefill(len(rows), max(map(len, tokens))))
            lengths = [len(t) for t in tokens]
            self._donate(lambda cache: (None, engine.set_lengths(cache, slots, lengths)))
        jax.block_until_ready(self._cache)

    def _roll_back(self, txn: _Txn | None) -> None:
        """Undoes a committed call whose caller is gone (mechanism 4)."""
        if txn is None:
            return
        with self._host:
            for slots, undo in reversed(txn.undo):
                if not undo():
                    for slot in slots:
                        txn.rows.pop(slot, None)  # a later call owns it now: leave it
        try:
            self._resync(txn.rows)
        except Exception as e:
            self._state = ExecutorState.ERROR
            self._failure = f"rolling back a cancelled call failed: {e}"

    # -----------------------------------------------------------------------------------------
    # Mechanisms 4 and 5: the worker thread, cancellation

    async def _run(self, work: Callable[[_Txn], T], *, opening: bool = True) -> T:
        """Runs `work(txn)` on the worker thread, in call order; see `_Call`."""
        if self._state is ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down; create a new one")
        call = _Call()
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._worker, self._execute, call, work, opening
            )
        except RuntimeError as e:  # the worker stopped under a concurrent shutdown()
            raise FerrumError.backend("executor is shut down; create a new one") from e
        try:
            return await future
        except asyncio.CancelledError:
            if call.abandon():
                with contextlib.suppress(RuntimeError):  # the executor shut down meanwhile
                    self._worker.submit(self._roll_back, call.txn)
            raise

    def _execute(self, call: _Call, work: Callable[[_Txn], T], opening: bool) -> T:
        if not call.begin():
            raise FerrumError.cancelled("the call was cancelled before it ran")
        if opening:
            self._ensure_ready()
        txn = _Txn()
        result = work(txn)
        with self._host:
            self._stats.peak_bytes = max(self._stats.peak_bytes, self._used_bytes())
        if not call.finish(txn):
            self._roll_back(txn)
            raise FerrumError.cancelled("the call was cancelled while it ran; it was rolled back")
        return result

    # -----------------------------------------------------------------------------------------
    # Device programs (worker thread only)

    def _pack_rows(self, rows: list[np.ndarray], slots: list[int]) -> engine.RowBatch:
        return engine.pack_rows(
            rows, slots, pool_rows=self.max_batch_size, max_len=self.max_sequence_length
        )

    def _scrub(self, slots: list[int]) -> None:
        """Zeroes pool rows `slots` before new tokens go in (mechanism 6)."""
        padded = np.full((engine.bucket(len(slots), self.max_batch_size),), self.max_batch_size)
        padded[: len(slots)] = slots
        index = jnp.asarray(padded, jnp.int32)
        self._donate(lambda cache: (None, _zero_rows(cache, index)))

    def _write_rows(self, rows: list[np.ndarray], slots: list[int], chunk: int) -> jax.Array:
        """Prefills `rows` (1-D prompts) into `slots` in chunks of `chunk` tokens (one chunk
        when `chunk` covers the bucket); logits `[rows, seq, vocab]`, padding positions
        repeating each row's last real logits."""
        dirty = [s for s in slots if s in self._dirty]
        if dirty:
            self._scrub(dirty)
        self._dirty.update(slots)
        batch = self._pack_rows(rows, slots)
        g, p = self._graphdef, self._params
        lengths, row_slots = jnp.asarray(batch.lengths), jnp.asarray(batch.slots)
        if chunk >= batch.tokens.shape[1]:
            tokens = jnp.asarray(batch.tokens)
            logits = self._donate(
                lambda c: engine.prefill_step(g, p, c, tokens, lengths, row_slots, True)
            )
            return logits[: batch.rows, : batch.seq]
        parts = []
        for start in range(0, batch.seq, chunk):
            tokens = jnp.asarray(batch.tokens[:, start : start + chunk])
            real = jnp.asarray(np.clip(batch.lengths - start, 0, chunk).astype(np.int32))
            step = _prefill_all_logits if start == 0 else engine.extend_step
            parts.append(
                self._donate(lambda c, s=step, t=tokens, n=real: s(g, p, c, t, n, row_slots))
            )
        logits = jnp.concatenate(parts, axis=1)[: batch.rows, : batch.seq]
        n = lengths[: batch.rows]
        last = jnp.take_along_axis(logits, (n - 1)[:, None, None], axis=1)
        return jnp.where((jnp.arange(batch.seq) < n[:, None])[:, :, None], logits, last)

    def _run_tokens(self, batch: engine.TokenBatch) -> jax.Array:
        """Runs `decode_step` on `batch`, updating the pool in place."""
        g, p = self._graphdef, self._params
        tokens, active = jnp.asarray(batch.tokens), jnp.asarray(batch.active)
        slots = None if batch.slots is None else jnp.asarray(batch.slots)
        return self._donate(lambda c: engine.decode_step(g, p, c, tokens, slots, active))

    def _decode_program(self, rows: int) -> tuple:
        pool = self.max_batch_size
        whole = rows == pool
        return ("decode", pool if whole else engine.bucket(rows, pool), 0 if whole else 1)

    # -----------------------------------------------------------------------------------------
    # ModelExecutor

    def info(self) -> ModelInfo:
        return self._info

    async def prefill(self, input: PrefillInput) -> PrefillOutput:
        return (await self.batch_prefill([input]))[0]

    async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]:
        """All prompts of all inputs in one jitted prefill (in chunks when one step would not
        fit the device)."""
        inputs = _as_list(inputs, "batch_prefill inputs")
        if not inputs:
            return []

        def work(txn: _Txn) -> list[PrefillOutput]:
            with self._host:
                prompts = [self._prompt_rows(x) for x in inputs]
                reused: list[_Sequence | None] = []
                for input, (ids, _) in zip(inputs, prompts, strict=True):
                    if input.kv_cache is None:
                        reused.append(None)
                        continue
                    record = self._lookup(input.kv_cache)
                    if len(record.slots) != ids.shape[0]:
                        raise FerrumError.invalid_parameter(
                            f"input_ids batch {ids.shape[0]} does not match the handle's "
                            f"{len(record.slots)} row(s)"
                        )
                    if any(record is r for r in reused):
                        raise FerrumError.invalid_parameter(
                            f"cache handle {record.cache_id!r} appears twice in one batch_prefill"
                        )
                    reused.append(record)
                new_rows = sum(
                    ids.shape[0] for (ids, _), r in zip(prompts, reused, strict=True) if r is None
                )
                if new_rows > len(self._free):
                    raise FerrumError.resource_exhausted(
                        f"slot pool full: {new_rows} slot(s) needed, {len(self._free)} of "
                        f"{self.max_batch_size} free"
                    )
                fresh = iter(list(self._free[:new_rows]))
            slot_lists = [
                record.slots if record is not None else [next(fresh) for _ in range(len(ids))]
                for (ids, _), record in zip(prompts, reused, strict=True)
            ]
            rows = [
                row[:n] for ids, lengths in prompts for row, n in zip(ids, lengths, strict=True)
            ]
            slots = [s for group in slot_lists for s in group]
            seq = max(len(row) for row in rows)
            chunk = self._plan_prefill(len(rows), seq)
            txn.writes(slots, overwrite=True)
            tokens = sum(len(row) for row in rows)
            logits = self._device(
                "prefill", tokens, len(rows), txn, lambda: self._write_rows(rows, slots, chunk)
            )
            records = self._commit_prefill(txn, prompts, reused, slot_lists)
            outputs, start = [], 0
            for (ids, _), record in zip(prompts, records, strict=True):
                b, s = ids.shape
                block = logits[start : start + b, :s]
                outputs.append(
                    PrefillOutput(JaxTensor(block), JaxKvCacheHandle(self, record.cache_id))
                )
                start += b
            return outputs

        return await self._run(work)

    def _commit_prefill(
        self,
        txn: _Txn,
        prompts: list[tuple[np.ndarray, np.ndarray]],
        reused: list[_Sequence | None],
        slot_lists: list[list[int]],
    ) -> list[_Sequence]:
        now = time.monotonic()
        records = []
        with self._host:
            for (ids, lengths), record, slots in zip(prompts, reused, slot_lists, strict=True):
                tokens = [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)]
                if record is None:
                    record = _Sequence(f"{self._id}-{next(self._ids)}", slots, tokens, now)
                    self._live[record.cache_id] = record
                    self._free = [s for s in self._free if s not in slots]
                    txn.undo.append((slots, functools.partial(self._undo_create, record)))
                else:
                    old = record.tokens
                    record.tokens, record.last_access = tokens, now
                    record.version += 1
                    undo = functools.partial(self._undo_tokens, record, old, record.version)
                    txn.undo.append((slots, undo))
                records.append(record)
        return records

    def _undo_create(self, record: _Sequence) -> bool:
        if self._live.get(record.cache_id) is not record or record.version != 0:
            return False
        del self._live[record.cache_id]
        self._free = sorted(self._free + record.slots)
        return True

    def _undo_tokens(self, record: _Sequence, old: list[list[int]], version: int) -> bool:
        if record.version != version or self._live.get(record.cache_id) is not record:
            return False
        record.tokens = old
        record.version += 1
        return True

    def _commit_tokens(self, txn: _Txn, record: _Sequence, new: list[list[int]]) -> None:
        """Appends `new[row]` to each row of `record` (caller holds `_host`)."""
        old = record.tokens
        record.tokens = [row + more for row, more in zip(old, new, strict=True)]
        record.last_access = time.monotonic()
        record.version += 1
        undo = functools.partial(self._undo_tokens, record, old, record.version)
        txn.undo.append((record.slots, undo))

    async def decode(self, input: DecodeInput) -> DecodeOutput:
        return (await self.batch_decode([input]))[0]

    async def batch_decode(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """One jitted decode step for every row of every input."""
        inputs = _as_list(inputs, "batch_decode inputs")
        if not inputs:
            return []

        def work(txn: _Txn) -> list[DecodeOutput]:
            with self._host:
                checked = [self._decode_rows(x) for x in inputs]
            seen: set[str] = set()
            for record, _ in checked:
                if record.cache_id in seen:
                    raise FerrumError.invalid_parameter(
                        f"cache handle {record.cache_id!r} appears twice in one batch"
                    )
                seen.add(record.cache_id)
            slots = [s for record, _ in checked for s in record.slots]
            tokens = np.concatenate([ids for _, ids in checked])
            self._require(f"a decode of {len(slots)} row(s)", self._decode_program(len(slots)))
            txn.writes(slots, overwrite=False)

            def step() -> jax.Array:
                batch = engine.pack_tokens(tokens, slots, pool_rows=self.max_batch_size)
                return self._run_tokens(batch)[batch.order]

            logits = self._device("decode", len(slots), len(slots), txn, step)
            outputs, start = [], 0
            with self._host:
                for input, (record, ids) in zip(inputs, checked, strict=True):
                    self._commit_tokens(txn, record, [[int(t)] for t in ids])
                    rows = len(record.slots)
                    outputs.append(
                        DecodeOutput(JaxTensor(logits[start : start + rows]), input.kv_cache)
                    )
                    start += rows
            return outputs

        return await self._run(work)

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

        def work(txn: _Txn) -> SpeculativeDecodeOutput:
            with self._host:
                record, ids = self._decode_rows(input)
                if len(record.slots) != 1:
                    raise FerrumError.invalid_parameter(
                        "speculative_decode needs a single-row handle, got "
                        f"{len(record.slots)} rows"
                    )
                start = record.lengths[0]
                slots = list(record.slots)
            drafts = self._drafts(draft_tokens)
            threshold = self._threshold(acceptance_threshold)
            k = drafts.shape[0]
            if start + 1 + k > self.max_sequence_length:
                raise FerrumError.request_validation(
                    f"{k} draft tokens after {start + 1} tokens exceed max_sequence_length "
                    f"{self.max_sequence_length}"
                )
            step_tokens = np.concatenate([ids, drafts]).astype(np.int32)
            batch = self._pack_rows([step_tokens], slots)
            self._require(f"scoring {k} draft tokens", ("extend", *np.shape(batch.tokens)))
            txn.writes(slots, overwrite=False)
            g, p = self._graphdef, self._params
            args = [jnp.asarray(x) for x in (batch.tokens, batch.lengths, batch.slots)]

            def step() -> tuple[int, jax.Array]:
                logits = self._donate(lambda c: engine.extend_step(g, p, c, *args))[0, : k + 1]
                probs = np.asarray(jax.nn.softmax(logits[:k], axis=-1))
                accepted = 0
                for i in range(k):
                    d = int(drafts[i])
                    if d == probs[i].argmax() or probs[i, d] >= threshold:
                        accepted += 1
                    else:
                        break
                kept = [start + 1 + accepted]
                self._donate(lambda cache: (None, engine.set_lengths(cache, slots, kept)))
                return accepted, logits

            accepted, logits = self._device("decode", k + 1, 1, txn, step)
            with self._host:
                self._commit_tokens(txn, record, [[int(ids[0]), *drafts[:accepted].tolist()]])
            return SpeculativeDecodeOutput(
                accepted_tokens=[int(t) for t in drafts[:accepted]],
                next_logits=JaxTensor(logits[accepted][None]),
                kv_cache=input.kv_cache,
                acceptance_count=accepted,
            )

        return await self._run(work)

    async def forward(self, input: TensorLike) -> TensorLike:
        """Full-sequence logits `[batch, seq, vocab]`; the slot pool is untouched."""

        def work(txn: _Txn) -> TensorLike:
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
            self._require(
                f"a forward of {b} x {s} tokens",
                ("forward", b, engine.bucket(s, minimum=engine.MIN_BUCKET)),
            )
            g, p = self._graphdef, self._params
            logits = self._device("prefill", ids.size, b, txn, lambda: engine.forward(g, p, ids))
            return JaxTensor(logits)

        return await self._run(work)

    def optimal_batch_size(self) -> int:
        return self.max_batch_size

    def supports_batch_size(self, batch_size: int) -> bool:
        return 1 <= batch_size <= self.max_batch_size

    def capabilities(self) -> ExecutorCapabilities:
        c = self.model.config
        if c.num_kv_heads == 1 and c.num_heads > 1:
            attention = [AttentionType.MULTI_QUERY]
        elif c.num_kv_heads < c.num_heads:
            attention = [AttentionType.GROUPED_QUERY]
        else:
            attention = [AttentionType.MULTI_HEAD]
        if c.sliding_window is not None:
            attention.append(AttentionType.SLIDING_WINDOW)
        devices = [Device.CPU] + [
            JaxTensor(jnp.zeros((), device=d)).device for d in jax.devices() if d.platform != "cpu"
        ]
        return ExecutorCapabilities(
            max_batch_size=self.max_batch_size,
            max_sequence_length=self.max_sequence_length,
            attention_mechanisms=attention,
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
                overhead_memory=4 * self.max_batch_size,  # the int32 lengths
            ),
        )

    def _used_bytes(self) -> int:
        """KV bytes of live tokens (caller holds `_host`)."""
        return sum(sum(r.lengths) for r in self._live.values()) * self.kv_bytes_per_token

    def status(self) -> ExecutorStatus:
        stats = self._stats
        shut = self._state is ExecutorState.SHUTDOWN
        allocated = 0 if shut else self._pool_bytes + 4 * self.max_batch_size
        with self._host:
            used = self._used_bytes()
            rows = sum(len(r.slots) for r in self._live.values())
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
        allocated = self._pool_bytes + 4 * self.max_batch_size
        with self._host:
            used = self._used_bytes()
        return ExecutorMetrics(
            total_operations=stats.prefill_ops + stats.decode_ops,
            prefill_operations=stats.prefill_ops,
            decode_operations=stats.decode_ops,
            avg_prefill_latency=stats.prefill_total_ms / max(stats.prefill_ops, 1),
            avg_decode_latency=stats.decode_total_ms / max(stats.decode_ops, 1),
            p95_prefill_latency=_p95(stats.prefill_ms),
            p95_decode_latency=_p95(stats.decode_ms),
            throughput_tps=stats.tokens / busy_s if busy_s else 0.0,
            memory_efficiency=used / allocated,
            batch_utilization=(
                stats.decode_rows / (stats.decode_ops * self.max_batch_size)
                if stats.decode_ops
                else 0.0
            ),
        )

    async def warmup(self) -> dict[str, list[tuple[int, int]]]:
        """Compiles every program serving can run: each (row bucket, prompt bucket) prefill
        (or, where one step would not fit the device, its chunk programs), every decode row
        bucket, the slot scrub per row bucket and the speculative step for up to
        `MIN_BUCKET - 1` drafts.

        Each program runs once on padding rows that point past the pool, so nothing is
        written and live sequences are untouched. Returns what was compiled as
        `(rows, tokens)` per program kind; `"skipped"` lists the prefill buckets no chunking
        fits (serving refuses those requests). Progress: a bar over the programs on a
        terminal, and stage lines on the `ferrum_jax` logger (see `ferrum_jax.progress`).
        """

        def work(txn: _Txn) -> dict[str, list[tuple[int, int]]]:
            compiled: dict[str, list[tuple[int, int]]] = {
                "prefill": [],
                "decode": [],
                "extend": [],
                "scrub": [],
                "skipped": [],
            }
            pool, max_len = self.max_batch_size, self.max_sequence_length
            g, p = self._graphdef, self._params

            done: set[tuple[str, int, int]] = set()

            def run(kind: str, rows: int, length: int) -> None:
                if (kind, rows, length) in done:
                    return
                done.add((kind, rows, length))
                if kind in ("decode", "whole-pool decode"):
                    gather = kind == "decode"
                    batch = engine.padding_tokens(rows, pool_rows=pool, gather=gather)
                    self._device(None, 0, 0, txn, lambda: self._run_tokens(batch))
                elif kind == "scrub":
                    self._device(None, 0, 0, txn, lambda: self._scrub([pool] * rows))
                else:
                    b = engine.padding_rows(rows, length, pool_rows=pool)
                    args = [jnp.asarray(x) for x in (b.tokens, b.lengths, b.slots)]
                    step = _prefill_all_logits if kind == "prefill" else engine.extend_step
                    program = functools.partial(step, g, p)
                    self._device(None, 0, 0, txn, lambda: self._donate(lambda c: program(c, *args)))
                if kind in compiled:
                    compiled[kind].append((rows, length))

            len_buckets = engine.buckets(max_len, minimum=engine.MIN_BUCKET)
            plan: list[tuple[str, int, int]] = [("extend", 1, len_buckets[0])]
            for rows in engine.buckets(pool):
                for length in len_buckets:
                    try:
                        chunk = self._plan_prefill(rows, length)
                    except FerrumError:
                        compiled["skipped"].append((rows, length))
                        continue
                    plan.append(("prefill", rows, chunk))
                    if chunk < length:
                        plan.append(("extend", rows, chunk))
                plan += [("decode", rows, 1), ("scrub", rows, max_len)]
            plan.append(("whole-pool decode", pool, 1))
            plan = list(dict.fromkeys(plan))
            start = time.perf_counter()
            progress.logger.info("warmup: compiling %d programs", len(plan))
            with progress.bar(len(plan), "warmup", "program") as bar:
                for kind, rows, length in plan:
                    run(kind, rows, length)
                    bar.set_postfix_str(f"{kind} {rows}x{length}", refresh=False)
                    bar.update()
            progress.logger.info(
                "warmup: %d programs in %.1f s", len(plan), time.perf_counter() - start
            )
            return compiled

        return await self._run(work)

    async def shutdown(self) -> None:
        """Frees the pool and params; every later call fails with a clear error. Waits for
        the call in progress, if any."""
        if self._state is ExecutorState.SHUTDOWN:
            return

        def work(txn: _Txn) -> None:
            with self._host:
                if self._state is ExecutorState.SHUTDOWN:
                    return
                for x in jax.tree.leaves(self._cache):
                    if not x.is_deleted():
                        x.delete()
                self._live.clear()
                self._free = []
                self._state = ExecutorState.SHUTDOWN
                self._host.notify_all()

        await self._run(work, opening=False)
        self._worker.shutdown(wait=False)

    def release_cache(self, cache_id: str) -> None:
        """Frees the handle's slots; idempotent, unknown ids change nothing. Never waits for
        device work (mechanism 5); the slots are scrubbed before their next use."""
        with self._host:
            record = self._live.pop(cache_id, None)
            if record is not None:
                self._free = sorted(self._free + record.slots)

    def _slot_view(self, handle: JaxKvCacheHandle, layer: int, *, keys: bool) -> TensorLike:
        with self._host:
            self._host.wait_for(
                lambda: self._cache is not None or self._state is ExecutorState.SHUTDOWN
            )
            record = self._lookup(handle)
            layers = self.model.runtime_config.num_layers
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise FerrumError.invalid_parameter(f"layer must be an integer, got {layer!r}")
            if not 0 <= layer < layers:
                raise FerrumError.invalid_parameter(f"layer {layer} out of range [0, {layers})")
            try:
                rows = self._cache.layer_kv(layer, jnp.asarray(record.slots))[0 if keys else 1]
            except RuntimeError as e:  # the pool was lost in a device failure, not rebuilt yet
                raise FerrumError.backend(f"the KV pool is being rebuilt: {e}") from e
            return JaxTensor(rows[:, :, : max(record.lengths)])


def _as_list(inputs: Any, what: str) -> list[Any]:
    if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
        raise FerrumError.invalid_parameter(f"{what} must be a sequence, got {inputs!r}")
    return list(inputs)
