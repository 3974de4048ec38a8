"""The executor on pages, as Ferrum 0.7's engine drives it: `unified_decode` with chunked
prefill, foreign handles, prefix caching, verify + truncate, bad batches, soak, mesh."""

from __future__ import annotations

import asyncio
import collections
import os
import random

import numpy as np
import pytest
from conftest import params_from_hf, run_on_mesh, tiny_hf_model

from ferrum_jax import engine
from ferrum_jax.engine_loop import EngineHandle, Request, run_unified
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.interfaces import (
    DecodeInput,
    ExecutorState,
    PrefillInput,
    UnifiedBatch,
    UnifiedBatchItem,
)

MESH = os.environ.get("FERRUM_TEST_MESH")
"""`data,model`: run on that mesh (set by `test_engine_loop_on_mesh`)."""
LOOP_REQUESTS = int(os.environ.get("FERRUM_TEST_REQUESTS", "24"))
"""Requests of the engine-loop test (the mesh run uses fewer: 8 virtual devices on 2 cores)."""
MAX_LEN, PAGE, NEW = 128, 16, 8
SYSTEM = [(7 * i) % 250 + 3 for i in range(40)]
"""A shared system prompt: two full pages and a partial one."""


@pytest.fixture(scope="module")
def model():
    return params_from_hf(tiny_hf_model("llama", num_hidden_layers=2))


def make_executor(model, **kwargs) -> JaxModelExecutor:
    config, graphdef, params = model
    kwargs = {
        "max_batch_size": 8,
        "max_sequence_length": MAX_LEN,
        "block_size": PAGE,
        "max_num_batched_tokens": 64,
        **kwargs,
    }
    if MESH:
        from ferrum_jax.sharding import make_mesh

        data, model_axis = (int(x) for x in MESH.split(","))
        kwargs["mesh"] = make_mesh(data=data, model=model_axis)
    return JaxModelExecutor(config, graphdef, params, **kwargs)


@pytest.fixture(scope="module")
def isolated(model):
    """First `n <= NEW` greedy tokens of a prompt run alone through the functional API."""
    _, graphdef, params = model
    memo: dict[tuple[int, ...], list[int]] = {}

    def run(prompt: list[int], n: int = NEW) -> list[int]:
        key = tuple(prompt)
        if key not in memo:
            out = engine.generate(
                graphdef, params, np.asarray([prompt]), max_new_tokens=NEW, stop_tokens=[]
            )
            memo[key] = np.asarray(out.tokens[0]).tolist()
        return memo[key][:n]

    return run


def run(coro):
    return asyncio.run(coro)


def greedy(logits) -> int:
    return int(np.argmax(np.asarray(logits)))


def requests(rng: random.Random, n: int, prefix: list[int] = ()) -> list[Request]:
    """Mixed lengths: a third longer than the loop's 48-token budget (several chunks)."""
    out = []
    for i in range(n):
        length = rng.randrange(49, 110 - len(prefix)) if i % 3 == 0 else rng.randrange(1, 30)
        prompt = [*prefix, *(rng.randrange(3, 256) for _ in range(length))]
        out.append(Request(f"r{i}", prompt, rng.randrange(2, NEW + 1)))
    return out


def serve(executor, reqs):
    return run(run_unified(executor, reqs, token_budget=48, decode_chunk=16, prefill_chunk=32))


def check_pages(executor) -> None:
    """free + used == total, and every page's refcount equals its live references (rows
    holding it, plus one for the prefix cache)."""
    metrics = executor.cache_metrics_snapshot()
    assert metrics["pages_free"] + metrics["pages_used"] == metrics["pages_total"]
    refs = collections.Counter(
        p for r in executor._live.values() for row in r.rows for p in row.pages
    )
    if executor._prefix is not None:
        refs.update(executor._prefix.cached_pages())
        executor._prefix.check()
    executor._allocator.check()
    for page in range(metrics["pages_total"]):
        assert executor._allocator.refcount(page) == refs[page], page


# ---------------------------------------------------------------------------------------------
# The engine loop


def test_engine_loop_matches_isolated_runs(model, isolated):
    """24 requests through the Ferrum 0.7 loop replica: prompts chunked while others decode,
    handles the engine's own; every request's greedy tokens equal its isolated run."""
    reqs = requests(random.Random(0), LOOP_REQUESTS)
    executor = make_executor(model)
    results = serve(executor, reqs)
    for r in reqs:
        assert results[r.id].tokens == isolated(list(r.prompt), r.max_new_tokens), r.id
    metrics = executor.cache_metrics_snapshot()
    assert metrics["pages_used"] == 0 and metrics["steps"] > 0
    # Every prompt token once; a chunk of one token continuing a prompt counts as a decode.
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    assert prompt_tokens - len(reqs) <= metrics["prefill_tokens_computed"] <= prompt_tokens
    check_pages(executor)
    assert executor.status().current_batch_size == 0


