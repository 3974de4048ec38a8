"""Sampling on hand-made logits: filters, greedy, seeds, row independence, frequencies,
parameter validation; and sampled `generate` (seeds, batch-composition independence).

Many draws come from one call: `sample` draws one token per row with that row's key, so a
batch of N identical rows with N keys is N independent draws (vmapped `categorical`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import engine
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import init_model
from ferrum_jax.sampling import (
    SEED_LIMIT,
    TOP_K_MAX,
    SamplingParams,
    check_seed,
    check_top_k,
    row_keys,
    sample,
    token_logprobs,
)
from ferrum_jax.streaming import stream_tokens

N = 4096  # draws per statistical check
sample_jit = jax.jit(sample)

# Probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04, deliberately out of order in the vocab.
PROBS = np.array([0.1, 0.4, 0.04, 0.25, 0.06, 0.15])
LOGITS = np.log(PROBS).astype(np.float32)
ORDER = np.argsort(-PROBS)  # token ids from most to least likely: 1, 3, 5, 0, 4, 2


def draw(logits=LOGITS, seed=0, n=N, **params) -> np.ndarray:
    """`n` draws from the same logits, one row each."""
    rows = np.broadcast_to(np.asarray(logits, np.float32), (n, len(logits)))
    sp = SamplingParams.make(n, **params)
    return np.asarray(sample_jit(jnp.asarray(rows), sp, row_keys(seed, n)))


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=len(probs))
    expected = probs * len(tokens)
    seen = expected > 0
    assert counts[~seen].sum() == 0, counts  # nothing drawn where the probability is 0
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


# Chi-square critical value for p = 0.001 at 5 degrees of freedom is 20.5; the draws are
# seeded, so this never flakes, and a wrong distribution (e.g. temperature ignored) is far
# beyond it.
CHI2_BOUND = 25.0


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# ------------------------------------------------------------------------------------------
# Filters.


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_stays_in_k_largest(k):
    tokens = draw(temperature=1.0, top_k=k)
    assert set(tokens.tolist()) == set(ORDER[:k].tolist())  # only the k largest, and all of them
    kept = np.zeros_like(PROBS)
    kept[ORDER[:k]] = PROBS[ORDER[:k]]
    if k > 1:
        assert chi_square(tokens, kept / kept.sum()) < CHI2_BOUND  # renormalised, not skewed


def test_top_k_per_row():
    ks = np.resize([1, 2, 4], N)
    tokens = draw(temperature=1.0, top_k=ks)
    for k in (1, 2, 4):
        assert set(tokens[ks == k].tolist()) == set(ORDER[:k].tolist())


def test_filtered_and_unfiltered_rows_in_one_batch():
    """Rows with `top_k=1` or a one-token nucleus stay on the most likely token while other
    rows of the same batch sample the whole vocabulary.

    Mutation guarded: sampling's "any sampled row needs the vocab sort" flipped to "all rows".
    """
    filtered = np.resize([True, False], N)
    tokens = draw(temperature=1.0, top_k=np.where(filtered, 1, 0))
    assert set(tokens[filtered].tolist()) == {ORDER[0]}
    assert chi_square(tokens[~filtered], PROBS) < CHI2_BOUND
    tokens = draw(temperature=1.0, top_p=np.where(filtered, 0.3, 1.0))
    assert set(tokens[filtered].tolist()) == {ORDER[0]}
    assert chi_square(tokens[~filtered], PROBS) < CHI2_BOUND


@pytest.mark.parametrize(
    ("p", "nucleus"),
    # Cumulative mass of the sorted probabilities: 0.4, 0.65, 0.8, 0.9, 0.96, 1.0.
    [(0.3, 1), (0.39, 1), (0.41, 2), (0.64, 2), (0.66, 3), (0.85, 4), (0.95, 5), (0.97, 6)],
)
def test_top_p_stays_in_nucleus(p, nucleus):
    # Smallest set of most likely tokens whose mass reaches p (HF's TopPLogitsWarper).
    tokens = draw(temperature=1.0, top_p=p)
    assert set(tokens.tolist()) == set(ORDER[:nucleus].tolist())
    kept = np.zeros_like(PROBS)
    kept[ORDER[:nucleus]] = PROBS[ORDER[:nucleus]]
    if nucleus > 1:
        assert chi_square(tokens, kept / kept.sum()) < CHI2_BOUND


def test_top_k_then_top_p():
    # top_k=4 renormalises to 0.4/0.9, 0.25/0.9, ...: top_p=0.7 then needs 2 tokens (0.72).
    tokens = draw(temperature=1.0, top_k=4, top_p=0.7)
    assert set(tokens.tolist()) == set(ORDER[:2].tolist())


@pytest.mark.parametrize(("m", "kept"), [(0.2, 4), (0.3, 3), (0.5, 2), (0.9, 1), (0.0, 6)])
def test_min_p_filters(m, kept):
    # Tokens below min_p * p_max (p_max = 0.4) are dropped: 0.2 -> 0.08 keeps 0.4..0.1.
    tokens = draw(temperature=1.0, min_p=m)
    assert set(tokens.tolist()) == set(ORDER[:kept].tolist())


def test_temperature_zero_is_greedy_whatever_the_filters():
    logits = jax.random.normal(jax.random.key(3), (64, 50)) * 3
    sp = SamplingParams.make(64, temperature=0.0, top_k=5, top_p=0.3, min_p=0.2)
    tokens = sample_jit(logits, sp, row_keys(0, 64))
    assert np.array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, -1)))
    # Greedy rows stay greedy next to sampled rows.
    temps = np.tile([0.0, 1.5], 32)
    sp = SamplingParams.make(64, temperature=temps, top_k=np.tile([3, 0], 32), top_p=0.9)
    tokens = np.asarray(sample_jit(logits, sp, row_keys(0, 64)))
    greedy = np.asarray(jnp.argmax(logits, -1))
    assert np.array_equal(tokens[temps == 0], greedy[temps == 0])
    assert not np.array_equal(tokens[temps > 0], greedy[temps > 0])


# ------------------------------------------------------------------------------------------
# Randomness.


def test_same_seed_same_tokens_different_seed_different():
    flat = np.zeros(6, np.float32)  # uniform: two independent draws agree 1/6 of the time
    a, b, c = (draw(flat, seed=s, n=1024, temperature=1.0) for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert np.mean(a == c) < 0.25


def test_rows_are_independent():
    """Changing odd rows' logits and params leaves every even row's draw unchanged."""
    n = 512
    base = jax.random.normal(jax.random.key(1), (n, 32))
    keys = row_keys(11, n)
    sp = SamplingParams.make(n, temperature=1.0)
    first = np.asarray(sample_jit(base, sp, keys))
    odd = np.arange(n) % 2 == 1
    other = jnp.where(odd[:, None], base[::-1] * 3, base)
    sp2 = SamplingParams.make(
        n,
        temperature=np.where(odd, 0.5, 1.0),
        top_k=np.where(odd, 3, 0),
        top_p=np.where(odd, 0.8, 1.0),
        min_p=np.where(odd, 0.1, 0.0),
    )
    second = np.asarray(sample_jit(other, sp2, keys))
    assert np.array_equal(first[~odd], second[~odd])
    assert not np.array_equal(first[odd], second[odd])
    # Each row draws with its own key: new keys for the odd rows only move the odd rows.
    new_keys = jnp.where(odd, row_keys(12, n), keys)
    third = np.asarray(sample_jit(base, sp, new_keys))
    assert np.array_equal(first[~odd], third[~odd])
    assert np.mean(first[odd] != third[odd]) > 0.5
    # A row alone draws what it draws inside the batch.
    alone = sample_jit(base[:1], SamplingParams.make(1, temperature=1.0), keys[:1])
    assert int(alone[0]) == first[0]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax(temperature):
    tokens = draw(temperature=temperature, n=4 * N, seed=5)
    probs = softmax(LOGITS / temperature)
    stat = chi_square(tokens, probs)
    assert stat < CHI2_BOUND, (stat, np.bincount(tokens, minlength=6) / len(tokens), probs)


def test_token_logprobs():
    logits = jax.random.normal(jax.random.key(2), (4, 10))
    tokens = jnp.array([0, 3, 9, 5])
    want = np.asarray(jax.nn.log_softmax(logits))[np.arange(4), np.asarray(tokens)]
    np.testing.assert_allclose(np.asarray(token_logprobs(logits, tokens)), want, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": [1.0, -1.0, 1.0]},
        {"top_k": -1},
        {"top_k": 1.5},
        {"top_k": 2.0},
        {"top_k": True},
        {"top_k": 1e23},
        {"top_k": 2**31},  # past int32: it would overflow at the first sampled step
        {"top_k": 1099511627776},
        {"top_k": [1, 2**40, 3]},
        {"top_p": 0.0},
        {"top_p": 1.1},
        {"top_p": float("nan")},
        {"top_p": -0.5},
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"min_p": float("nan")},
    ],
    ids=repr,
)
def test_make_validation(params):
    with pytest.raises(FerrumError) as info:
        SamplingParams.make(3, **params)
    assert info.value.kind is ErrorKind.INVALID_PARAMETER
    assert next(iter(params)) in str(info.value)


@pytest.mark.parametrize("seed", [-1, 2**63, True, 1.5, "7", None], ids=repr)
def test_seeds_are_integers_in_range_everywhere(seed):
    """One rule for seeds: the CLI's --seed, JSONL lines and `row_keys` all refuse these."""
    with pytest.raises(FerrumError, match="seed must be an integer in") as info:
        check_seed(seed)
    assert info.value.kind is ErrorKind.INVALID_PARAMETER
    with pytest.raises(FerrumError, match="seed must be an integer in"):
        row_keys(seed, 2)
    with pytest.raises(FerrumError, match="seed must be an integer in"):
        row_keys([0, seed], 2)


