"""Hostile call sequences against the executor's public API, one test (or group) per red-team
finding of issue 18, numbered as there; then the behaviours the suite never exercised.

After each hostile call the executor is READY and every other sequence is bit-identical to a
twin executor that never saw it (or, after a real device failure, which consumes the donated
pool, equal to it up to float rounding: the pool is rebuilt by replaying the host's token
ledger). Only public names are used (`JaxModelExecutor`, `PrefillInput`, `DecodeInput`,
handles, `status()`, `warmup()`, `engine.compile_counts()`), so these tests carry over to a
paged executor unchanged.

Device failures and stalls are injected through the model, not the executor: `FaultyLlama`
is the Llama decoder with a host callback in every compiled step, which the tests can gate
(the step blocks inside the device program) or make fail (the program errors after its
inputs were donated, as a real out-of-memory does).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import params_from_hf, tiny_hf_model
from flax import nnx

from ferrum_jax import engine
from ferrum_jax.cache import init_cache
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.interfaces import DecodeInput, ExecutorState, PrefillInput
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import Llama, abstract_model

POOL, MAX_LEN = 4, 64
WATCHDOG_S = 120
"""Upper bound on how long a test waits for something that must happen; never reached when
the code is right (it only turns a would-be hang into a failure)."""


class Faults:
    """Switches the model's in-step callback reads: `gate` open (set) lets steps run, `fail`
    makes the next `fail` steps raise inside the device program."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = 0
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.fail = 0
        self.entered.clear()
        self.gate.set()


FAULTS = Faults()


def _in_step(_: jax.Array) -> None:
    FAULTS.entered.set()
    if not FAULTS.gate.wait(WATCHDOG_S):
        raise RuntimeError("test gate never opened")
    with FAULTS.lock:
        if FAULTS.fail:
            FAULTS.fail -= 1
            raise RuntimeError("injected device fault")


class FaultyLlama(Llama):
    """The Llama decoder with a host callback after every step's hidden states."""

    def hidden(self, *args, **kwargs):
        x, pages = super().hidden(*args, **kwargs)
        jax.debug.callback(_in_step, x.sum())
        return x, pages


@pytest.fixture(autouse=True)
def _faults_reset():
    FAULTS.reset()
    yield
    FAULTS.reset()


@pytest.fixture(scope="module")
def model() -> Model:
    config, graphdef, params = params_from_hf(tiny_hf_model("llama"))
    return Model(config, graphdef, params)


@pytest.fixture(scope="module")
def faulty(model) -> Model:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: FaultyLlama(model.config, rngs=nnx.Rngs(0))))
    return Model(model.config, graphdef, model.params)


def make(model: Model, **kwargs) -> JaxModelExecutor:
    return JaxModelExecutor(
        model, **{"max_batch_size": POOL, "max_sequence_length": MAX_LEN, **kwargs}
    )


def run(coro):
    return asyncio.run(coro)


def logits_of(out) -> np.ndarray:
    return np.asarray(out.logits.array)


def start(executor, prompt) -> tuple:
    out = run(executor.prefill(PrefillInput(np.asarray([prompt]))))
    return out.kv_cache, int(out.last_token_logits().argmax_last_dim_u32()[0])


def decode(executor, handle, token) -> np.ndarray:
    return logits_of(run(executor.decode(DecodeInput(np.asarray([[token]]), handle))))


def next_logits(executor, started) -> list[np.ndarray]:
    """Each started `(handle, token)`'s next decode, one call per sequence."""
    return [decode(executor, handle, token) for handle, token in started]


PROMPTS = ([5, 6, 7], [8, 9, 10, 11], [12, 13])


def pair(model: Model, **kwargs) -> tuple[JaxModelExecutor, list, JaxModelExecutor, list]:
    """An executor and its twin, each with the same PROMPTS live."""
    a, b = make(model, **kwargs), make(model, **kwargs)
    return a, [start(a, p) for p in PROMPTS], b, [start(b, p) for p in PROMPTS]