def test_prefix_caching_shares_the_system_prompt(model, isolated):
    """The same loop with a shared system prompt: identical tokens, prefix-cache hits, and
    the prefill tokens computed drop by exactly the tokens reused."""
    reqs = requests(random.Random(1), 24, prefix=SYSTEM)
    plain = make_executor(model)
    cached = make_executor(model, enable_prefix_caching=True)
    want = serve(plain, reqs)
    got = serve(cached, reqs)
    for r in reqs:
        assert got[r.id].tokens == want[r.id].tokens == isolated(list(r.prompt), r.max_new_tokens)
    off, on = plain.cache_metrics_snapshot(), cached.cache_metrics_snapshot()
    assert on["hits"] > 0 and on["tokens_reused"] >= on["hits"] * PAGE
    saved = off["prefill_tokens_computed"] - on["prefill_tokens_computed"]
    assert saved == on["prefill_tokens_reused"] > 0 and off["prefill_tokens_reused"] == 0
    # Requests admitted once the first ones prefilled hold both full system-prompt pages
    # (chunks ending inside a page swap it for the cached one; fewer tokens are saved).
    assert on["tokens_reused"] >= 16 * 2 * PAGE
    assert on["pages_cached"] > 0 and on["pages_used"] == len(cached._prefix.cached_pages())
    check_pages(cached)


class PlainHandle(EngineHandle):
    """A handle written by someone else (Ferrum's KV manager): the executor knows its id."""


def test_foreign_handles_keyed_by_seq_id(model, isolated):
    executor = make_executor(model)
    prompt = [5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]
    handle = PlainHandle("engine-7")
    first = UnifiedBatchItem("engine-7", prompt[:6], handle, 0, False)
    assert run(executor.unified_decode(UnifiedBatch([first]))) == [None]
    final = UnifiedBatchItem("engine-7", prompt[6:], handle, 6, True)
    (logits,) = run(executor.unified_decode(UnifiedBatch([final])))
    assert logits.dtype == np.float32 and logits.shape == (model[0].vocab_size,)
    tokens = [greedy(logits)]
    # The 0.6 API continues the same sequence through the foreign handle.
    out = run(executor.decode(DecodeInput(np.asarray([[tokens[-1]]]), handle)))
    tokens.append(out.logits.argmax_last_dim_u32()[0])
    step = UnifiedBatchItem("engine-7", [tokens[-1]], handle, len(prompt) + 1, True)
    tokens.append(greedy(run(executor.unified_decode(UnifiedBatch([step])))[0]))
    assert tokens == isolated(prompt, 3)
    assert executor.cache_metrics_snapshot()["pages_used"] == 1
    executor.release_cache("engine-7")
    assert executor.cache_metrics_snapshot()["pages_used"] == 0
    # Released: continuing it is refused, starting it over at 0 works.
    with pytest.raises(FerrumError) as e:
        run(executor.unified_decode(UnifiedBatch([step])))
    assert e.value.kind is ErrorKind.NOT_FOUND
    again = UnifiedBatchItem("engine-7", prompt, handle, 0, True)
    assert greedy(run(executor.unified_decode(UnifiedBatch([again])))[0]) == tokens[0]


def test_chunked_prefill_through_prefill_position_ids(model, isolated):
    """`prefill(PrefillInput(ids, kv_cache=h, position_ids=offset..))` appends a chunk."""
    executor = make_executor(model)
    prompt = [(3 * i) % 250 + 3 for i in range(70)]
    out = run(executor.prefill(PrefillInput(np.asarray([prompt[:30]]))))
    handle = out.kv_cache
    for lo, hi in ((30, 47), (47, 70)):
        out = run(
            executor.prefill(
                PrefillInput(
                    np.asarray([prompt[lo:hi]]),
                    kv_cache=handle,
                    position_ids=np.arange(lo, hi)[None],
                )
            )
        )
        assert out.kv_cache.cache_id() == handle.cache_id()
    assert handle.num_tokens() == 70 and handle.block_table().num_blocks() == 5
    assert out.last_token_logits().argmax_last_dim_u32()[0] == isolated(prompt, 1)[0]


# ---------------------------------------------------------------------------------------------
# Speculative decoding on pages


