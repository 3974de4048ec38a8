"""Continuous batching over the executor (`ferrum_jax.batch_generation`) against one-prompt
streams: the same tokens and text per request, whatever else shares the batch."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum_jax import JaxModelExecutor, SamplingParams, load_model, stream_tokens
from ferrum_jax.batch_generation import GenerationRequest, generate_batch
from ferrum_jax.errors import FerrumError

NEW_TOKENS = 16
ROWS = 4


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    return load_model(tiny_chat_model)


@pytest.fixture(scope="module")
def executor(model):
    return JaxModelExecutor(model, max_batch_size=ROWS, max_sequence_length=96)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 5000, rng.integers(1, 41)).tolist() for _ in range(n)]


def streamed(model, prompt, **kwargs) -> list[int]:
    tokenizer = model.tokenizer
    return [
        t.token_id
        for t in stream_tokens(model, prompt, stop_tokens=tokenizer.eos_token_ids, **kwargs)
    ]


def test_forty_mixed_prompts_match_single_streams(model, executor):
    tokenizer = model.tokenizer
    batch = prompts(40)
    requests = [
        GenerationRequest(p, max_new_tokens=NEW_TOKENS, key=f"p{i}") for i, p in enumerate(batch)
    ]
    order, counted = [], []
    results = {}
    for result in generate_batch(executor, requests, on_tokens=counted.append):
        results[result.key] = result
        order.append(result.index)
        # Continuous batching: never more sequences live than the pool has slots.
        assert executor.status().current_batch_size <= ROWS
    assert sorted(order) == list(range(40))
    assert max(counted) <= ROWS and sum(counted) == sum(len(r.token_ids) for r in results.values())
    for i, prompt in enumerate(batch):
        result = results[f"p{i}"]
        expected = streamed(model, prompt, max_new_tokens=NEW_TOKENS)
        assert result.token_ids == expected, i
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
        stopped = expected[-1] in tokenizer.eos_token_ids
        assert result.finish_reason == ("stop" if stopped else "length")
        assert result.prompt_tokens == len(prompt) and result.index == i
    assert executor.status().current_batch_size == 0  # every slot released


def test_sampled_rows_draw_what_their_seed_streams(model, executor):
    batch = prompts(6, seed=1)
    params = dict(temperature=0.9, top_p=0.95)
    requests = [
        GenerationRequest(p, max_new_tokens=8, seed=100 + i, **params)
        if i % 2
        else GenerationRequest(p, max_new_tokens=8)  # greedy rows in the same batches
        for i, p in enumerate(batch)
    ]
    results = {r.index: r for r in generate_batch(executor, requests)}
    sampling = SamplingParams.make(1, **params)
    for i, prompt in enumerate(batch):
        kwargs = dict(sampling=sampling, seed=100 + i) if i % 2 else {}
        assert results[i].token_ids == streamed(model, prompt, max_new_tokens=8, **kwargs), i


def test_stop_strings_end_the_answer(model, executor):
    tokenizer = model.tokenizer
    prompt = prompts(1, seed=2)[0]
    full = tokenizer.decode(
        streamed(model, prompt, max_new_tokens=NEW_TOKENS), skip_special_tokens=True
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full  # a stop string that occurs mid-answer
    (result,) = generate_batch(
        executor, [GenerationRequest(prompt, max_new_tokens=NEW_TOKENS, stop=[stop])]
    )
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert len(result.token_ids) < NEW_TOKENS


def test_a_bad_request_is_named_before_anything_runs(executor):
    good = GenerationRequest([5, 6, 7], max_new_tokens=4)
    cases = [
        (GenerationRequest([], max_new_tokens=4), "request 1: empty prompt"),
        (GenerationRequest([5] * 90, max_new_tokens=10), "request 1: the prompt is 90 tokens"),
        (GenerationRequest([5], max_new_tokens=0), "request 1: max_new_tokens must be >= 1"),
        (GenerationRequest([5], max_new_tokens=4, top_p=0.0), r"request 1: top_p must be in"),
        (GenerationRequest([10**6], max_new_tokens=4), r"request 1: prompt_ids must be in"),
        (GenerationRequest([5], max_new_tokens=4, stop=[""]), "request 1: stop strings"),
        # Past int32: it passed the checks, then overflowed at the first sampled step.
        (
            GenerationRequest([5], max_new_tokens=4, temperature=1.0, top_k=2**40),
            r"request 1: top_k must be an integer in \[0, 2147483647\]",
        ),
        (GenerationRequest([5], max_new_tokens=4, top_k=True), "request 1: top_k must be"),
        (GenerationRequest([5], max_new_tokens=4, seed=-1), "request 1: seed must be an integer"),
    ]
    before = executor.status().prefill_operations
    for bad, message in cases:
        with pytest.raises(FerrumError, match=message):
            generate_batch(executor, [good, bad])
    assert executor.status().prefill_operations == before


def test_stopping_early_releases_the_running_sequences(executor):
    requests = [GenerationRequest(p, max_new_tokens=NEW_TOKENS) for p in prompts(6, seed=3)]
    results = generate_batch(executor, requests)
    next(results)
    assert executor.status().current_batch_size > 0
    results.close()
    assert executor.status().current_batch_size == 0