@pytest.mark.parametrize("value", [[1, 2], np.array([3]), np.int64(-1)], ids=repr)
def test_a_scalar_rule_refuses_arrays(value):
    for check in (check_seed, check_top_k):
        with pytest.raises(FerrumError, match="must be an integer in"):
            check(value)


def test_the_largest_top_k_and_seed_are_accepted():
    assert check_top_k(TOP_K_MAX) == TOP_K_MAX and check_seed(SEED_LIMIT - 1) == SEED_LIMIT - 1
    assert np.asarray(SamplingParams.make(1, top_k=np.int64(TOP_K_MAX)).top_k).tolist() == [
        TOP_K_MAX
    ]


def test_make_broadcasts_and_types():
    sp = SamplingParams.make(3, temperature=[0.0, 0.5, 1.0], top_k=2, top_p=0.9, min_p=0.05)
    assert sp.temperature.shape == sp.top_k.shape == sp.top_p.shape == sp.min_p.shape == (3,)
    assert sp.top_k.dtype == jnp.int32 and sp.temperature.dtype == jnp.float32
    assert np.asarray(sp.top_k).tolist() == [2, 2, 2]


def test_row_keys():
    assert row_keys(3, 4).shape == (4,)
    seeds = row_keys(np.array([5, 6, 5]), 3)
    data = jax.vmap(jax.random.key_data)(seeds)
    assert np.array_equal(data[0], data[2]) and not np.array_equal(data[0], data[1])
    with pytest.raises(FerrumError) as info:
        row_keys(np.array([1, 2]), 3)
    assert info.value.kind is ErrorKind.INVALID_PARAMETER


