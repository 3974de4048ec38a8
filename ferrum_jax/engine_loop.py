"""A Python replica of Ferrum's continuous-batching engine loop, for tests and the bench.

Two ways to drive an executor over the same requests (greedy sampling):

- `run_unified`: what Ferrum 0.7.4+ and main do. Each iteration builds ONE `UnifiedBatch`:
  first the prefill work (newly admitted requests, and prompts still being prefilled) in
  chunks, then one decode item per running request. A chunk is capped at `decode_chunk`
  tokens while decodes run (or once a prompt has started), else at `prefill_chunk`; prefill
  chunks share `token_budget` tokens per iteration. Handles are the engine's own
  (`EngineHandle`), keyed by request id, as Ferrum's KV manager allocates them.
  As Ferrum main (ENGINE-NOTES.md, "KV reservation"): `reserve_kv_slots` runs before every
  `unified_decode`; on `resource_exhausted` the batch's prefills are released and deferred
  (admission waits until a request finishes) and the decodes run again alone; when decodes
  alone do not fit, the newest running request is preempted. A deferred or preempted request
  is recomputed from position 0 with its prompt and the tokens it generated, under the same
  id. Final items ask for `GreedyArgmax`, so the executor answers with the token id.
- `run_split`: the 0.6 path, for comparison: one `batch_prefill` per new request, then one
  `batch_decode` of every running request per iteration.

Requests may arrive over time (`Request.arrival`, seconds from the start); a request is
admitted once it has arrived and fewer than `executor.max_batch_size` run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.executor.reservation import ADMISSION_KEY
from ferrum_jax.interfaces import (
    BlockTable,
    CacheHandleStats,
    DecodeInput,
    Device,
    KvCacheHandle,
    KvSlotRequest,
    LogitsReturnPolicy,
    PrefillInput,
    TensorLike,
    UnifiedBatch,
    UnifiedBatchItem,
)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request."""

    id: str
    prompt: Sequence[int]
    max_new_tokens: int
    arrival: float = 0.0
    """Seconds after the start at which the request arrives."""


@dataclasses.dataclass
class Result:
    """What one request produced, and when."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    first_token_s: float | None = None
    """Seconds from arrival to the first token (TTFT)."""
    token_times: list[float] = dataclasses.field(default_factory=list)
    """Clock time of every token, for inter-token latencies."""
    preemptions: int = 0
    """Times the request was released under KV pressure and recomputed from position 0."""


class EngineHandle(KvCacheHandle):
    """A handle as Ferrum's own KV manager allocates it: the executor knows only its id."""

    def __init__(self, cache_id: str) -> None:
        self._id = cache_id

    def cache_id(self) -> str:
        return self._id

    def block_table(self) -> BlockTable:
        return BlockTable.new(16)

    def device(self) -> Device:
        return Device.CPU

    def num_tokens(self) -> int:
        return 0

    def num_layers(self) -> int:
        return 0

    def num_heads(self) -> int:
        return 0

    def head_dim(self) -> int:
        return 0

    def key_cache(self, layer: int) -> TensorLike | None:
        return None

    def value_cache(self, layer: int) -> TensorLike | None:
        return None

    def clone_handle(self) -> KvCacheHandle:
        return EngineHandle(self._id)

    def stats(self) -> CacheHandleStats:
        return CacheHandleStats(0, 0, 0, 0.0, 0.0)

    def is_valid(self) -> bool:
        return True


@dataclasses.dataclass
class _Running:
    request: Request
    handle: KvCacheHandle | None
    """The sequence's handle (the split path's comes from its prefill)."""
    prefilled: int = 0
    result: Result = dataclasses.field(default_factory=Result)
    context: list[int] = dataclasses.field(default_factory=list)
    """What a prefill computes: the prompt, plus the tokens generated before a preemption."""

    def __post_init__(self) -> None:
        self.context = self.context or list(self.request.prompt)

    @property
    def done(self) -> bool:
        return len(self.result.tokens) >= self.request.max_new_tokens

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.context)

    def restart(self) -> None:
        """Released: the next prefill recomputes prompt + generated tokens from 0."""
        self.context = [*self.request.prompt, *self.result.tokens]
        self.prefilled = 0
        self.result.preemptions += 1


