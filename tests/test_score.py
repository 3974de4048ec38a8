"""Scoring (`fj.score`, `fj.rolling_loglikelihood`) against HF transformers' log-softmax.

Tiny random HF models (torch CPU float32) are the reference: each pair's per-token
log-probabilities match `log_softmax(hf(context + continuation).logits)` within 1e-4, the
greedy flag matches HF's argmax, and rolling windows equal a direct computation.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from conftest import params_from_hf, require_reference, tiny_hf_model

import ferrum_jax as fj
from ferrum_jax import engine
from ferrum_jax.errors import ErrorKind, FerrumError

TOL = 1e-4
LENGTHS = [(5, 3), (17, 1), (1, 7), (30, 2), (9, 9), (2, 1)]
"""(context, continuation) token counts of the test pairs: 88 tokens in one step."""


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, one_torch_thread):
    hf = tiny_hf_model(request.param)
    _, graphdef, params = params_from_hf(hf)
    return hf, graphdef, params


def hf_logprobs(hf, tokens: list[int]) -> np.ndarray:
    """`[len - 1, vocab]` log-softmax of HF's logits at every position but the last."""
    torch, _ = require_reference()
    with torch.no_grad():
        logits = hf(torch.tensor([tokens], dtype=torch.long)).logits[0, :-1]
    return torch.log_softmax(logits, dim=-1).numpy()


def pairs(seed: int, lengths=LENGTHS) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    contexts = [rng.integers(3, 256, c).tolist() for c, _ in lengths]
    continuations = [rng.integers(3, 256, n).tolist() for _, n in lengths]
    return contexts, continuations


def test_score_matches_hf_log_softmax(models):
    hf, graphdef, params = models
    contexts, continuations = pairs(0)
    # The HF greedy continuation of one context: its is_greedy must be True.
    greedy = []
    for _ in range(4):
        lp = hf_logprobs(hf, contexts[0] + greedy + [0])
        greedy.append(int(lp[-1].argmax()))
    contexts.append(contexts[0])
    continuations.append(greedy)
    scores = fj.score(graphdef, params, contexts, continuations)
    worst = 0.0
    for ctx, cont, s in zip(contexts, continuations, scores, strict=True):
        lp = hf_logprobs(hf, ctx + cont)[len(ctx) - 1 :]
        ref = lp[np.arange(len(cont)), cont]
        worst = max(worst, float(np.abs(ref - s.token_logprobs).max()))
        np.testing.assert_allclose(s.token_logprobs, ref, rtol=0, atol=TOL)
        assert s.logprob == pytest.approx(float(ref.sum()), abs=TOL * len(cont))
        assert s.is_greedy == bool(np.all(lp.argmax(-1) == np.asarray(cont)))
        assert s.token_logprobs.dtype == np.float32 and s.token_logprobs.shape == (len(cont),)
    assert scores[-1].is_greedy and not any(s.is_greedy for s in scores[:-1])
    print(f"\nscore vs HF log-softmax: max |diff| {worst:.2e}")


def test_score_compiles_once_per_bucket(models):
    _, graphdef, params = models
    # Another set of lengths with the same totals' bucket (<= 128 tokens, 8 items): the
    # program of the first call serves the second. Sizes are chosen off other tests' shapes.
    first = [(40, 3), (20, 2), (11, 5), (3, 1), (6, 6), (13, 2), (1, 1)]
    second = [(35, 4), (2, 2), (30, 9), (7, 1), (12, 3), (8, 8), (4, 4)]
    fj.score(graphdef, params, *pairs(1, first))
    before = engine.compile_counts()["score"]
    fj.score(graphdef, params, *pairs(2, second))
    assert engine.compile_counts()["score"] == before
    # New weights of the same shapes: no new program either (params are arguments).
    scaled = jax.tree.map(lambda x: x * 1.5, params)
    fj.score(graphdef, scaled, *pairs(3, second))
    assert engine.compile_counts()["score"] == before


def test_score_splits_steps_and_keeps_order(models):
    _, graphdef, params = models
    contexts, continuations = pairs(4)
    whole = fj.score(graphdef, params, contexts, continuations)
    # A token budget below the longest pair: every pair gets a step of its own.
    split = fj.score(graphdef, params, contexts, continuations, max_tokens=8)
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)
        assert a.is_greedy == b.is_greedy


