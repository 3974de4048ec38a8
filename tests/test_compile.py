"""Compilation counts (never timings) and cache donation.

`engine.compile_counts()` is process-global, so every assertion is on a delta. Tests that
expect exactly one new program use a cache shape no other test module uses, so the program
cannot have been compiled before.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from ferrum_jax import engine
from ferrum_jax.cache import init_cache
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.llama import init_model
from ferrum_jax.sampling import SamplingParams, row_keys

CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    model_type="llama",
    vocab_size=72,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    eos_token_ids=(2,),
)


@pytest.fixture(scope="module")
def model():
    return init_model(CONFIG, seed=0)


def delta(before: dict[str, int]) -> dict[str, int]:
    """New programs per entry point since `before` (only the non-zero ones)."""
    now = engine.compile_counts()
    return {k: now[k] - before[k] for k in now if now[k] != before[k]}


def prompt(n: int, row: int = 0) -> np.ndarray:
    return (np.arange(n, dtype=np.int32) * 7 + row * 3 + 3) % CONFIG.vocab_size


def test_compile_counts_names():
    assert set(engine.compile_counts()) >= {"prefill", "extend", "decode", "forward", "generate"}


def test_100_decode_steps_compile_decode_once(model):
    graphdef, params = model
    before = engine.compile_counts()
    cache = init_cache(CONFIG, 2, 136)  # shape unique to this test
    logits, cache = engine.prefill(graphdef, params, cache, np.stack([prompt(9), prompt(9, 1)]))
    for _ in range(100):
        token = np.asarray(logits.argmax(-1), np.int32)
        logits, cache = engine.decode(graphdef, params, cache, token)
    assert np.asarray(cache.lengths).tolist() == [109, 109]
    assert delta(before) == {"prefill": 1, "decode": 1}


def test_prompt_lengths_share_one_prefill(model):
    graphdef, params = model
    before = engine.compile_counts()
    for n in (3, 5, 7):
        cache = init_cache(CONFIG, 1, 40)  # shape unique to this test
        _, cache = engine.prefill(graphdef, params, cache, prompt(n)[None])
        assert int(cache.lengths[0]) == n
    assert delta(before) == {"prefill": 1}
    # ... and so do different per-row lengths inside one padded batch.
    before = engine.compile_counts()
    cache = init_cache(CONFIG, 1, 40)
    engine.prefill(graphdef, params, cache, prompt(12)[None], [10])
    assert delta(before) == {}


def run_all(graphdef, params, sampling=None, keys=None):
    """One prefill, one decode and one generate call (fixed shapes)."""
    tokens = np.stack([prompt(6), prompt(6, 1), prompt(6, 2)])
    cache = init_cache(CONFIG, 3, 48)
    logits, cache = engine.prefill(graphdef, params, cache, tokens, [6, 4, 5])
    logits, cache = engine.decode(graphdef, params, cache, np.asarray(logits.argmax(-1), np.int32))
    out = engine.generate(
        graphdef, params, tokens, [6, 4, 5], max_new_tokens=8, sampling=sampling, keys=keys
    )
    return np.asarray(logits), np.asarray(out.tokens)


def test_new_param_values_compile_nothing(model):
    graphdef, params = model
    logits, _ = run_all(graphdef, params)  # warm
    before = engine.compile_counts()
    scaled = jax.tree.map(lambda x: x * 1.01, params)
    new_logits, _ = run_all(graphdef, scaled)
    assert delta(before) == {}
    assert not np.array_equal(logits, new_logits)  # the new values were really used


def test_new_sampling_values_compile_nothing(model):
    graphdef, params = model
    run_all(graphdef, params)  # warm (greedy, default keys)
    before = engine.compile_counts()
    outputs = []
    for i, kw in enumerate(
        [
            dict(temperature=0.7),
            dict(temperature=1.0, top_k=5),
            dict(temperature=1.3, top_p=0.8),
            dict(temperature=0.9, min_p=0.1),
            dict(temperature=[0.0, 1.0, 2.0], top_k=[0, 3, 10], top_p=[1.0, 0.5, 0.9]),
        ]
    ):
        sampling = SamplingParams.make(3, **kw)
        keys = row_keys(i, 3) if i % 2 else row_keys(np.array([i, i + 10, i + 20]), 3)
        outputs.append(run_all(graphdef, params, sampling, keys)[1])
    assert delta(before) == {}
    assert len({o.tobytes() for o in outputs}) > 1  # the values were really used


# ------------------------------------------------------------------------------------------
# Donation: the caller's cache is consumed in place, without XLA falling back to copies.


def test_prefill_and_decode_donate_the_cache(model):
    graphdef, params = model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = init_cache(CONFIG, 2, 32)
        old = jax.tree.leaves(cache)
        _, cache = engine.prefill(graphdef, params, cache, np.stack([prompt(5)] * 2))
        assert all(x.is_deleted() for x in old)
        old = jax.tree.leaves(cache)
        _, cache = engine.decode(graphdef, params, cache, np.array([3, 4], np.int32))
        assert all(x.is_deleted() for x in old)
        old = jax.tree.leaves(cache)
        _, cache = engine.extend(graphdef, params, cache, np.array([[5, 6], [7, 8]]))
        assert all(x.is_deleted() for x in old)
        jax.block_until_ready(cache)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "donated buffers were not usable" in m], messages
    assert np.asarray(cache.lengths).tolist() == [8, 8]