def _greedy(logits) -> int:
    """The token of an answer: `[token_id]` from a `GreedyArgmax` item, else the argmax."""
    logits = np.asarray(logits)
    return int(logits[0]) if logits.size == 1 else int(np.argmax(logits))


def _admit(
    waiting: list[_Running], running: dict, capacity: int, now: float, held: bool
) -> list[_Running]:
    """Arrived requests, in order, while rows are free. After a deferral (`held`) none while
    others run, and one alone otherwise: it must fit by itself or the pool is too small."""
    admitted: list[_Running] = []
    while waiting and waiting[0].request.arrival <= now and len(running) + len(admitted) < capacity:
        if held and (running or admitted):
            break
        admitted.append(waiting.pop(0))
    return admitted


def _pressure(error: FerrumError, running: dict) -> bool:
    """A `resource_exhausted` the loop can act on: others run, so pages will come back."""
    return error.kind is ErrorKind.RESOURCE_EXHAUSTED and len(running) > 1


async def run_unified(
    executor,
    requests: Sequence[Request],
    *,
    token_budget: int = 256,
    decode_chunk: int = 64,
    prefill_chunk: int = 128,
    greedy_on_device: bool = True,
) -> dict[str, Result]:
    """Serves `requests` through `executor.unified_decode`; results by request id.

    `greedy_on_device=False` asks for full logits and picks the argmax here (the 0.7 way).
    """
    policy = LogitsReturnPolicy.GreedyArgmax() if greedy_on_device else None
    reserve = getattr(executor, "reserve_kv_slots", None)
    waiting = [_Running(r, EngineHandle(r.id)) for r in sorted(requests, key=lambda r: r.arrival)]
    running: dict[str, _Running] = {}
    results: dict[str, Result] = {}
    held = False  # after a deferral, admit no one until a request finishes
    start = time.perf_counter()
    while waiting or running:
        now = time.perf_counter() - start
        for r in _admit(waiting, running, executor.max_batch_size, now, held):
            running[r.request.id] = r
        if not running:
            time.sleep(max(waiting[0].request.arrival - now, 0.0))
            continue
        items, owners = _batch(running, token_budget, decode_chunk, prefill_chunk, policy)
        try:
            if reserve is not None:
                reserve([_slot(item) for item in items])
            outputs = await executor.unified_decode(UnifiedBatch(items))
        except FerrumError as e:
            if not _pressure(e, running):
                raise
            held = True
            deferred = [r for r, n in owners if n]
            if not deferred:  # decodes alone do not fit: preempt the newest
                deferred = [list(running.values())[-1]]
            for r in reversed(deferred):
                executor.release_cache(r.request.id)
                r.restart()
                del running[r.request.id]
                waiting.insert(0, r)
            continue
        clock = time.perf_counter() - start
        for (r, n), logits in zip(owners, outputs, strict=True):
            r.prefilled += n
            if logits is None:
                continue
            _emit(r, _greedy(logits), clock)
        for r in [r for r in running.values() if r.done]:
            executor.release_cache(r.request.id)
            results[r.request.id] = running.pop(r.request.id).result
            held = False
    return results


def _batch(
    running: dict[str, _Running],
    token_budget: int,
    decode_chunk: int,
    prefill_chunk: int,
    policy: LogitsReturnPolicy | None,
) -> tuple[list[UnifiedBatchItem], list[tuple[_Running, int]]]:
    """One iteration's items: prefill chunks under the budget, then one decode per running
    request; with each item its owner and the prompt tokens it advances."""
    final_policy = {"logits_policy": policy} if policy is not None else {}
    decoding = [r for r in running.values() if r.decoding]
    items, owners, budget = [], [], token_budget
    for r in running.values():
        if r.decoding or budget == 0:
            continue
        cap = decode_chunk if decoding or r.prefilled else prefill_chunk
        n = min(cap, budget, len(r.context) - r.prefilled)
        chunk = r.context[r.prefilled : r.prefilled + n]
        final = r.prefilled + n == len(r.context)
        # Ferrum sends the known context (prompt + generated) as the admission bound; the
        # key is dropped when decodes share the batch (ENGINE-NOTES, BA:372-374).
        metadata = {} if decoding else {ADMISSION_KEY: len(r.context)}
        items.append(
            UnifiedBatchItem(
                r.request.id,
                chunk,
                r.handle,
                r.prefilled,
                final,
                metadata,
                **(final_policy if final else {}),
            )
        )
        owners.append((r, n))
        budget -= n
    for r in decoding:
        position = len(r.request.prompt) + len(r.result.tokens) - 1
        items.append(
            UnifiedBatchItem(
                r.request.id, [r.result.tokens[-1]], r.handle, position, True, **final_policy
            )
        )
        owners.append((r, 0))
    return items, owners