def test_rolling_windows_are_lm_evals():
    try:
        import lm_eval.utils as lm_utils
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        if os.environ.get("CI") == "true":
            pytest.fail(f"lm-eval (dev extra) is needed under CI: {e}")
        pytest.skip(f"lm-eval not installed: {e}")
    tokens = list(range(10, 47))
    for max_length, context_len in [(4, 1), (8, 1), (8, 3), (64, 1), (1, 1)]:
        expected = [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(tokens, 2, max_length, context_len)
        ]
        got = fj.rolling_windows(
            tokens, prefix_token=2, max_length=max_length, context_len=context_len
        )
        assert got == [(list(a), list(b)) for a, b in expected]
        scored = [t for _, cont in got for t in cont]
        assert scored == tokens  # every token exactly once, in order
    assert fj.rolling_windows([], prefix_token=2, max_length=4) == []


def test_rolling_loglikelihood_equals_direct_computation(models):
    hf, graphdef, params = models
    rng = np.random.default_rng(5)
    text = rng.integers(3, 256, 37).tolist()
    short = rng.integers(3, 256, 6).tolist()
    prefix = 1
    # Windows of 8: each window's tokens scored by HF on that window's own input.
    rolled = fj.rolling_loglikelihood(
        graphdef, params, [text, short], prefix_token=prefix, max_length=8
    )
    direct = []
    for ctx, cont in fj.rolling_windows(text, prefix_token=prefix, max_length=8):
        lp = hf_logprobs(hf, ctx + cont)[len(ctx) - 1 :]
        direct.append(lp[np.arange(len(cont)), cont])
    direct = np.concatenate(direct)
    np.testing.assert_allclose(rolled[0].token_logprobs, direct, rtol=0, atol=TOL)
    assert rolled[0].logprob == pytest.approx(float(direct.sum()), abs=TOL * len(text))
    # A text that fits one window: a single forward of [prefix] + text.
    lp = hf_logprobs(hf, [prefix, *short])
    np.testing.assert_allclose(
        rolled[1].token_logprobs, lp[np.arange(len(short)), short], rtol=0, atol=TOL
    )
    whole = fj.rolling_loglikelihood(graphdef, params, [short], prefix_token=prefix)
    np.testing.assert_allclose(whole[0].token_logprobs, rolled[1].token_logprobs, atol=1e-5)


def test_bad_inputs_are_refused_by_name(models):
    _, graphdef, params = models
    with pytest.raises(FerrumError, match="2 contexts but 1 continuations"):
        fj.score(graphdef, params, [[1], [2]], [[3]])
    with pytest.raises(FerrumError, match="continuation 0 is empty"):
        fj.score(graphdef, params, [[1]], [[]])
    with pytest.raises(FerrumError, match="context 0 is empty"):
        fj.score(graphdef, params, [[]], [[5]])
    with pytest.raises(FerrumError, match=r"context 0 must be in \[0, 256\)"):
        fj.score(graphdef, params, [[300]], [[5]])
    with pytest.raises(FerrumError, match="more than the model's context of 512"):
        fj.score(graphdef, params, [[4] * 500], [[5] * 20])
    with pytest.raises(FerrumError, match="max_length must be in"):
        fj.rolling_loglikelihood(graphdef, params, [[4]], prefix_token=1, max_length=600)
    with pytest.raises(FerrumError, match="context_len"):
        fj.rolling_windows([4, 5], prefix_token=1, max_length=4, context_len=5)


@pytest.mark.parametrize("max_tokens", [1.5, True, 0, "8", None])
def test_max_tokens_is_an_integer(models, max_tokens):
    """1.5 and True passed the old `< 1` check; both are refused before any step runs."""
    _, graphdef, params = models
    with pytest.raises(FerrumError, match=r"max_tokens must be an integer >= 1, got") as e:
        fj.score(graphdef, params, [[1]], [[5]], max_tokens=max_tokens)
    assert e.value.kind is ErrorKind.INVALID_PARAMETER
    with pytest.raises(FerrumError, match="max_tokens must be an integer"):
        fj.rolling_loglikelihood(graphdef, params, [[4]], prefix_token=1, max_tokens=max_tokens)


def test_rolling_empty_text_is_named_as_empty(models):
    """It used to say "must be integers, got float64" (an empty list reads as float64)."""
    _, graphdef, params = models
    for empty in ([], np.zeros((0,), np.int32)):
        with pytest.raises(FerrumError, match=r"^invalid_parameter: text 1 is empty") as e:
            fj.rolling_loglikelihood(graphdef, params, [[4, 5], empty], prefix_token=1)
        assert "float64" not in e.value.message
    with pytest.raises(FerrumError, match="max_length must be an integer"):
        fj.rolling_loglikelihood(graphdef, params, [[4]], prefix_token=1, max_length=2.5)