# ------------------------------------------------------------------------------------------
# Sampled generate.

GEN_CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
)
GEN_PROMPTS = np.array([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13], [14, 15, 0, 0, 0]], np.int32)
GEN_LENGTHS = np.array([4, 5, 2], np.int32)


@pytest.fixture(scope="module")
def gen_model():
    return init_model(GEN_CONFIG, seed=3)


def sampled(graphdef, params, tokens, lengths, seeds, **kw) -> np.ndarray:
    b = tokens.shape[0]
    sp = SamplingParams.make(b, temperature=1.0, top_k=40, top_p=0.95)
    out = engine.generate(
        graphdef,
        params,
        tokens,
        lengths,
        max_new_tokens=16,
        stop_tokens=[],
        sampling=sp,
        keys=row_keys(np.asarray(seeds), b),
        **kw,
    )
    return np.asarray(out.tokens)


def test_generate_sampling_seeds(gen_model):
    graphdef, params = gen_model
    a = sampled(graphdef, params, GEN_PROMPTS, GEN_LENGTHS, [1, 2, 3])
    b = sampled(graphdef, params, GEN_PROMPTS, GEN_LENGTHS, [1, 2, 3])
    c = sampled(graphdef, params, GEN_PROMPTS, GEN_LENGTHS, [4, 5, 6])
    assert np.array_equal(a, b)
    assert np.mean(a != c) > 0.5  # a near-uniform tiny model: most draws differ
    # Default keys come from `seed`.
    sp = SamplingParams.make(3, temperature=1.0)
    run = lambda seed: np.asarray(
        engine.generate(
            graphdef, params, GEN_PROMPTS, GEN_LENGTHS, max_new_tokens=16, sampling=sp, seed=seed
        ).tokens
    )
    assert np.array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_generate_rows_independent_of_batch(gen_model):
    """Row 0 alone equals row 0 in a batch of 3 with the same key (other rows differ)."""
    graphdef, params = gen_model
    batch = sampled(graphdef, params, GEN_PROMPTS, GEN_LENGTHS, [42, 7, 9])
    alone = sampled(graphdef, params, GEN_PROMPTS[:1, :4], GEN_LENGTHS[:1], [42])
    assert np.array_equal(alone[0], batch[0])
    other = sampled(graphdef, params, GEN_PROMPTS[[0, 2, 1]], GEN_LENGTHS[[0, 2, 1]], [42, 1, 2])
    assert np.array_equal(other[0], batch[0])


