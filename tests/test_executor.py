"""JaxModelExecutor: continuous batching, speculative decode, errors, status, soak, concurrency."""

from __future__ import annotations

import asyncio
import os
import random

import jax
import numpy as np
import pytest
from conftest import count_compiles, params_from_hf, run_on_mesh, tiny_hf_model

from ferrum_jax import engine
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.executor import JaxKvCacheHandle, JaxModelExecutor
from ferrum_jax.interfaces import (
    AttentionType,
    DataType,
    DecodeInput,
    ExecutorMetrics,
    ExecutorState,
    ExecutorStatus,
    PrefillInput,
    UnifiedBatch,
    UnifiedBatchItem,
)
from ferrum_jax.tensor import JaxTensor

POOL, MAX_LEN = 4, 64
MESH = os.environ.get("FERRUM_TEST_MESH")
"""`data,model`: run the executor on that mesh (set by `test_continuous_batching_on_mesh`)."""


@pytest.fixture(scope="module")
def model():
    return params_from_hf(tiny_hf_model("llama", num_hidden_layers=2))


def make_executor(model, **kwargs) -> JaxModelExecutor:
    config, graphdef, params = model
    kwargs = {"max_batch_size": POOL, "max_sequence_length": MAX_LEN, **kwargs}
    if MESH:
        from ferrum_jax.sharding import make_mesh

        data, model_axis = (int(x) for x in MESH.split(","))
        kwargs["mesh"] = make_mesh(data=data, model=model_axis)
    return JaxModelExecutor(config, graphdef, params, **kwargs)


@pytest.fixture(scope="module")
def isolated(model):
    """Greedy continuation of one prompt run alone through the functional API (memoised)."""
    _, graphdef, params = model
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def run(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in memo:
            out = engine.generate(
                graphdef, params, np.asarray([prompt]), max_new_tokens=n, stop_tokens=[]
            )
            memo[key] = np.asarray(out.tokens[0]).tolist()
        return memo[key]

    return run


def run(coro):
    return asyncio.run(coro)


def next_token(logits) -> list[int]:
    return logits.argmax_last_dim_u32()


def prompts(rng: random.Random, n: int, vocab: int = 256) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 24))] for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Continuous batching


def test_continuous_batching_matches_isolated_runs(model, isolated):
    rng = random.Random(0)
    requests = prompts(rng, 12)
    budgets = [rng.randrange(3, 14) for _ in requests]
    executor = make_executor(model)

    async def serve() -> dict[int, list[int]]:
        waiting = list(range(len(requests)))
        live: dict[int, tuple] = {}  # request -> (handle, next token)
        done: dict[int, list[int]] = {}
        step = 0
        while waiting or live:
            # Admit at most one new request every other step, so joins interleave with decodes.
            if waiting and len(live) < POOL and step % 2 == 0:
                r = waiting.pop(0)
                out = await executor.prefill(PrefillInput(np.asarray([requests[r]])))
                token = next_token(out.last_token_logits())[0]
                done[r] = [token]
                live[r] = (out.kv_cache, token)
            finished = [r for r in live if len(done[r]) >= budgets[r]]
            for r in finished:
                executor.release_cache(live.pop(r)[0].cache_id())
            if live:
                order = list(live)
                inputs = [DecodeInput(np.asarray([[live[r][1]]]), live[r][0]) for r in order]
                outs = await executor.batch_decode(inputs)
                for r, out in zip(order, outs, strict=True):
                    token = next_token(out.logits)[0]
                    done[r].append(token)
                    live[r] = (live[r][0], token)
            step += 1
        return done

    done = run(serve())
    for r, prompt in enumerate(requests):
        assert done[r][: budgets[r]] == isolated(prompt, budgets[r])[: budgets[r]], r
    status = executor.status()
    assert status.current_batch_size == 0
    assert status.prefill_operations == len(requests)
    if MESH:
        (out,) = run(executor.batch_prefill([PrefillInput(np.asarray([[5, 6]]))]))
        assert len(out.kv_cache.key_cache(0).array.sharding.device_set) == 8
        assert len(executor.model.params["embed"][...].sharding.device_set) == 8


def test_continuous_batching_on_mesh():
    """The same equivalence test, unchanged, with the executor on a (2, 4) mesh of 8 devices."""
    run_on_mesh(f"{__file__}::test_continuous_batching_matches_isolated_runs")


