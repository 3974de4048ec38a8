"""The context length is checked before anything is allocated, in every entry point."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from ferrum_jax import engine, streaming
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig

CONFIG = ModelConfig.from_hf(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 40,
        "eos_token_id": 2,
    }
)


@pytest.fixture(scope="module")
def model():
    return Model.init(CONFIG)


@pytest.fixture
def no_allocation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a cache was allocated")

    monkeypatch.setattr(streaming, "init_cache", fail)
    # The module, not the `generate` function `ferrum_jax.engine` exports under its name.
    monkeypatch.setattr(
        importlib.import_module("ferrum_jax.engine.generate"), "generate_step", fail
    )


@pytest.mark.parametrize(
    ("prompt", "new", "words"),
    [
        (40, 1, "the prompt is 40 tokens, more than fit the model's context of 40 tokens"),
        (
            30,
            11,
            "the prompt is 30 tokens and max_new_tokens is 11: 41 tokens exceed the model's "
            "context of 40 tokens; use max_new_tokens 10 or less",
        ),
    ],
)
def test_too_long_fails_before_allocating(model, no_allocation, prompt, new, words):
    tokens = np.ones((1, prompt), np.int32)
    with pytest.raises(FerrumError) as e:
        engine.generate(model.graphdef, model.params, tokens, max_new_tokens=new)
    assert words in e.value.message
    with pytest.raises(FerrumError) as e:
        next(streaming.stream_tokens(model, [1] * prompt, max_new_tokens=new))
    assert words in e.value.message


def test_exactly_the_context_fits_and_the_cache_stops_there(model):
    tokens = list(streaming.stream_tokens(model, [1] * 30, max_new_tokens=10, stop_tokens=[]))
    assert len(tokens) == 10
    assert streaming.cache_length(30 + 10, CONFIG) == 40  # not the power of two above it
    out = engine.generate(
        model.graphdef, model.params, np.ones((1, 30), np.int32), max_new_tokens=10
    )
    assert int(out.lengths[0]) <= 10
