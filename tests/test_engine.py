"""Engine semantics: rows at different positions, inactive rows, slots, per-row generate
limits and stop tokens, logprobs, and host-side validation (`FerrumError`).

One tiny HF Llama (the same config as test_parity's "gqa" case, so the shared shapes reuse
its compiled programs when both modules run in one process). Caches are donated, so tests
keep numpy snapshots and rebuild device caches from them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import params_from_hf, require_reference, tiny_hf_model

from ferrum_jax import engine
from ferrum_jax.cache import KVCache, init_cache
from ferrum_jax.errors import ErrorKind, FerrumError

TOL = 1e-4
CACHE_ROWS, CACHE_LEN = 4, 64
PROMPT_LENS = (5, 11, 8)
SLOTS = np.array([3, 0, 2])
NEW_TOKENS = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    hf = tiny_hf_model("llama")
    config, graphdef, params = params_from_hf(hf)
    return hf, config, graphdef, params


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(1)
    vocab = model[1].vocab_size
    return [rng.integers(3, vocab, n).astype(np.int32) for n in PROMPT_LENS]


def pad(seqs) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], np.int32)
    tokens = np.zeros((len(seqs), lengths.max()), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return tokens, lengths


def hf_logits(hf, seq) -> np.ndarray:
    torch, _ = require_reference()
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(seq)[None], dtype=torch.long)).logits[0].numpy()


def snapshot(cache: KVCache) -> KVCache:
    """A host copy (numpy leaves) that survives donation of `cache`."""
    return jax.tree.map(np.array, cache)


def restore(snap: KVCache) -> KVCache:
    """A fresh device cache from a snapshot (safe to donate)."""
    return jax.tree.map(jnp.array, snap)


def rows_equal(a: KVCache, b: KVCache, rows) -> bool:
    """Keys, values and lengths of `rows` bit-identical."""
    rows = list(rows)
    return all(
        np.array_equal(np.asarray(x)[rows], np.asarray(y)[rows])
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def running(model, prompts):
    """A full 4-row cache: prompts in rows 3, 0, 2 (one prefill), then `extra` in row 1.

    Returns (sequences per cache row, snapshot before the row-1 prefill, snapshot after,
    logits of the row-1 prefill).
    """
    _, config, graphdef, params = model
    tokens, lengths = pad(prompts)
    cache = init_cache(config, CACHE_ROWS, CACHE_LEN)
    _, cache = engine.prefill(graphdef, params, cache, tokens, lengths, SLOTS, all_logits=True)
    before = snapshot(cache)
    extra = np.random.default_rng(2).integers(3, config.vocab_size, 6).astype(np.int32)
    logits, cache = engine.prefill(graphdef, params, cache, extra[None], None, [1])
    seqs = {int(s): p for s, p in zip(SLOTS, prompts, strict=True)}
    seqs[1] = extra
    return seqs, before, snapshot(cache), np.asarray(logits)


# ------------------------------------------------------------------------------------------
# Prefill / decode into rows and slots.


def test_prefill_into_slots_leaves_other_rows_identical(model, running):
    hf, _, graphdef, params = model
    seqs, before, after, logits = running
    np.testing.assert_allclose(logits[0], hf_logits(hf, seqs[1])[-1], rtol=0, atol=TOL)
    assert np.asarray(after.lengths).tolist() == [len(seqs[r]) for r in range(4)]
    assert rows_equal(before, after, [0, 2, 3])  # every position, not only the valid ones
    # ... and their next decode is bit-identical with or without the new row 1.
    token = np.array([5, 6, 7], np.int32)
    out_before, _ = engine.decode(graphdef, params, restore(before), token, slots=SLOTS)
    out_after, _ = engine.decode(graphdef, params, restore(after), token, slots=SLOTS)
    assert np.array_equal(np.asarray(out_before), np.asarray(out_after))


def test_decode_rows_at_different_positions(model, running):
    """Decode without slots: every cache row continues at its own length."""
    hf, _, graphdef, params = model
    seqs, _, after, _ = running
    cache = restore(after)
    seqs = [list(seqs[r]) for r in range(CACHE_ROWS)]
    assert len({len(s) for s in seqs}) == CACHE_ROWS
    diff = 0.0
    for _ in range(3):
        token = np.array([hf_logits(hf, s)[-1].argmax() for s in seqs], np.int32)
        logits, cache = engine.decode(graphdef, params, cache, token)
        for r, s in enumerate(seqs):
            s.append(int(token[r]))
            diff = max(diff, np.abs(np.asarray(logits[r]) - hf_logits(hf, s)[-1]).max())
    print(f"\ndecode at different positions: max abs diff vs HF {diff:.2e}")
    assert diff <= TOL
    assert np.asarray(cache.lengths).tolist() == [len(s) for s in seqs]


def test_inactive_rows_change_nothing(model, running):
    hf, _, graphdef, params = model
    seqs, _, after, _ = running
    token = np.array([10, 11, 12, 13], np.int32)
    active = np.array([True, False, True, False])
    logits, cache = engine.decode(graphdef, params, restore(after), token, active=active)
    assert rows_equal(after, cache, [1, 3])
    lengths = np.asarray(cache.lengths)
    assert lengths.tolist() == [len(seqs[r]) + int(active[r]) for r in range(CACHE_ROWS)]
    for r in (0, 2):
        ref = hf_logits(hf, [*seqs[r], token[r]])[-1]
        np.testing.assert_allclose(np.asarray(logits[r]), ref, rtol=0, atol=TOL)
    # Written exactly one position in each active row.
    for x, y in zip(after.keys, cache.keys, strict=True):
        changed = np.any(np.asarray(x) != np.asarray(y), axis=(1, 3))  # [rows, positions]
        assert np.flatnonzero(changed[0]).tolist() == [len(seqs[0])]
        assert np.flatnonzero(changed[2]).tolist() == [len(seqs[2])]


def test_decode_with_slots_leaves_other_rows_identical(model, running):
    hf, _, graphdef, params = model
    seqs, _, after, _ = running
    token = np.array([20, 21, 22], np.int32)
    logits, cache = engine.decode(graphdef, params, restore(after), token, slots=SLOTS)
    assert rows_equal(after, cache, [1])
    for i, r in enumerate(SLOTS):
        assert int(cache.lengths[r]) == len(seqs[r]) + 1
        ref = hf_logits(hf, [*seqs[r], token[i]])[-1]
        np.testing.assert_allclose(np.asarray(logits[i]), ref, rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------
# generate: per-row limits, per-row stop tokens, logprobs.


@pytest.fixture(scope="module")
def free_run(model, prompts):
    """Greedy generate without stop tokens (rows 0 and 2 share a prompt)."""
    _, _, graphdef, params = model
    tokens, lengths = pad([prompts[0], prompts[1], prompts[0]])
    out = engine.generate(
        graphdef, params, tokens, lengths, max_new_tokens=NEW_TOKENS, stop_tokens=[]
    )
    return tokens, lengths, out


def test_generate_row_limits_and_row_stop_tokens(model, free_run):
    _, _, graphdef, params = model
    tokens, lengths, free = free_run
    free_tokens = np.asarray(free.tokens)
    assert np.array_equal(free_tokens[0], free_tokens[2])  # same prompt, same tokens
    # Row 0 stops on a token first emitted at step j; row 2 (same tokens) has no stop token.
    j = next(j for j in range(4, 12) if free_tokens[0, j] not in free_tokens[0, :j])
    stop_tok = int(free_tokens[0, j])
    # Row 1 would stop at a token it first emits after its limit of 5: the limit wins.
    late = next(
        int(t) for k, t in enumerate(free_tokens[1]) if k >= 5 and t not in free_tokens[1, :5]
    )
    stop = np.array([[stop_tok, -1], [-1, late], [-1, -1]], np.int32)
    row_max = np.array([NEW_TOKENS, 5, 20], np.int32)
    out = engine.generate(
        graphdef,
        params,
        tokens,
        lengths,
        max_new_tokens=NEW_TOKENS,
        row_max_new_tokens=row_max,
        stop_tokens=stop,
    )
    got, n = np.asarray(out.tokens), np.asarray(out.lengths)
    assert n.tolist() == [j + 1, 5, 20]
    assert np.asarray(out.stopped).tolist() == [True, False, False]
    for i in range(3):
        assert np.array_equal(got[i, : n[i]], free_tokens[i, : n[i]])
        assert (got[i, n[i] :] == -1).all()
        assert (np.asarray(out.logprobs)[i, n[i] :] == 0).all()
    assert stop_tok in got[2]  # row 2 went past row 0's stop token


def test_generate_logprobs_match_hf(model, prompts, free_run):
    hf = model[0]
    _, _, free = free_run
    got, logps = np.asarray(free.tokens), np.asarray(free.logprobs)
    diff = 0.0
    for i, prompt in enumerate([prompts[0], prompts[1], prompts[0]]):
        ref = hf_logits(hf, np.concatenate([prompt, got[i]]))[len(prompt) - 1 : -1]
        top = ref.max(-1, keepdims=True)
        log_softmax = ref - top - np.log(np.exp(ref - top).sum(-1, keepdims=True))
        want = np.take_along_axis(log_softmax, got[i][:, None], axis=-1)[:, 0]
        diff = max(diff, np.abs(logps[i] - want).max())
    print(f"\nlogprobs: max abs diff vs HF log_softmax {diff:.2e}")
    assert diff <= TOL


# ------------------------------------------------------------------------------------------
# Validation: FerrumError before any device work, the cache left intact.


@contextlib.contextmanager
def refused(*caches: KVCache) -> Iterator[None]:
    with pytest.raises(FerrumError) as info:
        yield
    assert info.value.kind is ErrorKind.INVALID_PARAMETER, info.value
    for cache in caches:  # not donated: the failed call touched nothing
        assert not any(x.is_deleted() for x in jax.tree.leaves(cache))


BAD_PROMPTS = {
    "out_of_range": [[1, 2, 256]],
    "negative": [[1, -1, 2]],
    "float_ids": np.array([[1.0, 2.0]]),
    "float_jax_ids": jnp.array([[1.0, 2.0]]),
    "empty": np.zeros((1, 0), np.int32),
    "empty_list": [[]],
    "1d": [1, 2, 3],
    "too_long": np.ones((1, CACHE_LEN + 1), np.int32),
}


@pytest.mark.parametrize("name", BAD_PROMPTS)
def test_prefill_refuses_bad_tokens(model, name):
    _, config, graphdef, params = model
    cache = init_cache(config, CACHE_ROWS, CACHE_LEN)
    with refused(cache):
        engine.prefill(graphdef, params, cache, BAD_PROMPTS[name])


@pytest.mark.parametrize("name", [n for n in BAD_PROMPTS if n != "too_long"])
def test_generate_and_forward_refuse_bad_tokens(model, name):
    _, _, graphdef, params = model
    with refused():
        engine.generate(graphdef, params, BAD_PROMPTS[name], max_new_tokens=4)
    with refused():
        engine.forward(graphdef, params, BAD_PROMPTS[name])


@pytest.mark.parametrize(
    "lengths", [[0, 3], [3, 4], [-1, 2], [3], [[3, 3]]], ids=["zero", "over", "neg", "short", "2d"]
)
def test_bad_lengths(model, lengths):
    _, config, graphdef, params = model
    tokens = np.ones((2, 3), np.int32)
    cache = init_cache(config, CACHE_ROWS, CACHE_LEN)
    with refused(cache):
        engine.prefill(graphdef, params, cache, tokens, lengths)
    with refused(cache):
        engine.extend(graphdef, params, cache, tokens, lengths)
    with refused():
        engine.generate(graphdef, params, tokens, lengths, max_new_tokens=4)


@pytest.mark.parametrize(
    "slots", [[1, 1], [0, 4], [-1, 0], [0], [0, 1, 2]], ids=["dup", "over", "neg", "short", "long"]
)
def test_bad_slots(model, slots):
    _, config, graphdef, params = model
    cache = init_cache(config, CACHE_ROWS, CACHE_LEN)
    with refused(cache):
        engine.prefill(graphdef, params, cache, np.ones((2, 3), np.int32), None, slots)
    with refused(cache):
        engine.extend(graphdef, params, cache, np.ones((2, 3), np.int32), None, slots)
    with refused(cache):
        engine.decode(graphdef, params, cache, np.ones((2,), np.int32), slots)


@pytest.mark.parametrize(
    "tokens",
    [[1, 2, 256, 3], [1, -2, 3, 4], np.ones(4), [1, 2, 3], np.ones((4, 1), np.int32)],
    ids=["out_of_range", "negative", "float", "wrong_batch", "2d"],
)
def test_decode_refuses_bad_tokens(model, tokens):
    _, config, graphdef, params = model
    cache = init_cache(config, CACHE_ROWS, CACHE_LEN)
    with refused(cache):
        engine.decode(graphdef, params, cache, tokens)


def test_prefill_batch_larger_than_cache(model):
    _, config, graphdef, params = model
    cache = init_cache(config, 2, CACHE_LEN)
    with refused(cache):
        engine.prefill(graphdef, params, cache, np.ones((3, 4), np.int32))


def test_generate_bad_arguments(model):
    _, _, graphdef, params = model
    tokens = np.ones((2, 3), np.int32)
    with refused():
        engine.generate(graphdef, params, tokens, max_new_tokens=0)
    with refused():
        engine.generate(graphdef, params, tokens, max_new_tokens=4, stop_tokens=[[1], [2], [3]])
