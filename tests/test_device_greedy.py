"""Ferrum main's `LogitsReturnPolicy.GreedyArgmax` through the executor: the token picked in
the step equals the host argmax of the full logits after the same penalty and mask, only the
token id travels to the host, and greedy chains equal the full-logits path."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import params_from_hf, tiny_hf_model

from ferrum_jax.engine_loop import EngineHandle
from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.interfaces import (
    DecodeInput,
    GreedyRepetitionPenalty,
    LogitsReturnPolicy,
    PrefillInput,
    TokenSelectionMask,
    UnifiedBatch,
    UnifiedBatchItem,
)

VOCAB = 256
FULL = LogitsReturnPolicy.FullLogits


@pytest.fixture(scope="module")
def model():
    return params_from_hf(tiny_hf_model("llama", num_hidden_layers=2))


def make(model) -> JaxModelExecutor:
    config, graphdef, params = model
    return JaxModelExecutor(
        config,
        graphdef,
        params,
        max_batch_size=8,
        max_sequence_length=128,
        block_size=16,
        max_num_batched_tokens=64,
    )


def unified(executor, items) -> list:
    batch = [
        UnifiedBatchItem(s, t, EngineHandle(s), o, final, logits_policy=policy)
        for s, t, o, final, policy in items
    ]
    return asyncio.run(executor.unified_decode(UnifiedBatch(batch)))


def reference(logits: np.ndarray, policy: LogitsReturnPolicy) -> int | None:
    """The reference's choice on the host (ENGINE-NOTES "Token choice"); None: no id allowed."""
    logits = np.asarray(logits, np.float32).copy()
    rep = policy.repetition_penalty
    if rep is not None:
        for t in set(rep.token_ids):
            if t < len(logits) and np.isfinite(logits[t]):
                v, penalty = logits[t], np.float32(rep.penalty)  # f32, as in Rust
                logits[t] = v / penalty if v > 0 else v * penalty
    allowed = np.isfinite(logits)
    if policy.token_mask is not None:
        m = policy.token_mask.allowed()[: len(logits)]
        allowed[: len(m)] &= m
        allowed[len(m) :] = False
    if not allowed.any():
        return None
    return int(np.argmax(np.where(allowed, logits, -np.inf)))  # first index of the max