def test_forward_verify_and_truncate_reproduce_greedy(model, isolated):
    """The engine's speculative loop: verify [last, drafts...] in one forward, keep the
    drafts the target agrees with, `truncate_kv` to the accepted prefix. Half-wrong drafts
    still give exactly the greedy tokens."""
    executor = make_executor(model)
    prompt = [11, 12, 13, 14, 15]
    want = isolated(prompt)
    out = run(executor.prefill(PrefillInput(np.asarray([prompt]))))
    handle = out.kv_cache
    tokens = [out.last_token_logits().argmax_last_dim_u32()[0]]
    rng = random.Random(3)
    while len(tokens) < NEW:
        drafts = list(want[len(tokens) : len(tokens) + 3])
        drafts += [3] * (3 - len(drafts))
        if rng.random() < 0.5:
            drafts[rng.randrange(3)] = 200  # a wrong draft
        length = handle.num_tokens()
        inputs = [DecodeInput(np.asarray([[t]]), handle) for t in [tokens[-1], *drafts]]
        outs = run(executor.forward_verify(inputs))
        assert len(outs) == 4 and handle.num_tokens() == length + 4
        accepted = 0
        while accepted < 3 and outs[accepted].logits.argmax_last_dim_u32()[0] == drafts[accepted]:
            accepted += 1
        tokens += drafts[:accepted]
        tokens.append(outs[accepted].logits.argmax_last_dim_u32()[0])
        run(executor.truncate_kv(handle, length + 1 + accepted))
        assert handle.num_tokens() == length + 1 + accepted
        check_pages(executor)
    assert tokens[:NEW] == want


# ---------------------------------------------------------------------------------------------
# Bad input


def _live_pair(executor):
    """Two live sequences (a: 3 tokens, b: 20 tokens) and their next decode items."""
    items = [
        UnifiedBatchItem("a", [5, 6, 7], None, 0, True),
        UnifiedBatchItem("b", list(range(10, 30)), None, 0, True),
    ]
    a, b = (greedy(x) for x in run(executor.unified_decode(UnifiedBatch(items))))
    return [
        UnifiedBatchItem("a", [a], None, 3, True),
        UnifiedBatchItem("b", [b], None, 20, True),
    ]


UNIFIED_BAD = {
    "unknown_seq_past_0": (ErrorKind.NOT_FOUND, [UnifiedBatchItem("zz", [5], None, 4, True)]),
    "offset_not_length": (ErrorKind.INVALID_PARAMETER, [UnifiedBatchItem("a", [5], None, 2, True)]),
    "same_seq_twice": (
        ErrorKind.INVALID_PARAMETER,
        [UnifiedBatchItem("n", [5], None, 0, False), UnifiedBatchItem("n", [6], None, 1, True)],
    ),
    "empty_q_tokens": (ErrorKind.INVALID_PARAMETER, [UnifiedBatchItem("n", [], None, 0, True)]),
    "token_out_of_range": (
        ErrorKind.INVALID_PARAMETER,
        [UnifiedBatchItem("n", [5, 256], None, 0, True)],
    ),
    "past_kv_capacity": (
        ErrorKind.REQUEST_VALIDATION,
        [UnifiedBatchItem("a", [5] * (MAX_LEN - 2), None, 3, True)],
    ),
    "more_pages_than_free": (
        ErrorKind.RESOURCE_EXHAUSTED,
        [UnifiedBatchItem(f"p{i}", [5] * 60, None, 0, True) for i in range(3)],
    ),
}


SOAK_BAD = [
    *(bad for name, (_, bad) in UNIFIED_BAD.items() if name != "more_pages_than_free"),
    [UnifiedBatchItem(f"p{i}", [5] * 100, None, 0, True) for i in range(4)],  # > the pool
]


@pytest.mark.parametrize("case", [*UNIFIED_BAD, "truncate_past_length", "after_shutdown"])
def test_bad_unified_input_changes_nothing(model, case):
    """Each bad batch is refused whole with its own error before device work: no page
    leaked, and the live sequences' next logits bit-identical to a twin's that never saw it."""
    executor = make_executor(model, max_kv_tokens=8 * PAGE)
    twin = make_executor(model, max_kv_tokens=8 * PAGE)
    nxt, twin_next = _live_pair(executor), _live_pair(twin)
    before = executor.cache_metrics_snapshot()
    ops = executor.status()
    if case == "truncate_past_length":
        with pytest.raises(FerrumError) as e:
            run(executor.truncate_kv(EngineHandle("a"), 4))
        assert e.value.kind is ErrorKind.INVALID_PARAMETER
    elif case == "after_shutdown":
        run(executor.shutdown())
        with pytest.raises(FerrumError) as e:
            run(executor.unified_decode(UnifiedBatch(nxt)))
        assert "shut down" in str(e.value) and executor.status().state is ExecutorState.SHUTDOWN
        return
    else:
        kind, bad = UNIFIED_BAD[case]
        with pytest.raises(FerrumError) as e:
            # The good items come first: refusing the batch must undo nothing of theirs.
            run(executor.unified_decode(UnifiedBatch([nxt[1], *bad])))
        assert e.value.kind is kind, e.value
    after = executor.cache_metrics_snapshot()
    assert after == before
    status = executor.status()
    assert status.decode_operations == ops.decode_operations
    check_pages(executor)
    got = run(executor.unified_decode(UnifiedBatch(nxt)))
    want = run(twin.unified_decode(UnifiedBatch(twin_next)))
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# Soak