def assert_untouched(executor, live, twin, twin_live, *, exact: bool = True) -> None:
    """READY, and every live sequence's next logits equal the twin's (bitwise by default)."""
    assert executor.status().state is ExecutorState.READY
    assert executor.status().current_batch_size == twin.status().current_batch_size
    for got, want in zip(next_logits(executor, live), next_logits(twin, twin_live), strict=True):
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            assert got.argmax() == want.argmax()


def refused(kind: ErrorKind, call: Callable, *words: str) -> FerrumError:
    with pytest.raises(FerrumError) as e:
        result = call()
        if asyncio.iscoroutine(result):
            run(result)
    assert e.value.kind is kind, e.value
    for word in words:
        assert word in str(e.value), (word, str(e.value))
    return e.value


def returns_while_worker_is_blocked(fn: Callable):
    """Runs `fn` on a helper thread; fails if it does not return (it waited on device work)."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(WATCHDOG_S)
    assert not thread.is_alive(), f"{fn} waited for the blocked device step"
    return box[0]


# ---------------------------------------------------------------------------------------------
# 1. Requests that used to brick the executor are refused up front, or fail alone.


def test_1a_empty_batches_are_empty(model):
    """`batch_prefill([])` was reported as a device failure and left the executor in ERROR."""
    executor, live, twin, twin_live = pair(model)
    assert run(executor.batch_prefill([])) == []
    assert run(executor.batch_decode([])) == []
    assert_untouched(executor, live, twin, twin_live)


def test_1b_same_handle_twice_in_batch_prefill(model):
    """The same handle twice in one `batch_prefill` was accepted (one slot written twice),
    and on a full pool raised an empty StopIteration."""
    executor, live, twin, twin_live = pair(model)
    start(executor, [40]), start(twin, [40])  # the pool is now full
    handle = live[0][0]
    twice = [PrefillInput(np.asarray([[1, 2]]), kv_cache=handle)] * 2
    refused(ErrorKind.INVALID_PARAMETER, lambda: executor.batch_prefill(twice), handle.cache_id())
    assert handle.num_tokens() == len(PROMPTS[0])  # nothing written
    assert_untouched(executor, live, twin, twin_live)


def test_1c_forward_longer_than_max_sequence_length(model):
    """`forward` ignored `max_sequence_length` (20,000 tokens on SmolLM2 tried 34 GB)."""
    executor, live, twin, twin_live = pair(model)
    refused(
        ErrorKind.REQUEST_VALIDATION,
        lambda: executor.forward(np.ones((1, 20000), np.int32)),
        "20000",
        str(MAX_LEN),
    )
    assert_untouched(executor, live, twin, twin_live)


KV_BYTES = 2 * 2 * 2 * 16 * 4
"""KV bytes per token of the tiny model: 2 layers x (keys, values) x 2 heads x 16 x fp32."""
SMALL = {"max_batch_size": 8, "memory_limit_bytes": 8 * MAX_LEN * KV_BYTES + 2**19}
"""A pool of 8 and 512 KiB for steps: decodes and small steps fit, the largest token buckets
(all their rows' hidden states and attention blocks) do not."""
TINY = {"max_batch_size": 8, "memory_limit_bytes": 8 * MAX_LEN * KV_BYTES + 2**12}
"""A pool of 8 and 4 KiB for steps: not even a 16-token step fits."""


def test_1d_long_batch_prefill_is_chunked(model):
    """8 prompts x 8,000 tokens within max_sequence_length 8192 built a 17 GB causal score
    matrix on SmolLM2 and ran out of memory. The same shape at an eighth of the length (8 x
    1,000 in 1024: 256 MiB of scores in one step for this model) under a 48 MiB budget: the
    prefill runs in chunks that attend to the cache, and its logits are right."""
    sizes = {"max_batch_size": 9, "max_sequence_length": 1024}
    budget = 9 * 1024 * KV_BYTES + 48 * 2**20
    executor = make(model, **sizes, memory_limit_bytes=budget)
    twin = make(model, **sizes, memory_limit_bytes=budget)
    live, twin_live = [start(executor, [3, 4, 5])], [start(twin, [3, 4, 5])]
    prompts = np.random.default_rng(0).integers(3, 256, (8, 1000)).astype(np.int32)
    steps = executor.cache_metrics_snapshot()["steps"]
    out = run(executor.prefill(PrefillInput(prompts)))
    # 8,000 tokens over steps of at most 512 (fewer under the budget), chunks in order.
    assert executor.cache_metrics_snapshot()["steps"] - steps >= 8000 // 512
    assert out.kv_cache.row_lengths() == [1000] * 8
    last = np.asarray(out.last_token_logits().array).reshape(8, -1)
    for row in (0, 5):
        ref = engine.forward(model.graphdef, model.params, prompts[row : row + 1])[0, -1]
        np.testing.assert_allclose(last[row], np.asarray(ref), rtol=0, atol=1e-4)
    executor.release_cache(out.kv_cache.cache_id())
    assert_untouched(executor, live, twin, twin_live)


def test_1d_prefill_that_fits_no_chunking_is_refused(model):
    """A prefill no step of the smallest token budget fits is refused before device work
    (prefill logits are lazy: 5 prompts of 64 tokens no longer need all-rows logits)."""
    executor, live, twin, twin_live = pair(model, **SMALL)
    out = run(executor.prefill(PrefillInput(np.ones((5, MAX_LEN), np.int32))))
    executor.release_cache(out.kv_cache.cache_id())
    assert_untouched(executor, live, twin, twin_live)
    tiny = make(model, **TINY)
    before = tiny.cache_metrics_snapshot()
    refused(
        ErrorKind.RESOURCE_EXHAUSTED,
        lambda: tiny.prefill(PrefillInput(np.ones((5, MAX_LEN), np.int32))),
        "no ragged step",
        "fits",
    )
    assert tiny.cache_metrics_snapshot() == before


def test_1d_chunked_prefill_matches_one_step(model):
    """The same prompts prefilled in one step and, under a budget that fits only chunks
    (3 x 500 tokens: 33 MiB of causal scores in one step), in chunks."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 256, (3, 500)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 341:] = 0
    sizes = {"max_batch_size": 4, "max_sequence_length": 512}
    whole = make(model, **sizes)
    small = make(model, **sizes, memory_limit_bytes=4 * 512 * KV_BYTES + 8 * 2**20)
    a = run(whole.prefill(PrefillInput(ids, attention_mask=mask)))
    b = run(small.prefill(PrefillInput(ids, attention_mask=mask)))
    steps = (x.cache_metrics_snapshot()["steps"] for x in (whole, small))
    assert next(steps) < next(steps), "the small budget did not chunk"
    np.testing.assert_allclose(logits_of(a), logits_of(b), rtol=0, atol=1e-4)
    assert b.kv_cache.row_lengths() == [500, 341, 500]
    tokens = np.asarray(a.last_token_logits().argmax_last_dim_u32())
    da = run(whole.decode(DecodeInput(tokens[:, None], a.kv_cache)))
    db = run(small.decode(DecodeInput(tokens[:, None], b.kv_cache)))
    np.testing.assert_allclose(logits_of(da), logits_of(db), rtol=0, atol=1e-4)


def test_1e_warmup_skips_what_cannot_fit_and_keeps_the_pool(model):
    """A warmup that ran out of memory raised a raw JaxRuntimeError and lost the donated
    pool. Buckets no chunking fits are now skipped and reported; live sequences stay."""
    executor, live, twin, twin_live = pair(model, **SMALL)
    report = run(executor.warmup())
    assert report["skipped"] and (8, 1) in report["ragged"] and (8, 8) in report["ragged"]
    assert all(pair not in report["ragged"] for pair in report["skipped"])
    assert_untouched(executor, live, twin, twin_live)


def test_1f_failed_device_step_fails_alone(faulty):
    """A device step failing after its inputs were donated left the executor in ERROR forever
    and every sequence lost. Now the pool is rebuilt from the host's token ledger."""
    executor, live, twin, twin_live = pair(faulty)
    (a, ta) = live[0]
    FAULTS.fail = 1
    error = refused(ErrorKind.DEVICE, lambda: executor.decode(DecodeInput(np.asarray([[ta]]), a)))
    assert "injected device fault" in str(error)
    assert executor.status().state is ExecutorState.READY
    assert [h.num_tokens() for h, _ in live] == [len(p) for p in PROMPTS]  # nothing committed
    assert_untouched(executor, live, twin, twin_live, exact=False)
    # The sequences keep decoding like the twin's.
    for _ in range(3):
        got = [decode(executor, h, t) for h, t in live[:2]]
        want = [decode(twin, h, t) for h, t in twin_live[:2]]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_1g_error_state_lasts_only_until_the_pool_can_be_rebuilt(faulty):
    """The ERROR state after a failed device step whose recovery failed too: calls report it
    (one FerrumError, no traceback), and the first call after the device works again
    rebuilds the pool, with every sequence intact."""
    executor, live, twin, twin_live = pair(faulty)
    (a, ta), _, _ = live
    FAULTS.fail = 10**6
    refused(ErrorKind.DEVICE, lambda: executor.decode(DecodeInput(np.asarray([[ta]]), a)))
    assert executor.status().state is ExecutorState.ERROR
    assert not executor.status().is_ready
    refused(ErrorKind.BACKEND, lambda: executor.prefill(PrefillInput(np.asarray([[1]]))), "Error")
    assert a.num_tokens() == len(PROMPTS[0])  # handles still answer from the host records
    FAULTS.reset()
    run(executor.forward(np.asarray([[1]])))  # the first call rebuilds the pool
    assert_untouched(executor, live, twin, twin_live, exact=False)


# ---------------------------------------------------------------------------------------------
# 2. Cancellation can neither strand a slot nor apply a call twice.


def test_2a_cancelled_prefills_never_strand_slots(faulty):
    """Cancelling 3 prefills on a pool of 2 left the pool full forever: calls ran on in their
    thread and their handles never reached anyone. Cancelled while queued, they never run;
    while running, they are rolled back."""
    executor = make(faulty, max_batch_size=2)
    twin = make(faulty, max_batch_size=2)

    async def scenario():
        FAULTS.gate.clear()
        tasks = [
            asyncio.create_task(executor.prefill(PrefillInput(np.asarray([[5 + i, 6]]))))
            for i in range(3)
        ]
        assert await asyncio.to_thread(FAULTS.entered.wait, WATCHDOG_S)  # the first one runs
        for task in tasks:
            task.cancel()
        FAULTS.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        return await executor.prefill(PrefillInput(np.asarray([[1, 2, 3], [4, 5, 6]])))

    out = run(scenario())
    assert executor.status().current_batch_size == 2 and executor.status().is_ready
    ref = run(twin.prefill(PrefillInput(np.asarray([[1, 2, 3], [4, 5, 6]]))))
    np.testing.assert_array_equal(logits_of(out), logits_of(ref))


def test_2b_timed_out_decode_is_rolled_back(faulty):
    """A decode that timed out under `wait_for` still ran, so retrying it appended the token
    twice. The abandoned call is rolled back: the retry is the only decode."""
    executor, live, twin, twin_live = pair(faulty)
    (a, ta) = live[0]

    async def scenario():
        FAULTS.gate.clear()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                executor.decode(DecodeInput(np.asarray([[ta]]), a)), timeout=0.05
            )
        FAULTS.gate.set()
        return await executor.decode(DecodeInput(np.asarray([[ta]]), a))

    retried = run(scenario())
    assert a.num_tokens() == len(PROMPTS[0]) + 1
    np.testing.assert_array_equal(logits_of(retried), decode(twin, *twin_live[0]))
    assert_untouched(executor, live[1:], twin, twin_live[1:])