def random_policy(rng: np.random.Generator) -> LogitsReturnPolicy:
    mask = None
    if rng.random() < 0.8:
        bits = (rng.random(int(rng.integers(VOCAB // 2, VOCAB + 8))) < 0.3).astype(np.int8)
        mask = TokenSelectionMask.new(bits)
    penalty = None
    if rng.random() < 0.7:
        ids = rng.integers(0, VOCAB + 4, size=int(rng.integers(1, 20))).tolist()
        penalty = GreedyRepetitionPenalty.new(float(rng.uniform(0.5, 3.0)), ids)
    return LogitsReturnPolicy.GreedyArgmax(token_mask=mask, repetition_penalty=penalty)


def prompt(i: int, n: int) -> list[int]:
    return [(11 * i + 7 * j) % (VOCAB - 3) + 3 for j in range(n)]


def test_unified_greedy_equals_host_argmax_of_full_logits(model):
    """Mixed batches: greedy and full-logits items, a non-final chunk, prefills and decodes,
    random masks and penalties; each greedy answer is `[token]` and equals the host choice
    on the full logits of a twin that asked for them."""
    executor, twin = make(model), make(model)
    rng = np.random.default_rng(0)
    lengths = {}
    for step in range(6):
        items, twin_items = [], []
        for i in range(6):
            seq = f"s{i}"
            start = lengths.get(seq, 0)
            n = int(rng.integers(2, 30)) if start == 0 else 1
            final = not (start == 0 and i == 5 and step == 0)  # one non-final chunk
            policy = random_policy(rng) if i % 3 else FULL
            tokens = prompt(i + step, n)
            items.append((seq, tokens, start, final, policy))
            twin_items.append((seq, tokens, start, final, FULL))
            lengths[seq] = start + n
        got, want = unified(executor, items), unified(twin, twin_items)
        for (seq, _, _, final, policy), g, w in zip(items, got, want, strict=True):
            if not final:
                assert g is None and w is None
            elif policy is FULL:
                np.testing.assert_array_equal(g, w)
            else:
                choice = reference(w, policy)
                if choice is None:
                    np.testing.assert_array_equal(g, w)  # no allowed id: full logits
                else:
                    assert g.shape == (1,) and g.dtype == np.float32, (seq, g.shape)
                    assert int(g[0]) == choice, (step, seq)


def test_no_allowed_id_returns_full_logits(model):
    executor, twin = make(model), make(model)
    nothing = LogitsReturnPolicy.GreedyArgmax(TokenSelectionMask.new(np.zeros(VOCAB, np.int8)))
    (got,) = unified(executor, [("a", prompt(0, 5), 0, True, nothing)])
    (want,) = unified(twin, [("a", prompt(0, 5), 0, True, FULL)])
    np.testing.assert_array_equal(got, want)


def test_a_penalty_tie_goes_to_the_lowest_allowed_id(model):
    """The larger of the two best logits penalised down onto the smaller one (float32
    division, as on the device): the choice equals the reference's, lowest index on a tie."""
    executor, twin = make(model), make(model)
    (want,) = unified(twin, [("a", prompt(1, 9), 0, True, FULL)])
    top = np.argsort(want)[-2:]
    hi, lo = int(top[1]), int(top[0])
    assert want[lo] > 0, "the tiny model's best logits are positive for this prompt"
    mask = np.zeros(VOCAB, np.int8)
    mask[[hi, lo]] = 1
    penalty = float(np.float32(want[hi]) / np.float32(want[lo]))
    policy = LogitsReturnPolicy.GreedyArgmax(
        TokenSelectionMask.new(mask), GreedyRepetitionPenalty.new(penalty, [hi])
    )
    (got,) = unified(executor, [("a", prompt(1, 9), 0, True, policy)])
    assert int(got[0]) == reference(want, policy)


def test_greedy_chain_of_64_tokens_equals_the_full_logits_path(model):
    """A greedy request with a mask and a penalty over its generated ids, decoded 64 steps
    by the device choice and by the host choice on full logits: the same tokens."""
    executor, twin = make(model), make(model)
    mask = np.ones(VOCAB, np.int8)
    mask[::7] = 0
    chains = []
    for ex, device in ((executor, True), (twin, False)):
        generated: list[int] = []
        start = prompt(3, 12)
        offset, tokens = 0, start
        for _ in range(64):
            penalty = (
                GreedyRepetitionPenalty.new(1.3, sorted(set(generated))) if generated else None
            )
            policy = LogitsReturnPolicy.GreedyArgmax(TokenSelectionMask.new(mask), penalty)
            (out,) = unified(ex, [("g", tokens, offset, True, policy if device else FULL)])
            token = int(out[0]) if device else reference(out, policy)
            offset += len(tokens)
            tokens = [token]
            generated.append(token)
        chains.append(generated)
    assert chains[0] == chains[1]
    assert (
        executor.cache_metrics_snapshot()["logits_bytes_to_host"] * 50
        < (twin.cache_metrics_snapshot()["logits_bytes_to_host"])
    )


def test_batch_decode_greedy_answers_one_token_per_input(model):
    executor, twin = make(model), make(model)
    handles = []
    for ex in (executor, twin):
        outs = asyncio.run(
            ex.batch_prefill([PrefillInput(np.asarray([prompt(i, 6 + i)])) for i in range(3)])
        )
        handles.append([o.kv_cache for o in outs])
    rng = np.random.default_rng(1)
    policies = [random_policy(rng), FULL, random_policy(rng)]
    got = asyncio.run(
        executor.batch_decode(
            [
                DecodeInput(np.asarray([[5]]), h, logits_policy=p)
                for h, p in zip(handles[0], policies, strict=True)
            ]
        )
    )
    want = asyncio.run(twin.batch_decode([DecodeInput(np.asarray([[5]]), h) for h in handles[1]]))
    for g, w, policy in zip(got, want, policies, strict=True):
        g, w = g.logits.to_cpu().to_vec_f32(), w.logits.to_cpu().to_vec_f32()
        if policy is FULL or reference(np.asarray(w), policy) is None:
            assert g == w
        else:
            assert g == [float(reference(np.asarray(w), policy))]


def test_a_bad_policy_is_refused_before_any_change(model):
    executor = make(model)
    before = executor.cache_metrics_snapshot()
    with pytest.raises(FerrumError, match="logits_policy"):
        unified(executor, [("a", [1, 2], 0, True, FULL), ("b", [3], 0, True, "greedy")])
    assert executor.cache_metrics_snapshot() == before
