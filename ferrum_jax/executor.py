"""`JaxModelExecutor`: Ferrum's `ModelExecutor` over the pure engine, with a slot pool.

The executor owns the params and one KV cache of `max_batch_size` slots x
`max_sequence_length` tokens. A `KvCacheHandle` names one or more slots (one per batch row
of the prefill that made it). Every call validates on the host first and only then touches
the device, so a bad request changes no other sequence. `decode`, `batch_decode` and
`batch_prefill` run one jitted forward for all rows, padded to a power-of-two row bucket, so
their cost follows the number of active rows, not the pool size.

Deliberate differences from Rust:
- prefill logits at a row's padding positions repeat the row's last real logits, so
  `PrefillOutput.last_token_logits()` is every row's next-token distribution;
- `key_cache(layer)` / `value_cache(layer)` return `[rows, kv_heads, num_tokens, head_dim]`
  (a fresh array holding the slot's real contents: JAX arrays are immutable, not aliasable);
- the block table describes the slot as `block_size`-token blocks of one contiguous region.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ferrum_jax import engine, progress, sharding
from ferrum_jax.cache import init_cache
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


@dataclasses.dataclass
class _Sequence:
    """Host-side record of a live handle: its slots and their token counts."""

    cache_id: str
    slots: list[int]
    lengths: list[int]
    last_access: float


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
    ) -> None:
        """Serves `model` (a `Model`; or the older `config, graphdef, params` triple, with
        `model_config` the checkpoint's own config and `tokenizer`).

        With `mesh`, heads are adapted to it and params sharded (exact logits); a model
        already adapted to a mesh is used as is.
        """
        if not isinstance(model, Model):
            if graphdef is None or params is None:
                raise FerrumError.invalid_parameter(
                    "JaxModelExecutor takes a Model, or config, graphdef and params"
                )
            model = Model(model_config or model, graphdef, params, tokenizer=tokenizer)
        if max_batch_size < 1:
            raise FerrumError.config(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_sequence_length < 1:
            raise FerrumError.config(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        if block_size < 1:
            raise FerrumError.config(f"block_size must be >= 1, got {block_size}")
        self._state = ExecutorState.INITIALIZING
        self._lock = threading.RLock()
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
        cache = init_cache(runtime, max_batch_size, max_sequence_length, model.dtype)
        self._cache = cache if mesh is None else sharding.shard_cache(cache, mesh)
        self.kv_bytes_per_token = runtime.kv_bytes_per_token(model.dtype.itemsize)
        self._free = list(range(max_batch_size))
        self._live: dict[str, _Sequence] = {}
        self._stats = _Stats()
        self._last_operation: float | None = None
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
    ) -> JaxModelExecutor:
        """Loads an HF directory, a `.gguf` file or an orbax directory (None: SmolLM2)."""
        from ferrum_jax.checkpoint import load_model

        model_dtype(dtype)
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
        )

    # -----------------------------------------------------------------------------------------
    # Host-side validation

    def _check_open(self) -> None:
        if self._state is ExecutorState.SHUTDOWN:
            raise FerrumError.backend("executor is shut down; create a new one")
        if self._state is ExecutorState.ERROR:
            raise FerrumError.backend("executor is in the Error state after a failed device step")

    def _is_live(self, cache_id: str) -> bool:
        return self._state is not ExecutorState.SHUTDOWN and cache_id in self._live

    def _lookup(self, handle: KvCacheHandle) -> _Sequence:
        if not isinstance(handle, JaxKvCacheHandle) or handle.executor is not self:
            raise FerrumError.invalid_parameter(
                f"cache handle {handle.cache_id()!r} belongs to another executor"
            )
        self._check_open()
        record = self._live.get(handle.cache_id())
        if record is None:
            raise FerrumError.not_found(
                f"cache handle {handle.cache_id()!r} is unknown or was released"
            )
        return record

    def _token_array(self, x: Any, what: str) -> np.ndarray:
        ids = engine.check_token_ids(as_numpy(x), self.model.config.vocab_size, what)
        return np.asarray(ids, np.int32)

    def _prompt_rows(self, input: PrefillInput) -> tuple[np.ndarray, np.ndarray]:
        """`input_ids [b, s]` and per-row lengths from the attention mask (right padding)."""
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
            mask = as_numpy(input.attention_mask)
            if mask.shape != (b, s):
                raise FerrumError.invalid_parameter(
                    f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}"
                )
            mask = mask.astype(bool)
            lengths = mask.sum(axis=1).astype(np.int32)
            if np.any(mask != (np.arange(s)[None] < lengths[:, None])):
                raise FerrumError.unsupported("attention_mask must be right padding (1s then 0s)")
            if np.any(lengths == 0):
                raise FerrumError.request_validation("empty prompt: a row's attention_mask is 0")
        if input.position_ids is not None:
            positions = as_numpy(input.position_ids)
            if positions.shape != (b, s) or np.any(positions != np.arange(s)[None]):
                raise FerrumError.unsupported("prefill position_ids must be 0..seq-1")
        if s > self.max_sequence_length:
            raise FerrumError.request_validation(
                f"prompt of {s} tokens exceeds max_sequence_length {self.max_sequence_length}"
            )
        return ids, lengths

    def _decode_rows(self, input: DecodeInput) -> tuple[_Sequence, np.ndarray]:
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
            positions = as_numpy(input.position_ids).reshape(-1)
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

    def _take_slots(self, needed: int) -> list[int]:
        taken, self._free = self._free[:needed], self._free[needed:]
        return taken

    # -----------------------------------------------------------------------------------------
    # Device steps (run under the lock, off the event loop)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(self._locked, fn)

    def _locked(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            self._check_open()
            out = fn()
            self._stats.peak_bytes = max(self._stats.peak_bytes, self._used_bytes())
            return out

    def _device_step(self, kind: str, tokens: int, rows: int, step: Callable[[], Any]) -> Any:
        self._state = ExecutorState.BUSY
        start = time.perf_counter()
        try:
            out = jax.block_until_ready(step())
        except FerrumError:
            self._state = ExecutorState.READY
            raise
        except Exception as e:
            self._state = ExecutorState.ERROR
            raise FerrumError.internal(f"{kind} failed on the device: {e}") from e
        ms = (time.perf_counter() - start) * 1e3
        self._stats.record(kind, ms, tokens, rows)
        self._last_operation = time.monotonic()
        self._state = ExecutorState.READY
        return out

    def _prefill_rows(self, rows: list[np.ndarray], slots: list[int]) -> jax.Array:
        """One jitted prefill of `rows` (1-D prompts) into `slots`; logits `[rows, s, vocab]`."""
        batch = self._pack_rows(rows, slots)
        return self._run_rows(engine.prefill_step, batch, True)[: batch.rows, : batch.seq]

    def _pack_rows(self, rows: list[np.ndarray], slots: list[int]) -> engine.RowBatch:
        return engine.pack_rows(
            rows, slots, pool_rows=self.max_batch_size, max_len=self.max_sequence_length
        )

    def _run_rows(self, step: Callable, batch: engine.RowBatch, *static: Any) -> jax.Array:
        """Runs `prefill_step` or `extend_step` on `batch`, updating the pool in place."""
        logits, self._cache = step(
            self._graphdef,
            self._params,
            self._cache,
            jnp.asarray(batch.tokens),
            jnp.asarray(batch.lengths),
            jnp.asarray(batch.slots),
            *static,
        )
        return logits

    def _run_tokens(self, batch: engine.TokenBatch) -> jax.Array:
        """Runs `decode_step` on `batch`, updating the pool in place."""
        logits, self._cache = engine.decode_step(
            self._graphdef,
            self._params,
            self._cache,
            jnp.asarray(batch.tokens),
            None if batch.slots is None else jnp.asarray(batch.slots),
            jnp.asarray(batch.active),
        )
        return logits

    def _decode_slots(self, tokens: np.ndarray, slots: list[int]) -> jax.Array:
        """One jitted decode step for `slots`; logits `[len(slots), vocab]`."""
        batch = engine.pack_tokens(tokens, slots, pool_rows=self.max_batch_size)
        return self._run_tokens(batch)[batch.order]

    # -----------------------------------------------------------------------------------------
    # ModelExecutor

    def info(self) -> ModelInfo:
        return self._info

    async def prefill(self, input: PrefillInput) -> PrefillOutput:
        return (await self.batch_prefill([input]))[0]

    async def batch_prefill(self, inputs: Sequence[PrefillInput]) -> list[PrefillOutput]:
        """All prompts of all inputs in one jitted prefill."""

        def work() -> list[PrefillOutput]:
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
                reused.append(record)
            new_rows = sum(
                ids.shape[0] for (ids, _), r in zip(prompts, reused, strict=False) if r is None
            )
            if new_rows > len(self._free):
                raise FerrumError.resource_exhausted(
                    f"slot pool full: {new_rows} slot(s) needed, {len(self._free)} of "
                    f"{self.max_batch_size} free"
                )
            records = []
            for (ids, lengths), record in zip(prompts, reused, strict=True):
                if record is None:
                    cache_id = f"{self._id}-{next(self._ids)}"
                    record = _Sequence(cache_id, self._take_slots(ids.shape[0]), [], 0.0)
                    self._live[cache_id] = record
                record.lengths = lengths.tolist()
                record.last_access = time.monotonic()
                records.append(record)
            rows = [
                row[:n] for ids, lengths in prompts for row, n in zip(ids, lengths, strict=True)
            ]
            slots = [s for record in records for s in record.slots]
            tokens = sum(len(row) for row in rows)
            logits = self._device_step(
                "prefill", tokens, len(rows), lambda: self._prefill_rows(rows, slots)
            )
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

    async def decode(self, input: DecodeInput) -> DecodeOutput:
        return (await self.batch_decode([input]))[0]

    async def batch_decode(self, inputs: Sequence[DecodeInput]) -> list[DecodeOutput]:
        """One jitted decode step for every row of every input."""

        def work() -> list[DecodeOutput]:
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
            logits = self._device_step(
                "decode", len(slots), len(slots), lambda: self._decode_slots(tokens, slots)
            )
            outputs, start = [], 0
            now = time.monotonic()
            for input, (record, _) in zip(inputs, checked, strict=True):
                record.lengths = [n + 1 for n in record.lengths]
                record.last_access = now
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

        def work() -> SpeculativeDecodeOutput:
            record, ids = self._decode_rows(input)
            if len(record.slots) != 1:
                raise FerrumError.invalid_parameter(
                    f"speculative_decode needs a single-row handle, got {len(record.slots)} rows"
                )
            drafts = self._token_array(
                np.asarray(draft_tokens, np.int64).reshape(-1), "draft_tokens"
            )
            if not np.isfinite(acceptance_threshold):
                raise FerrumError.invalid_parameter("acceptance_threshold must be finite")
            k = drafts.shape[0]
            start = record.lengths[0]
            if start + 1 + k > self.max_sequence_length:
                raise FerrumError.request_validation(
                    f"{k} draft tokens after {start + 1} tokens exceed max_sequence_length "
                    f"{self.max_sequence_length}"
                )
            step_tokens = np.concatenate([ids, drafts]).astype(np.int32)

            def step() -> jax.Array:
                batch = self._pack_rows([step_tokens], record.slots)
                return self._run_rows(engine.extend_step, batch)[0, : k + 1]

            logits = self._device_step("decode", k + 1, 1, step)
            probs = np.asarray(jax.nn.softmax(logits[:k], axis=-1))
            argmax = probs.argmax(axis=-1)
            accepted = 0
            for i in range(k):
                d = int(drafts[i])
                if d == argmax[i] or probs[i, d] >= acceptance_threshold:
                    accepted += 1
                else:
                    break
            new_length = start + 1 + accepted
            self._cache = engine.set_lengths(self._cache, record.slots, [new_length])
            record.lengths = [new_length]
            record.last_access = time.monotonic()
            return SpeculativeDecodeOutput(
                accepted_tokens=[int(t) for t in drafts[:accepted]],
                next_logits=JaxTensor(logits[accepted][None]),
                kv_cache=input.kv_cache,
                acceptance_count=accepted,
            )

        return await self._run(work)

    async def forward(self, input: TensorLike) -> TensorLike:
        """Full-sequence logits `[batch, seq, vocab]`; the slot pool is untouched."""

        def work() -> TensorLike:
            ids = self._token_array(input, "input")
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or ids.shape[1] == 0:
                raise FerrumError.invalid_parameter(f"input must be [batch, seq], got {ids.shape}")
            logits = self._device_step(
                "prefill",
                ids.size,
                ids.shape[0],
                lambda: engine.forward(self._graphdef, self._params, ids),
            )
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
                overhead_memory=self._cache.lengths.nbytes,
            ),
        )

    def _used_bytes(self) -> int:
        return sum(sum(r.lengths) for r in self._live.values()) * self.kv_bytes_per_token

    def status(self) -> ExecutorStatus:
        stats = self._stats
        allocated = self._cache.nbytes if self._state is not ExecutorState.SHUTDOWN else 0
        used = self._used_bytes()
        return ExecutorStatus(
            state=self._state,
            is_ready=self._state is ExecutorState.READY,
            current_batch_size=sum(len(r.slots) for r in self._live.values()),
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
        allocated = self._cache.nbytes
        return ExecutorMetrics(
            total_operations=stats.prefill_ops + stats.decode_ops,
            prefill_operations=stats.prefill_ops,
            decode_operations=stats.decode_ops,
            avg_prefill_latency=stats.prefill_total_ms / max(stats.prefill_ops, 1),
            avg_decode_latency=stats.decode_total_ms / max(stats.decode_ops, 1),
            p95_prefill_latency=_p95(stats.prefill_ms),
            p95_decode_latency=_p95(stats.decode_ms),
            throughput_tps=stats.tokens / busy_s if busy_s else 0.0,
            memory_efficiency=self._used_bytes() / allocated if allocated else 0.0,
            batch_utilization=(
                stats.decode_rows / (stats.decode_ops * self.max_batch_size)
                if stats.decode_ops
                else 0.0
            ),
        )

    async def warmup(self) -> dict[str, list[tuple[int, int]]]:
        """Compiles every (row bucket, prompt bucket) prefill, every decode row bucket and the
        speculative step for up to `MIN_BUCKET - 1` drafts.

        Each program runs once on padding rows that point past the pool, so nothing is
        written. Returns what was compiled as `(rows, tokens)` per program kind. Progress:
        a bar over the programs on a terminal, and stage lines on the `ferrum_jax` logger
        (see `ferrum_jax.progress`).
        """

        def work() -> dict[str, list[tuple[int, int]]]:
            compiled: dict[str, list[tuple[int, int]]] = {"prefill": [], "decode": [], "extend": []}
            pool, max_len = self.max_batch_size, self.max_sequence_length
            row_buckets = engine.buckets(pool)
            len_buckets = engine.buckets(max_len, minimum=engine.MIN_BUCKET)
            total = 2 + len(row_buckets) * (len(len_buckets) + 1)
            start = time.perf_counter()
            progress.logger.info("warmup: compiling %d programs", total)
            with progress.bar(total, "warmup", "program") as bar:

                def done(kind: str, rows: int, tokens: int) -> None:
                    compiled[kind].append((rows, tokens))
                    bar.set_postfix_str(f"{kind} {rows}x{tokens}", refresh=False)
                    bar.update()

                drafts = engine.padding_rows(1, len_buckets[0], pool_rows=pool)
                self._run_rows(engine.extend_step, drafts)
                done("extend", 1, len_buckets[0])
                for rows in row_buckets:
                    for length in len_buckets:
                        batch = engine.padding_rows(rows, length, pool_rows=pool)
                        self._run_rows(engine.prefill_step, batch, True)
                        done("prefill", rows, length)
                    self._run_tokens(engine.padding_tokens(rows, pool_rows=pool))
                    done("decode", rows, 1)
                self._run_tokens(engine.padding_tokens(pool, pool_rows=pool, gather=False))
                bar.update()  # the whole-pool decode program, reported with the row bucket
                jax.block_until_ready(self._cache)
            progress.logger.info(
                "warmup: %d programs in %.1f s", total, time.perf_counter() - start
            )
            return compiled

        return await self._run(work)

    async def shutdown(self) -> None:
        """Frees the pool and params; every later call fails with a clear error."""
        with self._lock:
            if self._state is ExecutorState.SHUTDOWN:
                return
            for x in jax.tree.leaves(self._cache):
                x.delete()
            self._live.clear()
            self._free = []
            self._state = ExecutorState.SHUTDOWN

    def release_cache(self, cache_id: str) -> None:
        """Frees the handle's slots; idempotent, unknown ids change nothing."""
        with self._lock:
            record = self._live.pop(cache_id, None)
            if record is not None:
                self._free.extend(record.slots)
                self._free.sort()

    def _slot_view(self, handle: JaxKvCacheHandle, layer: int, *, keys: bool) -> TensorLike:
        with self._lock:
            record = self._lookup(handle)
            layers = self.model.runtime_config.num_layers
            if not 0 <= layer < layers:
                raise FerrumError.invalid_parameter(f"layer {layer} out of range [0, {layers})")
            rows = self._cache.layer_kv(layer, jnp.asarray(record.slots))[0 if keys else 1]
            return JaxTensor(rows[:, :, : max(record.lengths)])