def test_2c_cancelled_after_finishing_but_before_delivery(faulty):
    """The call finished on the worker but its caller was cancelled before the result
    arrived: nobody will ever see that token, so it is taken back."""
    executor, live, twin, twin_live = pair(faulty)
    (a, ta) = live[0]

    async def scenario():
        task = asyncio.create_task(executor.decode(DecodeInput(np.asarray([[ta]]), a)))
        await asyncio.sleep(0)  # the task submits its call
        deadline = time.monotonic() + WATCHDOG_S
        while a.num_tokens() == len(PROMPTS[0]):  # blocks the loop: no delivery can happen
            assert time.monotonic() < deadline
            time.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await executor.decode(DecodeInput(np.asarray([[ta]]), a))

    retried = run(scenario())
    assert a.num_tokens() == len(PROMPTS[0]) + 1
    np.testing.assert_array_equal(logits_of(retried), decode(twin, *twin_live[0]))


def test_2d_cancelled_reprefill_restores_the_old_sequence(faulty):
    """A cancelled prefill into an existing handle had overwritten that sequence; the
    rollback replays its old tokens into the slot."""
    executor, live, twin, twin_live = pair(faulty)
    (a, _) = live[0]

    async def scenario():
        FAULTS.gate.clear()
        task = asyncio.create_task(
            executor.prefill(PrefillInput(np.asarray([[30, 31, 32, 33, 34]]), kv_cache=a))
        )
        assert await asyncio.to_thread(FAULTS.entered.wait, WATCHDOG_S)
        task.cancel()
        FAULTS.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return executor.status()  # the rollback ran before this call on the same worker

    run(scenario())
    run(executor.forward(np.asarray([[1]])))  # queued behind the rollback
    assert a.num_tokens() == len(PROMPTS[0])
    assert_untouched(executor, live, twin, twin_live, exact=False)