def test_soak_3000_operations(model, isolated):
    """3,000 randomized operations over a small pool with prefix caching: unified batches
    (chunked prompts, decodes), 0.6 prefills/decodes, verify + truncate, releases, shared
    prefixes and bad input. Afterwards the page accounting is exact and greedily decoded
    sequences equal their isolated runs."""
    rng = random.Random(2026)
    executor = make_executor(model, max_kv_tokens=24 * PAGE, enable_prefix_caching=True)
    seqs: dict[str, dict] = {}  # seq_id -> prompt, fed (prompt tokens in), tokens, greedy
    checked, refused, names = 0, collections.Counter(), iter(range(10**9))

    def prompt() -> list[int]:
        tail = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 40))]
        return [*SYSTEM[: rng.choice([0, 16, 32, 40])], *tail]

    def length(s) -> int:
        return s["fed"] + len(s["tokens"]) - (1 if s["tokens"] else 0)

    async def soak():
        nonlocal checked
        for _ in range(3000):
            op = rng.choice(["unified"] * 4 + ["verify", "release", "prefill06", "bad"])
            try:
                if op == "unified":
                    items, owners = [], []
                    if len(seqs) < 8 and rng.random() < 0.5:
                        sid = f"s{next(names)}"
                        seqs[sid] = {"prompt": prompt(), "fed": 0, "tokens": [], "greedy": True}
                    for sid, s in rng.sample(list(seqs.items()), min(len(seqs), 4)):
                        if s["fed"] < len(s["prompt"]):
                            n = min(rng.randrange(1, 33), len(s["prompt"]) - s["fed"])
                            q = s["prompt"][s["fed"] : s["fed"] + n]
                            final = s["fed"] + n == len(s["prompt"])
                            items.append(UnifiedBatchItem(sid, q, None, s["fed"], final))
                            owners.append((sid, n))
                        elif length(s) + 1 < MAX_LEN and len(s["tokens"]) < NEW:
                            items.append(
                                UnifiedBatchItem(sid, [s["tokens"][-1]], None, length(s), True)
                            )
                            owners.append((sid, 0))
                    if items:
                        outs = await executor.unified_decode(UnifiedBatch(items))
                        for (sid, n), logits in zip(owners, outs, strict=True):
                            s = seqs[sid]
                            s["fed"] += n
                            if logits is not None:
                                s["tokens"].append(greedy(logits))
                elif op == "verify" and seqs:
                    sid, s = rng.choice(list(seqs.items()))
                    if s["tokens"] and length(s) + 4 < MAX_LEN:
                        handle = EngineHandle(sid)
                        drafts = [rng.randrange(3, 256) for _ in range(3)]
                        start = length(s)
                        inputs = [
                            DecodeInput(np.asarray([[t]]), handle)
                            for t in [s["tokens"][-1], *drafts]
                        ]
                        assert len(await executor.forward_verify(inputs)) == 4
                        keep = rng.randrange(0, 4)
                        await executor.truncate_kv(handle, start + 1 + keep)
                        s["tokens"] += drafts[:keep]
                        s["tokens"].append(rng.randrange(3, 256))
                        s["greedy"] = False
                elif op == "release" and seqs:
                    sid = rng.choice(list(seqs))
                    s = seqs.pop(sid)
                    done = s["fed"] == len(s["prompt"]) and s["greedy"] and len(s["tokens"]) > 1
                    if done and checked < 12:
                        assert s["tokens"] == isolated(s["prompt"], len(s["tokens"])), sid
                        checked += 1
                    executor.release_cache(sid)
                elif op == "prefill06" and len(seqs) < 8:
                    p = prompt()
                    out = await executor.prefill(PrefillInput(np.asarray([p])))
                    token = out.last_token_logits().argmax_last_dim_u32()[0]
                    sid = out.kv_cache.cache_id()
                    seqs[sid] = {"prompt": p, "fed": len(p), "tokens": [token], "greedy": True}
                elif op == "bad":
                    bad = rng.choice(SOAK_BAD)
                    await executor.unified_decode(UnifiedBatch(bad))
                    raise AssertionError(f"accepted {bad}")
            except FerrumError as e:
                refused[e.kind] += 1
                if op != "bad":
                    assert e.kind is ErrorKind.RESOURCE_EXHAUSTED, e
                    # Out of pages: the engine would preempt; the soak releases one.
                    if seqs:
                        victim = rng.choice(list(seqs))
                        del seqs[victim]
                        executor.release_cache(victim)

    run(soak())
    check_pages(executor)
    for sid in list(seqs):
        executor.release_cache(sid)
    check_pages(executor)
    metrics = executor.cache_metrics_snapshot()
    assert metrics["pages_used"] == len(executor._prefix.cached_pages())
    assert metrics["hits"] > 0 and metrics["lookups"] == metrics["hits"] + metrics["misses"]
    status = executor.status()
    assert status.current_batch_size == 0 and status.state is ExecutorState.READY
    assert checked >= 5 and sum(refused.values()) > 0