def test_stream_tokens_refuses_a_bad_seed_before_any_device_work(gen_model, monkeypatch):
    graphdef, params = gen_model

    def fail(*args, **kwargs):
        raise AssertionError("the cache was allocated")

    monkeypatch.setattr("ferrum_jax.streaming.init_cache", fail)
    with pytest.raises(FerrumError, match="seed must be an integer in"):
        next(stream_tokens(graphdef, params, [1, 2], max_new_tokens=2, seed=-1))


def test_stream_tokens_samples_what_generate_samples(gen_model):
    """Sampled `stream_tokens` (one jitted step per token) and `generate` (one while_loop) draw
    the same tokens from the same seed: both fold the step into each row's key."""
    graphdef, params = gen_model
    sp = SamplingParams.make(1, temperature=1.0, top_k=40, top_p=0.95)
    prompt = GEN_PROMPTS[1].tolist()
    for seed in (0, 11):
        out = engine.generate(
            graphdef,
            params,
            np.asarray([prompt]),
            max_new_tokens=24,
            stop_tokens=[],
            sampling=sp,
            seed=seed,
        )
        streamed = list(
            stream_tokens(
                graphdef, params, prompt, max_new_tokens=24, sampling=sp, seed=seed, stop_tokens=[]
            )
        )
        assert [t.token_id for t in streamed] == np.asarray(out.tokens[0]).tolist()
        np.testing.assert_allclose(
            [t.logprob for t in streamed], np.asarray(out.logprobs[0]), rtol=0, atol=1e-4
        )