# ---------------------------------------------------------------------------------------------
# 3. Stale cache contents never reach a later sequence.


def test_3a_released_slot_values_never_reach_a_later_sequence(model):
    """Released slots were never cleared, and masked attention multiplies probability 0 by
    stored values: NaN left past a later sequence's length made its logits NaN."""
    poison = 77
    embed = model.params["embed"][...]
    params = jax.tree.map(lambda x: x, model.params)
    params["embed"].set_value(embed.at[poison].set(jnp.nan))
    bad = model.with_params(params)
    # One page in the pool: the later sequence must get the page the poisoned one left (the
    # free list is FIFO, so a bigger pool would hand out a never-used page and prove nothing).
    one_page = dict(max_batch_size=1, max_kv_tokens=16, block_size=16)
    executor, fresh = make(bad, **one_page), make(bad, **one_page)
    handle, _ = start(executor, [5, 6, poison, 8, 9, 10, 11, 12])
    poisoned_pages = handle.block_table().physical_blocks
    executor.release_cache(handle.cache_id())
    reused = start(executor, [5, 6])
    assert reused[0].block_table().physical_blocks == poisoned_pages
    clean = start(fresh, [5, 6])
    got, want = decode(executor, *reused), decode(fresh, *clean)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [256, -1, -256], ids=["past_vocab", "minus_one", "wraps"])