# ---------------------------------------------------------------------------------------------
# Mesh


def test_engine_loop_on_mesh():
    """The engine-loop equivalence test on a (2, 4) mesh of 8 devices (10 requests, chunked
    prompts among them): the same tokens as one device's isolated runs."""
    run_on_mesh(f"{__file__}::test_engine_loop_matches_isolated_runs", FERRUM_TEST_REQUESTS="10")


def test_capacity_32_sequences_in_the_bytes_of_8_slots(model):
    """The KV bytes of the old 8 x 2048-token slot pool (16,384 tokens) hold 32 live
    sequences of 200-500 tokens at once (4x the slots), each decoding in one batch."""
    rng = random.Random(7)
    executor = make_executor(
        model, max_batch_size=32, max_sequence_length=512, max_kv_tokens=8 * 2048
    )
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(200, 500))] for _ in range(32)]
    items = [UnifiedBatchItem(f"c{i}", p, None, 0, True) for i, p in enumerate(prompts)]
    firsts = run(executor.unified_decode(UnifiedBatch(items)))
    decodes = [
        UnifiedBatchItem(f"c{i}", [greedy(x)], None, len(p), True)
        for i, (p, x) in enumerate(zip(prompts, firsts, strict=True))
    ]
    outs = run(executor.unified_decode(UnifiedBatch(decodes)))
    assert all(x is not None and np.isfinite(x).all() for x in outs)
    metrics = executor.cache_metrics_snapshot()
    assert metrics["pages_total"] * PAGE == 8 * 2048
    assert executor.status().current_batch_size == 32
    assert metrics["pages_used"] == sum(-(-(len(p) + 1) // PAGE) for p in prompts)
    check_pages(executor)


def test_update_params_swaps_weights_without_recompiling(model):
    """RL-style hot-swap: new weights serve the next step with no new program; live
    sequences are released (keep_cache=False) and the params version moves."""
    import jax

    _, graphdef, params = model
    executor = make_executor(model)
    item = UnifiedBatchItem("w", [5, 6, 7], None, 0, True)
    run(executor.unified_decode(UnifiedBatch([item])))
    programs = executor.compiled_programs
    new = jax.tree.map(lambda x: x * 0.5, params)
    assert executor.update_params(new) == 1
    assert executor.cache_metrics_snapshot()["params_version"] == 1
    assert executor.cache_metrics_snapshot()["pages_used"] == 0
    (logits,) = run(executor.unified_decode(UnifiedBatch([item])))
    want = np.asarray(engine.forward(graphdef, new, np.asarray([[5, 6, 7]])))[0, -1]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert executor.compiled_programs == programs
    with pytest.raises(FerrumError):
        executor.update_params({"not": "params"})


def test_update_params_keep_cache_never_reuses_pages_of_old_weights(model):
    """`keep_cache=True` keeps the live sequences' KV, but no page computed under the old
    weights is ever reused: not the prefix cache's (emptied by the swap), nor the pages of
    a sequence live during the swap and released after it (never cached). New sequences'
    logits equal a twin's that got the new weights before anything was cached."""
    import jax

    _, _, params = model
    new = jax.tree.map(lambda x: x * 0.5, params)
    first, second = SYSTEM[:33], [(5 * i) % 240 + 9 for i in range(33)]  # two full pages each
    executor = make_executor(model, enable_prefix_caching=True)
    twin = make_executor(model, enable_prefix_caching=True)
    twin.update_params(new)
    start = [
        UnifiedBatchItem("a", first, None, 0, True),
        UnifiedBatchItem("c", second, None, 0, True),
    ]
    run(executor.unified_decode(UnifiedBatch(start)))
    assert executor.update_params(new, keep_cache=True) == 1
    assert executor.cache_metrics_snapshot()["pages_cached"] == 0

    def same_as_twin(seq_id: str, prompt: list[int]) -> None:
        item = [UnifiedBatchItem(seq_id, prompt, None, 0, True)]
        (got,) = run(executor.unified_decode(UnifiedBatch(item)))
        (want,) = run(twin.unified_decode(UnifiedBatch(item)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    same_as_twin("b1", [*first, 11])
    executor.release_cache("c")  # its pages hold KV of the old weights
    same_as_twin("b2", [*second, 12])
    for seq_id in ("a", "b1", "b2"):
        executor.release_cache(seq_id)
    check_pages(executor)
    assert executor.cache_metrics_snapshot()["hits"] == 0


def test_generated_ids_skip_seq_ids_callers_use(model):
    """A caller's `seq_id` may look like an id the executor makes for its own handles (the
    executor id shows in any handle): the next handle the executor makes skips it, so the
    caller's sequence is neither replaced nor leaked and decodes exactly like a twin's."""
    executor, twin = make_executor(model), make_executor(model)
    mine = run(executor.prefill(PrefillInput(np.asarray([[5, 6, 7]])))).kv_cache.cache_id()
    taken = f"{mine.rsplit('-', 1)[0]}-{int(mine.rsplit('-', 1)[1]) + 1}"
    prompt = [9, 10, 11, 12]
    start = UnifiedBatch([UnifiedBatchItem(taken, prompt, None, 0, True)])
    (first,) = run(executor.unified_decode(start))
    run(twin.unified_decode(start))
    other = run(executor.prefill(PrefillInput(np.asarray([[20, 21, 22]])))).kv_cache.cache_id()
    assert other not in (mine, taken)
    assert executor.status().current_batch_size == 3
    step = UnifiedBatch([UnifiedBatchItem(taken, [greedy(first)], None, len(prompt), True)])
    np.testing.assert_array_equal(
        run(executor.unified_decode(step))[0], run(twin.unified_decode(step))[0]
    )
    for seq_id in (mine, taken, other):
        executor.release_cache(seq_id)
    check_pages(executor)
    assert executor.cache_metrics_snapshot()["pages_used"] == 0


def test_release_wins_over_a_queued_call_that_would_create_the_sequence(model):
    """`release_cache(id)` while that id's first chunk waits in `unified_decode`: the call
    still runs, but the sequence stays released; nothing leaks, and a batch needing every
    row and page runs next. An id released before a call is issued is that call's to make."""
    import threading

    executor = make_executor(model, max_batch_size=2, max_kv_tokens=8 * PAGE)
    gate = threading.Event()
    prompt = list(range(3, 3 + 4 * PAGE))

    async def race() -> None:
        executor._worker.submit(gate.wait)  # holds the worker: the next call stays queued
        queued = asyncio.ensure_future(
            executor.unified_decode(UnifiedBatch([UnifiedBatchItem("r", prompt, None, 0, False)]))
        )
        await asyncio.sleep(0.01)
        executor.release_cache("r")
        gate.set()
        assert await queued == [None]

    run(race())
    assert executor.status().current_batch_size == 0
    check_pages(executor)
    assert executor.cache_metrics_snapshot()["pages_used"] == 0
    full = [UnifiedBatchItem(f"f{i}", prompt, None, 0, True) for i in range(2)]
    assert all(x is not None for x in run(executor.unified_decode(UnifiedBatch(full))))
    for seq_id in ("f0", "f1"):
        executor.release_cache(seq_id)
    # "r" was released before this call was issued: the call makes it again.
    run(executor.unified_decode(UnifiedBatch([UnifiedBatchItem("r", [1, 2], None, 0, True)])))
    assert executor.status().current_batch_size == 1
    assert not executor._released_at and not executor._pending


def _next_logits(executor, seq_id: str, prompt: list[int]) -> np.ndarray:
    item = UnifiedBatchItem(seq_id, prompt, None, 0, True)
    return run(executor.unified_decode(UnifiedBatch([item])))[0]


def test_update_params_serves_its_own_copy(model):
    """`update_params(nnx.state(module))`, then the trainer's in-place `nnx.update` (new
    values, even new shapes): the executor serves the weights it was given, like a twin
    given a separate copy, and takes the next update."""
    import jax
    from flax import nnx

    _, graphdef, params = model
    module = nnx.merge(graphdef, jax.tree.map(lambda x: x * 0.5, params))
    executor, twin = make_executor(model), make_executor(model)
    assert executor.update_params(nnx.state(module)) == 1
    twin.update_params(jax.tree.map(lambda x: x * 0.5, params))
    nnx.update(module, jax.tree.map(lambda x: x * 0.0, nnx.state(module)))
    np.testing.assert_array_equal(
        _next_logits(executor, "a", SYSTEM), _next_logits(twin, "a", SYSTEM)
    )
    nnx.update(module, jax.tree.map(lambda x: np.zeros((*x.shape, 2), x.dtype), nnx.state(module)))
    np.testing.assert_array_equal(
        _next_logits(executor, "b", [5, 6]), _next_logits(twin, "b", [5, 6])
    )
    assert executor.update_params(params) == 2


def test_update_params_refuses_bad_calls_and_never_blocks_a_loop(model):
    """Non-boolean `keep_cache`, NaN weights (named), a call after `shutdown()`: one
    FerrumError each and the weights unchanged. From a coroutine the blocking call is
    refused (it would stall the loop); `update_params_async` lets the loop run while the
    calls queued before it finish."""
    import threading

    import jax

    _, _, params = model
    executor = make_executor(model)
    with pytest.raises(FerrumError, match="keep_cache must be True or False"):
        executor.update_params(params, keep_cache="false")
    poisoned = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0].set(np.nan) if "norm" in jax.tree_util.keystr(path) else x,
        params,
    )
    with pytest.raises(FerrumError, match=r"norm.*NaN or infinity") as e:
        executor.update_params(poisoned)
    assert e.value.kind is ErrorKind.INVALID_PARAMETER
    assert executor.params_version == 0

    gate = threading.Event()

    async def in_a_coroutine() -> int:
        with pytest.raises(FerrumError, match="update_params_async"):
            executor.update_params(params)
        executor._worker.submit(gate.wait)  # a call still running on the worker
        swap = asyncio.ensure_future(executor.update_params_async(params, keep_cache=True))
        ticks = 0
        while ticks < 5:  # the loop keeps running while the swap waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert not swap.done()
        gate.set()
        return await swap

    assert run(in_a_coroutine()) == 1
    run(executor.shutdown())
    with pytest.raises(FerrumError, match="shut down"):
        executor.update_params(params)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_quantized_kv_prefix_hit_logits_equal_a_twin_without_prefix_caching(model, kv_dtype):
    """Quantized KV pages with prefix caching: every prefill position of a prompt that
    reused cached pages (those a hit skipped are computed when read) equals a twin's
    without prefix caching, which computed them all in its step."""
    executor = make_executor(model, kv_dtype=kv_dtype, enable_prefix_caching=True)
    twin = make_executor(model, kv_dtype=kv_dtype)
    prompt = [*SYSTEM, 9, 10]
    for ex in (executor, twin):
        run(ex.prefill(PrefillInput(np.asarray([SYSTEM[:33]]))))
    got = run(executor.prefill(PrefillInput(np.asarray([prompt])))).logits.array
    want = run(twin.prefill(PrefillInput(np.asarray([prompt])))).logits.array
    assert executor.cache_metrics_snapshot()["tokens_reused"] == 2 * PAGE
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_lazy_prefill_logits_are_refused_after_a_weight_swap(model):
    """Prefill logits other than the last position are computed when read; after
    `update_params` that would use the new weights, so reading them is refused. The last
    positions, computed in the step, stay readable and equal a twin's that kept its
    weights."""
    import jax

    _, _, params = model
    executor, twin = make_executor(model), make_executor(model)
    prompt = PrefillInput(
        np.asarray([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]),
        attention_mask=np.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    )
    out, same = run(executor.prefill(prompt)), run(twin.prefill(prompt))
    executor.update_params(jax.tree.map(lambda x: x * 0.5, params), keep_cache=True)
    with pytest.raises(FerrumError, match="params version 0") as e:
        out.logits.view([0, 0, 0], [2, 2, out.logits.shape[2]])
    assert e.value.kind is ErrorKind.UNSUPPORTED
    with pytest.raises(FerrumError, match="params version 0"):
        np.asarray(out.logits.array)
    np.testing.assert_array_equal(
        np.asarray(out.last_token_logits().array), np.asarray(same.last_token_logits().array)
    )


def test_prefix_caching_twin_soak_with_swaps_and_racing_releases(model):
    """Randomized operations on an executor with prefix caching and int8 KV pages, and on
    a twin without prefix caching:
    chunked prompts over shared prefixes, decodes, releases, releases racing the calls
    queued before them, weight swaps (keep_cache either way), prefills whose every
    position is read. Every logit agrees with the twin (≤ 1e-5) and the page accounting of
    both is exact throughout."""
    import threading

    import jax

    _, _, params = model
    rng = random.Random(25)
    # int8 pages: what a hit reuses is quantized, so its logits show any stale page too.
    sizes = {"max_kv_tokens": 16 * PAGE, "kv_dtype": "int8", "max_num_batched_tokens": 32}
    executor = make_executor(model, enable_prefix_caching=True, **sizes)
    twin = make_executor(model, **sizes)
    both = (executor, twin)
    seqs: dict[str, dict] = {}  # seq_id -> prompt, fed, tokens
    names, raced, swaps = iter(range(10**6)), 0, 0

    def prompt() -> list[int]:
        tail = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 12))]
        return [*SYSTEM[: rng.choice([0, 16, 32, 40])], *tail]

    def close(got, want) -> None:
        for x, y in zip(got, want, strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)

    async def on_both(call, *args):
        """`call(ex, *args)` on each executor; FerrumErrors must agree, and come back."""
        outs = []
        for ex in both:
            try:
                outs.append(await call(ex, *args))
            except FerrumError as e:
                outs.append(e)
        kinds = [o.kind if isinstance(o, FerrumError) else None for o in outs]
        assert kinds[0] == kinds[1], outs
        return outs

    def release(sid: str) -> None:
        seqs.pop(sid, None)
        for ex in both:
            ex.release_cache(sid)

    async def queued_then_released(ex, batch, sid):
        """`batch` queued behind a held worker, then `sid` released before it runs."""
        gate = threading.Event()
        ex._worker.submit(gate.wait)
        call = asyncio.ensure_future(ex.unified_decode(batch))
        await asyncio.sleep(0.005)
        ex.release_cache(sid)
        gate.set()
        return await call

    async def soak():
        nonlocal raced, swaps
        for _ in range(100):
            op = rng.choice(["unified"] * 5 + ["release", "race", "swap", "prefill"])
            if op == "unified":
                if len(seqs) < 6 and rng.random() < 0.5:
                    seqs[f"s{next(names)}"] = {"prompt": prompt(), "fed": 0, "tokens": []}
                items, owners = [], []
                for sid, s in rng.sample(list(seqs.items()), min(len(seqs), 2)):
                    if s["fed"] < len(s["prompt"]):
                        n = min(rng.randrange(1, 17), len(s["prompt"]) - s["fed"])
                        final = s["fed"] + n == len(s["prompt"])
                        q = s["prompt"][s["fed"] : s["fed"] + n]
                        items.append(UnifiedBatchItem(sid, q, None, s["fed"], final))
                        owners.append((sid, n))
                    elif len(s["tokens"]) < NEW:
                        at = s["fed"] + len(s["tokens"]) - 1
                        items.append(UnifiedBatchItem(sid, [s["tokens"][-1]], None, at, True))
                        owners.append((sid, 0))
                if not items:
                    continue
                got, want = await on_both(JaxModelExecutor.unified_decode, UnifiedBatch(items))
                if isinstance(got, FerrumError):
                    assert got.kind is ErrorKind.RESOURCE_EXHAUSTED, got
                    release(rng.choice([sid for sid, _ in owners]))
                    continue
                close(got, want)
                for (sid, n), logits in zip(owners, want, strict=True):
                    seqs[sid]["fed"] += n
                    if logits is not None:
                        seqs[sid]["tokens"].append(greedy(logits))
            elif op == "release" and seqs:
                release(rng.choice(list(seqs)))
            elif op == "race":
                raced += 1
                live = [sid for sid, s in seqs.items() if s["tokens"] and len(s["tokens"]) < NEW]
                if live and rng.random() < 0.5:  # a queued decode of a live sequence
                    sid = rng.choice(live)
                    s = seqs[sid]
                    at = s["fed"] + len(s["tokens"]) - 1
                    batch = UnifiedBatch([UnifiedBatchItem(sid, [s["tokens"][-1]], None, at, True)])
                    outs = await on_both(queued_then_released, batch, sid)
                    assert all(o.kind is ErrorKind.NOT_FOUND for o in outs), outs
                else:  # a queued first chunk of a new sequence
                    sid = f"r{next(names)}"
                    batch = UnifiedBatch([UnifiedBatchItem(sid, prompt(), None, 0, False)])
                    outs = await on_both(queued_then_released, batch, sid)
                    assert all(o == [None] or o.kind is ErrorKind.RESOURCE_EXHAUSTED for o in outs)
                seqs.pop(sid, None)
                assert all(sid not in ex._live for ex in both)
            elif op == "swap":
                swaps += 1
                new = jax.tree.map(lambda x: x * rng.choice([0.5, 0.9, 1.0]), params)
                keep = rng.random() < 0.6
                for ex in both:
                    await ex.update_params_async(new, keep_cache=keep)
                if not keep:
                    seqs.clear()
            elif op == "prefill":
                outs = await on_both(JaxModelExecutor.prefill, PrefillInput(np.asarray([prompt()])))
                if not isinstance(outs[0], FerrumError):
                    close(*(np.asarray(o.logits.array)[0] for o in outs))
                    for ex, o in zip(both, outs, strict=True):
                        ex.release_cache(o.kv_cache.cache_id())
            for ex in both:
                check_pages(ex)

    run(soak())
    for sid in list(seqs):
        release(sid)
    for ex in both:
        check_pages(ex)
        assert ex.status().current_batch_size == 0
        assert not ex._released_at and not ex._pending
    metrics = executor.cache_metrics_snapshot()
    assert metrics["pages_used"] == len(executor._prefix.cached_pages())
    assert twin.cache_metrics_snapshot()["pages_used"] == 0
    assert metrics["hits"] > 0 and raced > 5 and swaps > 5
