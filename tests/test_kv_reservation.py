"""Ferrum main's KV slot reservation on the page pool: `reserve_kv_slots`,
`kv_slot_capacity_snapshot` and the metadata bounds of `unified_decode` items."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from conftest import params_from_hf, tiny_hf_model

from ferrum_jax.engine_loop import EngineHandle
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.interfaces import KvSlotRequest, UnifiedBatch, UnifiedBatchItem

PAGE, MAX_LEN = 16, 128
ADMISSION = re.compile(
    r"^paged KV admission: need (\d+) admission blocks \((\d+) immediate\) but only (\d+) free$"
)
"""What Ferrum main's engine parses (continuous_engine inner.rs:21-39)."""


@pytest.fixture(scope="module")
def model():
    return params_from_hf(tiny_hf_model("llama", num_hidden_layers=2))


def make(model, pages: int = 8, **kwargs) -> JaxModelExecutor:
    config, graphdef, params = model
    return JaxModelExecutor(
        config,
        graphdef,
        params,
        max_batch_size=4,
        max_sequence_length=MAX_LEN,
        block_size=PAGE,
        max_kv_tokens=pages * PAGE,
        max_num_batched_tokens=64,
        **kwargs,
    )


def step(executor, seq_id: str, tokens: list[int], offset: int = 0, **metadata) -> np.ndarray:
    item = UnifiedBatchItem(seq_id, tokens, EngineHandle(seq_id), offset, True, dict(metadata))
    (logits,) = asyncio.run(executor.unified_decode(UnifiedBatch([item])))
    return np.asarray(logits)


def free(executor) -> int:
    return executor.kv_slot_capacity_snapshot().free_blocks


PROMPT = [(5 * i) % 200 + 3 for i in range(20)]


def test_reserve_creates_allocates_target_only_and_is_idempotent(model):
    executor, twin = make(model), make(model)
    snapshot = executor.kv_slot_capacity_snapshot()
    assert (snapshot.block_size, snapshot.total_blocks, snapshot.free_blocks) == (PAGE, 8, 8)
    got = executor.reserve_kv_slots([KvSlotRequest("a", 20, admission_target_len=90)])
    assert (got.block_size, got.total_blocks) == (PAGE, 8)
    assert (got.free_blocks_before, got.free_blocks_after) == (8, 6)
    (a,) = got.allocations
    assert (a.cache_id, a.blocks_before, a.blocks_after, a.new_blocks) == ("a", 0, 2, 2)
    again = executor.reserve_kv_slots([KvSlotRequest("a", 20), KvSlotRequest("a", 3)])
    assert again.allocations[0].new_blocks == 0 and free(executor) == 6
    # The reserved sequence is filled from position 0 with its own pages: no more taken,
    # the same logits as a sequence that was never reserved.
    np.testing.assert_array_equal(step(executor, "a", PROMPT), step(twin, "a", PROMPT))
    assert free(executor) == 6
    np.testing.assert_array_equal(step(executor, "a", [9], 20), step(twin, "a", [9], 20))
    executor.release_cache("a")
    assert free(executor) == 8


def test_duplicates_merge_to_the_largest_bounds(model):
    executor = make(model)
    got = executor.reserve_kv_slots(
        [KvSlotRequest("x", 5), KvSlotRequest("y", 1), KvSlotRequest("x", 40, 41)]
    )
    assert [(a.cache_id, a.new_blocks) for a in got.allocations] == [("x", 3), ("y", 1)]
    assert free(executor) == 4


def test_a_reservation_that_does_not_fit_fails_whole_and_changes_nothing(model):
    executor, twin = make(model), make(model)
    step(executor, "live", PROMPT)
    step(twin, "live", PROMPT)
    before = executor.cache_metrics_snapshot()
    # 4 immediate pages fit the 6 free, but the admission bound needs 7.
    with pytest.raises(FerrumError) as e:
        executor.reserve_kv_slots(
            [KvSlotRequest("n1", 32), KvSlotRequest("n2", 32, admission_target_len=80)]
        )
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert ADMISSION.match(e.value.message).groups() == ("7", "4", "6"), e.value.message
    assert executor.cache_metrics_snapshot() == before and free(executor) == 6
    for seq in ("n1", "n2"):  # nothing was created
        with pytest.raises(FerrumError):
            step(executor, seq, [1, 2], 2)
    np.testing.assert_array_equal(step(executor, "live", [7], 20), step(twin, "live", [7], 20))


def test_admission_bound_is_checked_not_allocated(model):
    executor = make(model)
    got = executor.reserve_kv_slots([KvSlotRequest("a", 1, admission_target_len=8 * PAGE)])
    assert got.allocations[0].new_blocks == 1 and free(executor) == 7
    with pytest.raises(FerrumError) as e:
        executor.reserve_kv_slots([KvSlotRequest("b", 1, admission_target_len=8 * PAGE)])
    assert ADMISSION.match(e.value.message).groups() == ("8", "1", "7")


def test_unified_items_honour_the_admission_and_capacity_hint_keys(model):
    executor = make(model)
    step(executor, "z", PROMPT)
    with pytest.raises(FerrumError) as e:
        step(executor, "a", PROMPT, ferrum_kv_admission_target_len=8 * PAGE)
    assert ADMISSION.match(e.value.message).groups() == ("8", "2", "6")
    assert free(executor) == 6
    step(executor, "a", PROMPT, ferrum_kv_admission_target_len=6 * PAGE)
    assert free(executor) == 4  # checked, not allocated
    step(executor, "b", PROMPT, ferrum_kv_capacity_hint=2 * PAGE + 1)
    assert free(executor) == 1  # pre-sized to the hint
    step(executor, "c", [1], ferrum_kv_capacity_hint=10 * PAGE)
    assert free(executor) == 0  # a hint the pool cannot hold: only what the tokens need
    with pytest.raises(FerrumError, match="ferrum_kv_capacity_hint"):
        step(executor, "d", [1], ferrum_kv_capacity_hint=-1)