def test_batch_prefill_is_one_forward_and_matches_single(model):
    executor = make_executor(model)
    a, b = [5, 6, 7], [9, 10, 11, 12, 13, 14, 15]
    before = executor.status().prefill_operations
    outs = run(
        executor.batch_prefill([PrefillInput(np.asarray([a])), PrefillInput(np.asarray([b]))])
    )
    assert executor.status().prefill_operations == before + 1
    single = make_executor(model)
    ref = run(single.prefill(PrefillInput(np.asarray([b]))))
    np.testing.assert_allclose(
        np.asarray(outs[1].logits.array), np.asarray(ref.logits.array), atol=1e-5
    )
    assert outs[0].logits.shape == (1, 3, 256)
    assert outs[0].kv_cache.num_tokens() == 3


def test_multi_row_prefill_with_attention_mask(model, isolated):
    executor = make_executor(model)
    ids = np.asarray([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = np.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = run(executor.prefill(PrefillInput(ids, attention_mask=mask)))
    handle = out.kv_cache
    assert handle.row_lengths() == [3, 5]
    tokens = next_token(out.last_token_logits())
    assert tokens == [isolated([5, 6, 7], 1)[0], isolated([8, 9, 10, 11, 12], 1)[0]]
    out2 = run(executor.decode(DecodeInput(np.asarray([[t] for t in tokens]), handle)))
    assert next_token(out2.logits) == [
        isolated([5, 6, 7], 2)[1],
        isolated([8, 9, 10, 11, 12], 2)[1],
    ]


def test_full_pool_decode_uses_slot_order(model, isolated):
    executor = make_executor(model)
    reqs = [[3 + i, 40 + i, 7] for i in range(POOL)]
    outs = [run(executor.prefill(PrefillInput(np.asarray([p])))) for p in reqs]
    tokens = [next_token(o.last_token_logits())[0] for o in outs]
    order = [2, 0, 3, 1]  # not slot order
    decoded = run(
        executor.batch_decode(
            [DecodeInput(np.asarray([[tokens[i]]]), outs[i].kv_cache) for i in order]
        )
    )
    for i, out in zip(order, decoded, strict=True):
        assert next_token(out.logits)[0] == isolated(reqs[i], 2)[1]


@pytest.mark.parametrize("n", [3, 5, 6, 7])
def test_odd_row_batches_next_to_a_live_sequence(model, isolated, n):
    """`batch_prefill` and `batch_decode` of 3, 5, 6 and 7 rows run in a 4- or 8-row bucket,
    so padding rows execute; a live sequence in slot 0 stays bit-identical to a twin's.

    Mutation guarded: executor prefill padding rows written to slot 0 instead of dropped.
    """
    executor, twin = make_executor(model, max_batch_size=8), make_executor(model, max_batch_size=8)
    live = [5, 6, 7, 8, 9, 10]  # six tokens in slot 0
    (a, ta), (b, tb) = _start(executor, live), _start(twin, live)
    reqs = [[3 + i, 40 + i, 7, 11 + i][: 1 + i % 4] for i in range(n)]
    outs = run(executor.batch_prefill([PrefillInput(np.asarray([r])) for r in reqs]))
    tokens = [next_token(o.last_token_logits())[0] for o in outs]
    assert tokens == [isolated(r, 1)[0] for r in reqs]
    assert a.num_tokens() == len(live)
    decoded = run(
        executor.batch_decode(
            [DecodeInput(np.asarray([[t]]), o.kv_cache) for t, o in zip(tokens, outs, strict=True)]
        )
    )
    assert [next_token(d.logits)[0] for d in decoded] == [isolated(r, 2)[1] for r in reqs]
    got = run(executor.decode(DecodeInput(np.asarray([[ta]]), a)))
    want = run(twin.decode(DecodeInput(np.asarray([[tb]]), b)))
    np.testing.assert_array_equal(np.asarray(got.logits.array), np.asarray(want.logits.array))


def test_same_handle_twice_in_batch_decode_is_refused(model):
    """Mutation guarded: the executor's "same handle twice in batch_decode" check removed."""
    executor = make_executor(model)
    handle, token = _start(executor, [5, 6, 7])
    twice = [DecodeInput(np.asarray([[token]]), handle)] * 2
    with pytest.raises(FerrumError) as e:
        run(executor.batch_decode(twice))
    assert e.value.kind is ErrorKind.INVALID_PARAMETER and handle.cache_id() in str(e.value)
    assert handle.num_tokens() == 3 and executor.status().decode_operations == 0


@pytest.mark.parametrize(
    ("mask", "kind"),
    [
        ([[0, 0, 1, 1], [1, 1, 1, 1]], ErrorKind.UNSUPPORTED),  # left padding
        ([[1, 0, 1, 0], [1, 1, 1, 1]], ErrorKind.UNSUPPORTED),  # holes
        ([[1, 1, 1], [1, 1, 1]], ErrorKind.INVALID_PARAMETER),  # wrong shape
        ([[0, 0, 0, 0], [1, 1, 1, 1]], ErrorKind.REQUEST_VALIDATION),  # an all-zero row
    ],
    ids=["left_padded", "holes", "wrong_shape", "all_zero_row"],
)
def test_attention_masks_other_than_right_padding_are_refused(model, mask, kind):
    """Mutation guarded: the executor's left-padded attention mask check removed."""
    executor = make_executor(model)
    ids = np.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    with pytest.raises(FerrumError) as e:
        run(executor.prefill(PrefillInput(ids, attention_mask=np.asarray(mask))))
    assert e.value.kind is kind, e.value
    assert executor.status().current_batch_size == 0
    assert executor.status().prefill_operations == 0


def test_position_ids_must_match_what_the_cache_holds(model):
    """Prefill `position_ids` 0..s-1 and decode `position_ids` equal to the cached lengths are
    accepted (and change nothing); any other value is refused before device work.

    Mutation guarded: the executor's decode `position_ids` mismatch check removed.
    """
    executor, plain = make_executor(model), make_executor(model)
    ids = np.asarray([[5, 6, 7, 8]])
    with_positions = run(executor.prefill(PrefillInput(ids, position_ids=np.arange(4)[None])))
    without = run(plain.prefill(PrefillInput(ids)))
    np.testing.assert_array_equal(
        np.asarray(with_positions.logits.array), np.asarray(without.logits.array)
    )
    with pytest.raises(FerrumError) as e:
        run(executor.prefill(PrefillInput(ids, position_ids=np.arange(1, 5)[None])))
    assert e.value.kind is ErrorKind.INVALID_PARAMETER and "starts at 0" in str(e.value)
    handle = with_positions.kv_cache
    token = next_token(with_positions.last_token_logits())[0]
    for wrong in ([[3]], [[5]], [[4], [4]]):
        with pytest.raises(FerrumError) as e:
            run(executor.decode(DecodeInput(np.asarray([[token]]), handle, np.asarray(wrong))))
        assert e.value.kind is ErrorKind.INVALID_PARAMETER and "position_ids" in str(e.value)
    assert handle.num_tokens() == 4 and executor.status().decode_operations == 0
    out = run(executor.decode(DecodeInput(np.asarray([[token]]), handle, np.asarray([[4]]))))
    ref = run(plain.decode(DecodeInput(np.asarray([[token]]), without.kv_cache)))
    np.testing.assert_array_equal(np.asarray(out.logits.array), np.asarray(ref.logits.array))


def test_warmup_while_sequences_are_live_changes_nothing(model):
    """`warmup()` runs every program on padding rows: live sequences are untouched."""
    executor, twin = make_executor(model), make_executor(model)
    started = [_start(executor, p) for p in ([5, 6, 7], [8, 9])]
    twin_started = [_start(twin, p) for p in ([5, 6, 7], [8, 9])]
    run(executor.warmup())
    for (h, t), (th, tt) in zip(started, twin_started, strict=True):
        got = run(executor.decode(DecodeInput(np.asarray([[t]]), h)))
        want = run(twin.decode(DecodeInput(np.asarray([[tt]]), th)))
        np.testing.assert_array_equal(np.asarray(got.logits.array), np.asarray(want.logits.array))


# ---------------------------------------------------------------------------------------------
# Handles


def test_handle_reports_real_slot_contents(model):
    config, graphdef, params = model
    executor = make_executor(model)
    prompt = [5, 6, 7, 8, 9]
    out = run(executor.prefill(PrefillInput(np.asarray([prompt]))))
    handle = out.kv_cache
    cache = engine.init_cache(config, 1, MAX_LEN)
    _, cache = engine.prefill(graphdef, params, cache, np.asarray([prompt]))
    for layer in range(config.num_layers):
        key = np.asarray(handle.key_cache(layer).array)
        value = np.asarray(handle.value_cache(layer).array)
        assert key.shape == (1, config.num_kv_heads, len(prompt), config.head_dim)
        # Other token buckets than the functional prefill's: equal up to float rounding.
        want_k, want_v = (
            np.asarray(x[layer][:, :, : len(prompt)]) for x in (cache.keys, cache.values)
        )
        np.testing.assert_allclose(key, want_k, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(value, want_v, rtol=1e-5, atol=1e-6)
    assert handle.num_tokens() == 5
    assert handle.num_layers() == config.num_layers
    assert handle.num_heads() == config.num_kv_heads
    assert handle.head_dim() == config.head_dim
    table = handle.block_table()
    assert table.sequence_length == 5 and table.num_blocks() == 1
    assert table.block_size == executor.block_size
    assert all(
        0 <= p < executor.cache_metrics_snapshot()["pages_total"] for p in table.physical_blocks
    )
    stats = handle.stats()
    assert stats.tokens_stored == 5
    # Memory is held in whole pages.
    assert (
        stats.memory_bytes == table.num_blocks() * executor.block_size * executor.kv_bytes_per_token
    )
    # Utilization of the pages the handle holds, not of the longest sequence allowed.
    assert stats.utilization == pytest.approx(5 / (table.num_blocks() * executor.block_size))
    assert handle.is_valid() and handle.clone_handle().cache_id() == handle.cache_id()
    with pytest.raises(FerrumError) as e:
        handle.key_cache(config.num_layers)
    assert e.value.kind is ErrorKind.INVALID_PARAMETER
    executor.release_cache(handle.cache_id())
    assert not handle.is_valid()


def test_prefill_into_given_handle_reuses_its_slot(model, isolated):
    executor = make_executor(model)
    first = run(executor.prefill(PrefillInput(np.asarray([[5, 6, 7]]))))
    free_before = executor.status().current_batch_size
    out = run(executor.prefill(PrefillInput(np.asarray([[9, 8]])).with_kv_cache(first.kv_cache)))
    assert out.kv_cache.cache_id() == first.kv_cache.cache_id()
    assert executor.status().current_batch_size == free_before
    assert out.kv_cache.num_tokens() == 2
    assert next_token(out.last_token_logits())[0] == isolated([9, 8], 1)[0]


# ---------------------------------------------------------------------------------------------
# Speculative decoding


def _start(executor, prompt):
    out = run(executor.prefill(PrefillInput(np.asarray([prompt]))))
    return out.kv_cache, next_token(out.last_token_logits())[0]


def test_speculative_accepts_own_greedy_drafts(model, isolated):
    executor = make_executor(model)
    prompt = [7, 8, 9, 10]
    greedy = isolated(prompt, 12)
    handle, token = _start(executor, prompt)
    out = run(
        executor.speculative_decode(DecodeInput(np.asarray([[token]]), handle), greedy[1:6], 1.0)
    )
    assert out.accepted_tokens == greedy[1:6] and out.acceptance_count == 5
    assert handle.num_tokens() == len(prompt) + 6
    assert next_token(out.next_logits)[0] == greedy[6]
    # Plain decoding continues exactly as greedy.
    token, tokens = greedy[6], []
    for _ in range(4):
        d = run(executor.decode(DecodeInput(np.asarray([[token]]), handle)))
        token = next_token(d.logits)[0]
        tokens.append(token)
    assert tokens == greedy[7:11]


def test_speculative_stops_at_first_bad_draft(model, isolated):
    executor = make_executor(model)
    prompt = [11, 12, 13]
    greedy = isolated(prompt, 12)
    handle, token = _start(executor, prompt)
    drafts = list(greedy[1:6])
    drafts[2] = (drafts[2] + 1) % 256  # corrupt the third draft
    out = run(executor.speculative_decode(DecodeInput(np.asarray([[token]]), handle), drafts, 1.0))
    assert out.accepted_tokens == greedy[1:3] and out.acceptance_count == 2
    assert handle.num_tokens() == len(prompt) + 3  # input token + 2 accepted
    assert next_token(out.next_logits)[0] == greedy[3]
    # Rejected positions were rolled back: decoding continues exactly as greedy.
    d = run(executor.decode(DecodeInput(np.asarray([[greedy[3]]]), handle)))
    assert next_token(d.logits)[0] == greedy[4]
    ref = make_executor(model)
    ref_handle, _ = _start(ref, prompt)
    for t in greedy[:4]:
        ref_out = run(ref.decode(DecodeInput(np.asarray([[t]]), ref_handle)))
    np.testing.assert_allclose(
        np.asarray(d.logits.array), np.asarray(ref_out.logits.array), atol=1e-5
    )


def test_speculative_threshold_between_0_and_1(model):
    """A threshold in (0, 1) accepts a non-argmax draft at least that likely and rejects a
    less likely one; at 0.5 no non-argmax draft can pass (its probability is below the
    argmax's, so below 0.5).

    Mutation guarded: speculative acceptance threshold ignored for values in (0, 1).
    """
    _, graphdef, params = model
    executor = make_executor(model)
    prompt = [21, 22, 23]
    handles = [_start(executor, prompt) for _ in range(3)]
    token = handles[0][1]
    logits = np.asarray(engine.forward(graphdef, params, np.asarray([[*prompt, token]])))[0, -1]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    second, unlikely = order[1], order[-1]
    assert probs[unlikely] < 0.5 * probs[second] and probs[second] < 0.5
    threshold = 0.99 * float(probs[second])  # 1% below: robust to rounding between programs

    def speculate(handle, draft, threshold):
        inp = DecodeInput(np.asarray([[token]]), handle)
        return run(executor.speculative_decode(inp, [int(draft)], threshold)).accepted_tokens

    assert speculate(handles[0][0], second, threshold) == [second]
    assert speculate(handles[1][0], unlikely, threshold) == []
    assert speculate(handles[2][0], second, 0.5) == []
    assert [h.num_tokens() for h, _ in handles] == [5, 4, 4]


# ---------------------------------------------------------------------------------------------
# Bad input: specific errors, before device work, other sequences untouched


def _snapshot(executor):
    return [np.asarray(x).copy() for x in jax.tree.leaves(executor._pages)]


BAD_CASES = [
    "token_too_large",
    "token_negative",
    "float_ids",
    "empty_prompt",
    "prompt_too_long",
    "decode_past_max",
    "pool_full",
    "unknown_handle",
    "released_handle",
    "batch_mismatch",
    "foreign_handle",
    "bad_draft_token",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_and_changes_nothing(model, case):
    executor, twin = make_executor(model), make_executor(model)
    other = make_executor(model)

    def setup(ex):
        a, ta = _start(ex, [5, 6, 7])
        b, tb = _start(ex, [8, 9])
        return a, ta, b, tb

    a, ta, b, tb = setup(executor)
    ta2, tb2 = ta, tb
    setup(twin)
    full, tf = _start(executor, [30] * (MAX_LEN - 1))
    run(executor.decode(DecodeInput(np.asarray([[tf]]), full)))  # now MAX_LEN tokens
    released, _ = _start(executor, [40, 41])
    executor.release_cache(released.cache_id())
    foreign, _ = _start(other, [1, 2])
    before = _snapshot(executor)
    live_before = {k: list(v.lengths) for k, v in executor._live.items()}

    attempts = {
        "token_too_large": lambda: executor.prefill(PrefillInput(np.asarray([[5, 256]]))),
        "token_negative": lambda: executor.decode(DecodeInput(np.asarray([[-1]]), a)),
        "float_ids": lambda: executor.prefill(PrefillInput(np.asarray([[5.0, 6.0]]))),
        "empty_prompt": lambda: executor.prefill(PrefillInput(np.zeros((1, 0), np.int32))),
        "prompt_too_long": lambda: executor.prefill(
            PrefillInput(np.ones((1, MAX_LEN + 1), np.int32))
        ),
        "decode_past_max": lambda: executor.decode(DecodeInput(np.asarray([[3]]), full)),
        "pool_full": lambda: executor.prefill(PrefillInput(np.ones((2, 3), np.int32))),
        "unknown_handle": lambda: executor.decode(
            DecodeInput(np.asarray([[3]]), type(a)(executor, "nope"))
        ),
        "released_handle": lambda: executor.decode(DecodeInput(np.asarray([[3]]), released)),
        "batch_mismatch": lambda: executor.decode(DecodeInput(np.asarray([[3], [4]]), a)),
        "foreign_handle": lambda: executor.decode(DecodeInput(np.asarray([[3]]), foreign)),
        "bad_draft_token": lambda: executor.speculative_decode(
            DecodeInput(np.asarray([[ta]]), a), [5, 999], 1.0
        ),
    }
    kinds = {
        "token_too_large": ErrorKind.INVALID_PARAMETER,
        "token_negative": ErrorKind.INVALID_PARAMETER,
        "float_ids": ErrorKind.INVALID_PARAMETER,
        "empty_prompt": ErrorKind.REQUEST_VALIDATION,
        "prompt_too_long": ErrorKind.REQUEST_VALIDATION,
        "decode_past_max": ErrorKind.REQUEST_VALIDATION,
        "pool_full": ErrorKind.RESOURCE_EXHAUSTED,
        "unknown_handle": ErrorKind.NOT_FOUND,
        "released_handle": ErrorKind.NOT_FOUND,
        "batch_mismatch": ErrorKind.INVALID_PARAMETER,
        "foreign_handle": ErrorKind.INVALID_PARAMETER,
        "bad_draft_token": ErrorKind.INVALID_PARAMETER,
    }
    ops_before = executor.status().prefill_operations + executor.status().decode_operations
    with pytest.raises(FerrumError) as e:
        run(attempts[case]())
    assert e.value.kind is kinds[case], e.value
    # Nothing ran on the device and no state changed.
    status = executor.status()
    assert status.prefill_operations + status.decode_operations == ops_before
    assert status.state is ExecutorState.READY
    assert {k: list(v.lengths) for k, v in executor._live.items()} == live_before
    for x, y in zip(before, _snapshot(executor), strict=True):
        np.testing.assert_array_equal(x, y)
    # The other live sequences' next logits are bit-identical to a twin that saw no bad input.
    outs = run(
        executor.batch_decode(
            [DecodeInput(np.asarray([[ta2]]), a), DecodeInput(np.asarray([[tb2]]), b)]
        )
    )
    twin_live = list(twin._live)
    ref = run(
        twin.batch_decode(
            [
                DecodeInput(np.asarray([[ta2]]), type(a)(twin, twin_live[0])),
                DecodeInput(np.asarray([[tb2]]), type(a)(twin, twin_live[1])),
            ]
        )
    )
    for x, y in zip(outs, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(x.logits.array), np.asarray(y.logits.array))


def test_release_is_idempotent_and_calls_after_shutdown_fail(model):
    executor = make_executor(model)
    handle, token = _start(executor, [5, 6])
    executor.release_cache(handle.cache_id())
    executor.release_cache(handle.cache_id())
    executor.release_cache("never-existed")
    assert executor.status().current_batch_size == 0
    handle, token = _start(executor, [5, 6])
    run(executor.shutdown())
    status = executor.status()
    assert status.state is ExecutorState.SHUTDOWN and not status.is_ready
    assert status.memory_usage.allocated_bytes == 0
    for call in (
        lambda: executor.prefill(PrefillInput(np.asarray([[1, 2]]))),
        lambda: executor.decode(DecodeInput(np.asarray([[token]]), handle)),
        lambda: executor.forward(np.asarray([[1, 2]])),
        lambda: executor.warmup(),
    ):
        with pytest.raises(FerrumError) as e:
            run(call())
        assert "shut down" in str(e.value)
    assert not handle.is_valid()
    run(executor.shutdown())  # idempotent


# ---------------------------------------------------------------------------------------------
# Forward, warmup, capabilities, status, metrics


def test_forward_matches_functional_and_leaves_pool_alone(model):
    _, graphdef, params = model
    executor = make_executor(model)
    before = _snapshot(executor)
    out = run(executor.forward(JaxTensor(jax.numpy.asarray([[5, 6, 7, 8]]))))
    np.testing.assert_array_equal(
        np.asarray(out.array),
        np.asarray(engine.forward(graphdef, params, np.asarray([[5, 6, 7, 8]]))),
    )
    for x, y in zip(before, _snapshot(executor), strict=True):
        np.testing.assert_array_equal(x, y)


def test_warmup_compiles_every_bucket_then_serving_compiles_nothing(model, isolated):
    """After `warmup()`, a serving mix (prefills of new lengths, chunked prefills, decodes
    of every batch size, unified batches, speculative and verify steps, copy-on-write of a
    shared page) compiles no XLA program at all."""
    executor = make_executor(
        model,
        max_batch_size=4,
        max_sequence_length=48,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
    )
    report = run(executor.warmup())
    assert report["ragged"] == [(t, i) for t in (8, 16, 32, 64) for i in (1, 2, 4) if i <= t]
    assert report["verify"] == [8, 16] and report["copy"] == [1, 2, 4]
    assert report["skipped"] == []
    programs = executor.compiled_programs
    with count_compiles() as compiled:
        handles = [_start(executor, [5] * n) for n in (3, 20)]
        run(executor.batch_decode([DecodeInput(np.asarray([[t]]), h) for h, t in handles]))
        h3, t3 = _start(executor, [6, 7, 8, 9, 10])
        run(
            executor.batch_decode(
                [DecodeInput(np.asarray([[t]]), h) for h, t in [*handles, (h3, t3)]]
            )
        )
        out = run(executor.decode(DecodeInput(np.asarray([[t3]]), h3)))
        token = next_token(out.logits)[0]
        run(executor.speculative_decode(DecodeInput(np.asarray([[token]]), h3), [5, 6, 7], 1.0))
        verified = run(
            executor.forward_verify(
                [DecodeInput(np.asarray([[t]]), handles[0][0]) for t in (1, 2, 3, 4, 5)]
            )
        )
        run(executor.truncate_kv(handles[0][0], 4))
        assert len(verified) == 5
        for h, _ in handles:
            executor.release_cache(h.cache_id())
        # A chunked prefill through the 0.6 API, then one over the prefix cache.
        first = run(executor.prefill(PrefillInput(np.asarray([[9] * 17]))))
        run(
            executor.prefill(
                PrefillInput(
                    np.asarray([[4] * 9]),
                    kv_cache=first.kv_cache,
                    position_ids=np.arange(17, 26)[None],
                )
            )
        )
        shared = run(executor.prefill(PrefillInput(np.asarray([[9] * 17 + [3]]))))
        run(executor.decode(DecodeInput(np.asarray([[3]]), shared.kv_cache)))
        for h in (h3, first.kv_cache, shared.kv_cache):
            executor.release_cache(h.cache_id())
        items = [
            UnifiedBatchItem("u1", [1, 2, 3, 4, 5, 6, 7], None, 0, False),
            UnifiedBatchItem("u2", [8], None, 0, True),
        ]
        run(executor.unified_decode(UnifiedBatch(items)))
        run(executor.unified_decode(UnifiedBatch([UnifiedBatchItem("u1", [1, 2], None, 7, True)])))
    assert compiled == [], compiled
    assert executor.compiled_programs == programs


def test_memory_analysis_runs_once_per_program(model, monkeypatch):
    """XLA's memory analysis of a step program is computed once, not on every step (it cost
    43 ms of a 100 ms step at one row): ten decodes after the first reuse it."""
    calls = []
    analyse = jax.stages.Compiled.memory_analysis

    def counted(self):
        calls.append(self)
        return analyse(self)

    monkeypatch.setattr(jax.stages.Compiled, "memory_analysis", counted)
    executor = make_executor(model, memory_limit_bytes=1 << 30)
    handle, token = _start(executor, [5, 6, 7])
    for _ in range(10):
        out = run(executor.decode(DecodeInput(np.asarray([[token]]), handle)))
        token = next_token(out.logits)[0]
    assert len(calls) == len(executor.compiled_programs) == 1


def test_capabilities_reflect_the_model(model):
    executor = make_executor(model)
    caps = executor.capabilities()
    assert caps.attention_mechanisms == [AttentionType.GROUPED_QUERY, AttentionType.PAGED]
    assert caps.max_batch_size == POOL and caps.max_sequence_length == MAX_LEN
    assert caps.supports_continuous_batching and caps.supports_speculative_decoding
    assert DataType.FP32 in caps.supported_dtypes and DataType.BF16 in caps.supported_dtypes
    config = model[0]
    per_token_layer = 2 * config.num_kv_heads * config.head_dim * 4
    assert caps.memory_requirements.kv_cache_memory_per_token == per_token_layer
    total = caps.memory_requirements.calculate_total_memory(POOL, MAX_LEN, config.num_layers)
    assert total >= executor.status().memory_usage.allocated_bytes
    mqa = params_from_hf(tiny_hf_model("llama", num_key_value_heads=1))
    assert make_executor(mqa).capabilities().attention_mechanisms[0] is AttentionType.MULTI_QUERY
    mha = params_from_hf(tiny_hf_model("llama", num_key_value_heads=4))
    assert make_executor(mha).capabilities().attention_mechanisms[0] is AttentionType.MULTI_HEAD


def test_status_and_metrics_are_real(model):
    executor = make_executor(model)
    status = executor.status()
    assert status.state is ExecutorState.READY and status.prefill_operations == 0
    handle, token = _start(executor, [5, 6, 7])
    for _ in range(5):
        out = run(executor.decode(DecodeInput(np.asarray([[token]]), handle)))
        token = next_token(out.logits)[0]
    status = executor.status()
    assert status.prefill_operations == 1 and status.decode_operations == 5
    assert status.avg_decode_time_ms > 0 and status.avg_prefill_time_ms > 0
    assert status.current_batch_size == 1
    # 8 tokens hold one whole page: memory is used by the page.
    assert status.memory_usage.used_bytes == executor.block_size * executor.kv_bytes_per_token
    assert status.memory_usage.peak_bytes >= status.memory_usage.used_bytes
    assert status.last_operation is not None
    assert ExecutorStatus.from_dict(status.to_dict()).decode_operations == 5
    metrics = executor.metrics()
    assert metrics.total_operations == 6
    assert metrics.p95_decode_latency >= 0 and metrics.throughput_tps > 0
    assert metrics.batch_utilization == pytest.approx(1 / POOL)
    assert ExecutorMetrics.from_dict(metrics.to_dict()) == metrics


# ---------------------------------------------------------------------------------------------
# Soak and concurrency


def test_soak_randomized_operations(model, isolated):
    rng = random.Random(1234)
    executor = make_executor(model)
    live: dict[str, dict] = {}  # cache_id -> {"handle", "prompt", "tokens"}
    finished: list[dict] = []

    def any_live() -> JaxKvCacheHandle:
        return next(iter(live.values()))["handle"]

    bad_cases = {  # name -> (expected kind, call)
        "token_past_vocab": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(PrefillInput(np.asarray([[300]]))),
        ),
        "negative_token": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(PrefillInput(np.asarray([[-3]]))),
        ),
        "empty_prompt": (
            ErrorKind.REQUEST_VALIDATION,
            lambda: executor.prefill(PrefillInput(np.zeros((1, 0), np.int32))),
        ),
        "unknown_handle": (
            ErrorKind.NOT_FOUND,
            lambda: executor.decode(
                DecodeInput(np.asarray([[1]]), JaxKvCacheHandle(executor, "x"))
            ),
        ),
        "decode_bad_token": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.decode(DecodeInput(np.asarray([[256]]), any_live())),
        ),
        "bad_draft": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.speculative_decode(
                DecodeInput(np.asarray([[1]]), any_live()), [1.5], 1.0
            ),
        ),
    }
    needs_live = {"decode_bad_token", "bad_draft"}
    bad_seen = dict.fromkeys(bad_cases, 0)

    async def soak():
        for _ in range(2000):
            op = rng.choice(["prefill", "decode", "batch", "spec", "release", "bad", "bad"])
            try:
                if op == "prefill":
                    prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 12))]
                    out = await executor.prefill(PrefillInput(np.asarray([prompt])))
                    token = next_token(out.last_token_logits())[0]
                    live[out.kv_cache.cache_id()] = {
                        "handle": out.kv_cache,
                        "prompt": prompt,
                        "tokens": [token],
                    }
                elif op in ("decode", "batch") and live:
                    picked = rng.sample(list(live.values()), rng.randrange(1, len(live) + 1))
                    if op == "decode":
                        picked = picked[:1]
                    picked = [s for s in picked if s["handle"].num_tokens() < MAX_LEN - 1]
                    if not picked:
                        continue
                    inputs = [
                        DecodeInput(np.asarray([[s["tokens"][-1]]]), s["handle"]) for s in picked
                    ]
                    outs = await executor.batch_decode(inputs)
                    for s, out in zip(picked, outs, strict=True):
                        s["tokens"].append(next_token(out.logits)[0])
                elif op == "spec" and live:
                    s = rng.choice(list(live.values()))
                    if s["handle"].num_tokens() + 5 > MAX_LEN:
                        continue
                    greedy = isolated(s["prompt"], len(s["tokens"]) + 3)
                    drafts = greedy[len(s["tokens"]) : len(s["tokens"]) + 3]
                    if rng.random() < 0.5:
                        drafts[rng.randrange(3)] = rng.randrange(3, 256)
                    out = await executor.speculative_decode(
                        DecodeInput(np.asarray([[s["tokens"][-1]]]), s["handle"]), drafts, 1.0
                    )
                    s["tokens"] += [*out.accepted_tokens, next_token(out.next_logits)[0]]
                elif op == "release" and live:
                    cache_id = rng.choice(list(live))
                    executor.release_cache(cache_id)
                    finished.append(live.pop(cache_id))
                elif op == "bad":
                    name = rng.choice(sorted(set(bad_cases) - (set() if live else needs_live)))
                    kind, call = bad_cases[name]
                    with pytest.raises(FerrumError) as e:
                        await call()
                    assert e.value.kind is kind, (name, e.value)
                    bad_seen[name] += 1
            except FerrumError as e:
                assert e.kind is ErrorKind.RESOURCE_EXHAUSTED and op == "prefill", (op, e)
                cache_id = rng.choice(list(live))
                executor.release_cache(cache_id)
                finished.append(live.pop(cache_id))

    run(soak())
    assert min(bad_seen.values()) >= 40, bad_seen  # every bad input, each checked by kind
    status = executor.status()
    assert status.current_batch_size == len(live)
    assert (
        status.memory_usage.used_bytes
        == sum(s["handle"].num_tokens() for s in live.values()) * executor.kv_bytes_per_token
    )
    metrics = executor.metrics()
    assert metrics.total_operations == status.prefill_operations + status.decode_operations
    sampled = random.Random(7).sample(finished, min(10, len(finished)))
    for s in sampled + list(live.values()):
        assert s["tokens"] == isolated(s["prompt"], len(s["tokens"])), s["prompt"]
    for cache_id in list(live):
        executor.release_cache(cache_id)
    assert executor.status().current_batch_size == 0
    run(executor.prefill(PrefillInput(np.ones((POOL, 2), np.int32))))  # every slot is free


def test_concurrent_coroutines_equal_sequential(model, isolated):
    rng = random.Random(99)
    requests = prompts(rng, 32)
    executor = make_executor(model, max_batch_size=8)

    async def one(prompt):
        while True:
            try:
                out = await executor.prefill(PrefillInput(np.asarray([prompt])))
                break
            except FerrumError as e:
                assert e.kind is ErrorKind.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.001)
        handle = out.kv_cache
        tokens = [next_token(out.last_token_logits())[0]]
        for _ in range(5):
            d = await executor.decode(DecodeInput(np.asarray([[tokens[-1]]]), handle))
            tokens.append(next_token(d.logits)[0])
        executor.release_cache(handle.cache_id())
        return tokens

    async def all_at_once():
        return await asyncio.gather(*(one(p) for p in requests))

    results = run(all_at_once())
    for prompt, tokens in zip(requests, results, strict=True):
        assert tokens == isolated(prompt, 6)
    assert executor.status().current_batch_size == 0