def test_3b_engine_refuses_out_of_range_ids_in_jax_arrays(model, bad):
    """The functional API passed out-of-range ids in jax arrays straight through (NaN logits;
    ids in [-V, 0) wrapped silently)."""
    g, p = model.graphdef, model.params
    cache = init_cache(model.config, 2, MAX_LEN)
    tokens = jnp.asarray([[5, bad, 7], [1, 2, 3]], jnp.int32)
    for call in (
        lambda: engine.prefill(g, p, cache, tokens),
        lambda: engine.extend(g, p, cache, tokens),
        lambda: engine.decode(g, p, cache, tokens[:, 1]),
        lambda: engine.forward(g, p, tokens),
        lambda: engine.generate(g, p, tokens, max_new_tokens=2),
    ):
        refused(ErrorKind.INVALID_PARAMETER, call, str(bad))
    assert not any(x.is_deleted() for x in jax.tree.leaves(cache))


# ---------------------------------------------------------------------------------------------
# 4. The event loop never waits for device work.


def test_4_host_calls_do_not_wait_for_device_work(faulty):
    """`release_cache()` (and `shutdown()`, handle queries) took the executor's lock on the
    event loop: one during `warmup()` stalled every coroutine for 28.5 s. With a step held
    inside the device, host calls still return."""
    executor = make(faulty)
    (a, _), (b, tb) = start(executor, [5, 6, 7]), start(executor, [8, 9])

    async def scenario():
        FAULTS.gate.clear()
        busy = asyncio.create_task(executor.decode(DecodeInput(np.asarray([[tb]]), b)))
        assert await asyncio.to_thread(FAULTS.entered.wait, WATCHDOG_S)
        assert returns_while_worker_is_blocked(lambda: executor.release_cache(a.cache_id())) is None
        status = returns_while_worker_is_blocked(executor.status)
        assert status.current_batch_size == 1
        returns_while_worker_is_blocked(executor.metrics)
        assert returns_while_worker_is_blocked(b.num_tokens) == 2
        assert returns_while_worker_is_blocked(lambda: a.is_valid()) is False
        returns_while_worker_is_blocked(b.block_table)
        returns_while_worker_is_blocked(b.stats)
        FAULTS.gate.set()
        await busy
        shutdown = asyncio.create_task(executor.shutdown())  # waits for nothing on the loop
        await asyncio.sleep(0)
        await shutdown

    run(scenario())
    assert executor.status().state is ExecutorState.SHUTDOWN