def _slot(item: UnifiedBatchItem) -> KvSlotRequest:
    """Ferrum main's reservation for one item (IN:53-79): its target length, and the
    admission bound of its metadata, never below the target."""
    target = item.pos_offset + len(item.q_tokens)
    bound = item.metadata.get(ADMISSION_KEY)
    return KvSlotRequest(item.seq_id, target, None if bound is None else max(bound, target))


async def run_split(executor, requests: Sequence[Request]) -> dict[str, Result]:
    """Serves `requests` the 0.6 way: a `batch_prefill` per new request, then one
    `batch_decode` of every running request per iteration. Under KV pressure a prefill waits
    until a request finishes, and a decode batch that does not fit preempts its newest
    request, recomputed later from its prompt and generated tokens."""
    waiting = [_Running(r, None) for r in sorted(requests, key=lambda r: r.arrival)]
    running: dict[str, _Running] = {}
    results: dict[str, Result] = {}
    held = False
    start = time.perf_counter()
    while waiting or running:
        now = time.perf_counter() - start
        admitted = _admit(waiting, running, executor.max_batch_size, now, held)
        if not running and not admitted:
            time.sleep(max(waiting[0].request.arrival - now, 0.0))
            continue
        for i, r in enumerate(admitted):
            try:
                (out,) = await executor.batch_prefill(
                    [PrefillInput(np.asarray([r.context], np.int32))]
                )
            except FerrumError as e:
                if not _pressure(e, {**running, r.request.id: r}):
                    raise
                held = True
                waiting[:0] = admitted[i:]
                break
            r.handle, r.prefilled = out.kv_cache, len(r.context)
            running[r.request.id] = r
            _emit(r, out.last_token_logits().argmax_last_dim_u32()[0], time.perf_counter() - start)
        decoding = [r for r in running.values() if not r.done]
        if decoding:
            inputs = [
                DecodeInput(np.asarray([[r.result.tokens[-1]]], np.int32), r.handle)
                for r in decoding
            ]
            try:
                outputs = await executor.batch_decode(inputs)
            except FerrumError as e:
                if not _pressure(e, running):
                    raise
                held = True
                victim = running.pop(decoding[-1].request.id)
                executor.release_cache(victim.handle.cache_id())
                victim.restart()
                waiting.insert(0, victim)
                continue
            clock = time.perf_counter() - start
            for r, out in zip(decoding, outputs, strict=True):
                _emit(r, out.logits.argmax_last_dim_u32()[0], clock)
        for r in [r for r in running.values() if r.done]:
            executor.release_cache(r.handle.cache_id())
            results[r.request.id] = running.pop(r.request.id).result
            held = False
    return results


def _emit(r: _Running, token: int, clock: float) -> None:
    result = r.result
    if result.first_token_s is None:
        result.first_token_s = clock - r.request.arrival
    result.tokens.append(int(token))
    result.token_times.append(clock)


def summary(results: dict[str, Result], wall_s: float) -> dict[str, float]:
    """`serve_tok_s`, `ttft_p50_s`, `ttft_p99_s`, `itl_p50_s`, `itl_p99_s` of one run."""
    tokens = sum(len(r.tokens) for r in results.values())
    ttft = [r.first_token_s for r in results.values()]
    itl = [float(d) for r in results.values() for d in np.diff(r.token_times)]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else 0.0
    return {
        "serve_tok_s": tokens / wall_s,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "output_tokens": tokens,
        "wall_s": wall_s,
    }