def test_a_released_id_prefilled_again_from_zero_is_a_fresh_sequence(model):
    """The engine's recompute after preemption: same seq_id, prompt + generated from 0."""
    executor, twin = make(model), make(model)
    step(executor, "p", PROMPT)
    step(executor, "p", [11], 20)
    executor.release_cache("p")
    executor.reserve_kv_slots([KvSlotRequest("p", 21)])
    np.testing.assert_array_equal(
        step(executor, "p", [*PROMPT, 11]), step(twin, "p", [*PROMPT, 11])
    )


@pytest.mark.parametrize(
    ("requests", "kind"),
    [
        (KvSlotRequest("a", 1), ErrorKind.INVALID_PARAMETER),
        (["a"], ErrorKind.INVALID_PARAMETER),
        ([KvSlotRequest("", 1)], ErrorKind.INVALID_PARAMETER),
        ([KvSlotRequest("a", -1)], ErrorKind.INVALID_PARAMETER),
        ([KvSlotRequest("a", True)], ErrorKind.INVALID_PARAMETER),
        ([KvSlotRequest("a", 1, 2.5)], ErrorKind.INVALID_PARAMETER),
        ([KvSlotRequest("a", MAX_LEN + 1)], ErrorKind.REQUEST_VALIDATION),
        ([KvSlotRequest(f"s{i}", 1) for i in range(5)], ErrorKind.RESOURCE_EXHAUSTED),
    ],
)
def test_bad_requests_are_refused_whole(model, requests, kind):
    executor = make(model)
    with pytest.raises(FerrumError) as e:
        executor.reserve_kv_slots(requests)
    assert e.value.kind is kind
    assert free(executor) == 8 and executor.cache_metrics_snapshot()["pages_used"] == 0


def test_after_shutdown_the_methods_fail_clearly(model):
    executor = make(model)
    asyncio.run(executor.shutdown())
    with pytest.raises(FerrumError, match="shut down"):
        executor.reserve_kv_slots([KvSlotRequest("a", 1)])
    with pytest.raises(FerrumError, match="shut down"):
        executor.kv_slot_capacity_snapshot()


# ---------------------------------------------------------------------------------------------
# The engine-loop replica under pool pressure (Ferrum main: defer, preempt, recompute)


def test_replica_serves_48_requests_through_a_pool_that_holds_12(model):
    """48 requests of 200-600 tokens (prompt + output) through a pool of 12 x 400 tokens
    with 16 rows: prefills are deferred and requests preempted, recomputed from 0 with their
    generated tokens, and every request's greedy tokens equal its isolated run; no page is
    left held at the end. The replica asks for `GreedyArgmax` (token ids, not logits)."""
    from ferrum_jax import engine
    from ferrum_jax.engine_loop import Request, run_unified

    long_model = params_from_hf(tiny_hf_model("llama", max_position_embeddings=640))
    config, graphdef, params = long_model
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(48):
        new = int(rng.integers(4, 24))
        length = int(rng.integers(200, 600)) - new
        reqs.append(Request(f"r{i}", rng.integers(3, 256, length).tolist(), new))
    executor = JaxModelExecutor(
        config,
        graphdef,
        params,
        max_batch_size=16,
        max_sequence_length=640,
        block_size=PAGE,
        max_kv_tokens=12 * 400,
        max_num_batched_tokens=256,
    )
    results = asyncio.run(
        run_unified(executor, reqs, token_budget=256, decode_chunk=64, prefill_chunk=256)
    )
    assert sum(r.preemptions for r in results.values()) > 0, "the pool never ran short"
    for r in reqs:  # one generate length: a compile per prompt bucket, not per request
        out = engine.generate(
            graphdef, params, np.asarray([r.prompt]), max_new_tokens=24, stop_tokens=[]
        )
        want = np.asarray(out.tokens[0]).tolist()[: r.max_new_tokens]
        assert results[r.id].tokens == want, r.id
    metrics = executor.cache_metrics_snapshot()
    assert metrics["pages_used"] == 0 and free(executor) == metrics["pages_total"]
    # Greedy answers were token ids: far fewer bytes than a vocabulary per final item.
    assert metrics["logits_bytes_to_host"] < metrics["steps"] * 16 * 256 * 4 // 8


def test_split_path_defers_and_preempts_under_pressure(model):
    """The 0.6 split loop on a pool of 6 x 100 tokens with 8 rows: prefills wait, decodes
    preempt, and every request's greedy tokens equal its isolated run."""
    from ferrum_jax import engine
    from ferrum_jax.engine_loop import Request, run_split

    config, graphdef, params = model
    rng = np.random.default_rng(1)
    reqs = [
        Request(f"r{i}", rng.integers(3, 256, int(rng.integers(40, 90))).tolist(), 12)
        for i in range(12)
    ]
    executor = JaxModelExecutor(
        config,
        graphdef,
        params,
        max_batch_size=8,
        max_sequence_length=MAX_LEN,
        block_size=PAGE,
        max_kv_tokens=6 * 100,
        max_num_batched_tokens=128,
    )
    results = asyncio.run(run_split(executor, reqs))
    assert sum(r.preemptions for r in results.values()) > 0, "the pool never ran short"
    for r in reqs:
        out = engine.generate(
            graphdef, params, np.asarray([r.prompt]), max_new_tokens=12, stop_tokens=[]
        )
        assert results[r.id].tokens == np.asarray(out.tokens[0]).tolist(), r.id
    assert executor.cache_metrics_snapshot()["pages_used"] == 0