# ---------------------------------------------------------------------------------------------
# 5. Sizes are checked before anything is allocated.


def test_5a_pool_larger_than_memory_is_refused_before_allocation():
    """`max_batch_size=1000` on SmolLM2 (94 GB of KV) allocated ~16 GB, then died with a raw
    RESOURCE_EXHAUSTED. The pool is checked against free memory first (the model here is
    SmolLM2's shape without weights: nothing is allocated to find out)."""
    config = ModelConfig.from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
        }
    )
    smollm2_shape = Model(config, *abstract_model(config))
    refused(
        ErrorKind.RESOURCE_EXHAUSTED,
        lambda: JaxModelExecutor(smollm2_shape, max_batch_size=1000, memory_limit_bytes=16 << 30),
        "KV pool of 128000 pages",
        "MiB",
    )
    # Without a limit the device's own free memory decides: no machine has 94 PB.
    refused(
        ErrorKind.RESOURCE_EXHAUSTED,
        lambda: JaxModelExecutor(smollm2_shape, max_batch_size=10**6),
        "KV pool of 128000000 pages",
    )


@pytest.mark.parametrize("value", [2.5, "4", None, True, 0, -3])
def test_5a_pool_sizes_must_be_integers(model, value):
    """`max_batch_size` 2.5 / '4' / None raised raw Python errors (or passed silently)."""
    for name in ("max_batch_size", "max_sequence_length", "block_size"):
        refused(ErrorKind.CONFIG, lambda n=name: make(model, **{n: value}), name)


def test_5b_engine_decode_and_extend_past_max_len_are_refused(model):
    """Functional `decode` on a full row kept increasing its length past `max_len` (writes
    dropped, wrong logits); `extend` likewise."""
    g, p = model.graphdef, model.params
    cache = init_cache(model.config, 2, 16)
    _, cache = engine.prefill(g, p, cache, np.ones((2, 16), np.int32), lengths=[16, 3])
    refused(ErrorKind.REQUEST_VALIDATION, lambda: engine.decode(g, p, cache, np.asarray([1, 2])))
    refused(
        ErrorKind.REQUEST_VALIDATION,
        lambda: engine.decode(g, p, cache, np.asarray([1]), slots=[0]),
        "16",
    )
    refused(
        ErrorKind.REQUEST_VALIDATION,
        lambda: engine.extend(g, p, cache, np.ones((1, 14), np.int32), slots=[1]),
        "17",
    )
    assert not any(x.is_deleted() for x in jax.tree.leaves(cache))
    # Row 1 still has room: decoding it alone is fine.
    _, cache = engine.decode(g, p, cache, np.asarray([1]), slots=[1])
    assert np.asarray(cache.lengths).tolist() == [16, 4]


@pytest.mark.parametrize(
    ("slots", "lengths", "words"),
    [
        ([0], [-1], "[0, 16]"),
        ([0], [17], "[0, 16]"),
        ([2], [1], "slots"),
        ([-1], [1], "slots"),
        ([0, 1], [1], "lengths"),
        ([0, 0], [1, 2], "distinct"),
    ],
)
def test_5c_set_lengths_checks_its_ranges(model, slots, lengths, words):
    """`set_lengths` accepted negative and out-of-range values."""
    cache = init_cache(model.config, 2, 16)
    refused(ErrorKind.INVALID_PARAMETER, lambda: engine.set_lengths(cache, slots, lengths), words)


# ---------------------------------------------------------------------------------------------
# 8. Every bad input is one FerrumError (no raw Python error, nothing silently accepted).


def bad_calls(executor, handle, multi) -> dict[str, tuple[ErrorKind, Callable]]:
    """Red-team finding 8's inputs, by name: (expected kind, call)."""
    ids = PrefillInput

    def spec(*args):
        return executor.speculative_decode(*args)

    one = DecodeInput(np.asarray([[5]]), handle)
    return {
        "ragged_ids": (ErrorKind.INVALID_PARAMETER, lambda: executor.prefill(ids([[1, 2], [3]]))),
        "ragged_mask": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(ids(np.ones((2, 2), np.int32), attention_mask=[[1, 1], [1]])),
        ),
        "ragged_positions": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(ids(np.ones((1, 2), np.int32), position_ids=[[0, 1], [0]])),
        ),
        "string_ids": (ErrorKind.INVALID_PARAMETER, lambda: executor.prefill(ids([["a", "b"]]))),
        "none_ids": (ErrorKind.INVALID_PARAMETER, lambda: executor.prefill(ids(None))),
        "bool_ids": (ErrorKind.INVALID_PARAMETER, lambda: executor.prefill(ids([[True]]))),
        "no_handle": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.decode(DecodeInput(np.asarray([[5]]), None)),
        ),
        "not_an_input": (ErrorKind.INVALID_PARAMETER, lambda: executor.batch_decode([handle])),
        "mask_half": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(ids(np.ones((1, 2), np.int32), attention_mask=[[1, 0.5]])),
        ),
        "mask_nan": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(ids(np.ones((1, 2), np.int32), attention_mask=[[1, np.nan]])),
        ),
        "mask_negative": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(ids(np.ones((1, 2), np.int32), attention_mask=[[1, -1]])),
        ),
        "mask_string": (
            ErrorKind.INVALID_PARAMETER,
            lambda: executor.prefill(ids(np.ones((1, 2), np.int32), attention_mask=[["1", "0"]])),
        ),
        "draft_nan": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [float("nan")], 1.0)),
        "draft_huge": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [2**70], 1.0)),
        "draft_string": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, ["5"], 1.0)),
        "draft_none": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, None, 1.0)),
        "draft_float": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [5.0], 1.0)),
        "draft_bool": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [True], 1.0)),
        "draft_2d": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [[5]], 1.0)),
        "threshold_none": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [5], None)),
        "threshold_string": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [5], "0.5")),
        "threshold_nan": (ErrorKind.INVALID_PARAMETER, lambda: spec(one, [5], math.nan)),
        "multi_row_speculative": (
            ErrorKind.INVALID_PARAMETER,
            lambda: spec(DecodeInput(np.asarray([[5], [6]]), multi), [5], 1.0),
        ),
        "drafts_past_max": (
            ErrorKind.REQUEST_VALIDATION,
            lambda: spec(one, [5] * MAX_LEN, 1.0),
        ),
        "layer_string": (ErrorKind.INVALID_PARAMETER, lambda: handle.key_cache("0")),
    }


BAD_NAMES = list(bad_calls(None, None, None))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_8_bad_input_is_one_ferrum_error(model, name):
    executor, live, twin, twin_live = pair(model, max_batch_size=6)
    multi = run(executor.prefill(PrefillInput(np.asarray([[5, 6], [7, 8]])))).kv_cache
    run(twin.prefill(PrefillInput(np.asarray([[5, 6], [7, 8]]))))
    kind, call = bad_calls(executor, live[0][0], multi)[name]
    refused(kind, call)
    assert_untouched(executor, live, twin, twin_live)


def test_8_generate_refuses_sampling_params_of_another_batch(model):
    from ferrum_jax.sampling import SamplingParams

    refused(
        ErrorKind.INVALID_PARAMETER,
        lambda: engine.generate(
            model.graphdef,
            model.params,
            np.ones((2, 3), np.int32),
            max_new_tokens=2,
            sampling=SamplingParams.make(3, temperature=1.0),
        ),
        "sampling",
    )
