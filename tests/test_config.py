"""`ModelConfig.from_hf` / `to_hf` / `num_params` against transformers' own configs and models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from conftest import require_reference, tiny_hf_model

from ferrum_jax.checkpoint.hf_config import parse_config
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.models.config import ModelConfig, RopeScaling

SIZES = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@contextlib.contextmanager
def raises_kind(kind: ErrorKind, *names: str) -> Iterator[None]:
    """Expects a FerrumError of `kind` whose message names every one of `names`."""
    with pytest.raises(FerrumError) as info:
        yield
    assert info.value.kind is kind, info.value
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def hf_dict(arch: str, **overrides) -> dict:
    """`XConfig(...).to_dict()` of transformers (5.x keys: `rope_parameters`)."""
    _, transformers = require_reference()
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    return cls(**{**SIZES, **overrides}).to_dict()


def llama_4x(**overrides) -> dict:
    """A Llama-3.1-style `config.json` as transformers 4.x wrote it (shrunk)."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0",
    }
    hf.update(overrides)
    return hf


# ------------------------------------------------------------------------------------------
# Families parsed from transformers' own dicts.


def test_llama_from_transformers():
    c = ModelConfig.from_hf(hf_dict("llama", tie_word_embeddings=True, rms_norm_eps=1e-5))
    assert (c.architecture, c.model_type) == ("LlamaForCausalLM", "llama")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (256, 64, 128, 3)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert c.rms_norm_eps == 1e-5
    assert c.rope_theta == 10000.0 and c.rope_scaling is None
    assert not (c.qkv_bias or c.o_bias or c.qk_norm)
    assert c.tie_word_embeddings
    assert c.sliding_window is None and c.layer_types == ()
    assert c.eos_token_ids == (2,)


def test_llama_attention_bias_sets_qkv_and_o_bias():
    c = ModelConfig.from_hf(hf_dict("llama", attention_bias=True))
    assert c.qkv_bias and c.o_bias


def test_mistral_from_transformers():
    c = ModelConfig.from_hf(hf_dict("mistral", sliding_window=4))
    assert (c.architecture, c.model_type) == ("MistralForCausalLM", "mistral")
    assert c.sliding_window == 4
    assert all(c.layer_window(i) == 4 for i in range(c.num_layers))
    # Mistral v0.2+ configs disable the window with null.
    c = ModelConfig.from_hf(hf_dict("mistral", sliding_window=None))
    assert c.sliding_window is None and c.layer_window(0) is None


def test_qwen2_from_transformers():
    c = ModelConfig.from_hf(hf_dict("qwen2"))
    assert (c.architecture, c.model_type) == ("Qwen2ForCausalLM", "qwen2")
    assert c.qkv_bias and not c.o_bias and not c.qk_norm
    assert c.sliding_window is None


def test_qwen3_from_transformers():
    c = ModelConfig.from_hf(hf_dict("qwen3", head_dim=32))
    assert (c.architecture, c.model_type) == ("Qwen3ForCausalLM", "qwen3")
    assert c.head_dim == 32 != c.hidden_size // c.num_heads
    assert c.qk_norm and not c.qkv_bias and not c.o_bias


def test_qwen2_sliding_window_only_with_use_sliding_window():
    # Real Qwen2.5 configs carry sliding_window=32768 with use_sliding_window=false.
    raw = {**hf_dict("qwen2"), "sliding_window": 4096, "use_sliding_window": False}
    raw.pop("layer_types")
    c = ModelConfig.from_hf(raw)
    assert c.sliding_window is None
    assert all(c.layer_window(i) is None for i in range(3))

    raw = {**raw, "use_sliding_window": True, "max_window_layers": 1}
    c = ModelConfig.from_hf(raw)
    assert c.sliding_window == 4096
    assert c.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    assert [c.layer_window(i) for i in range(3)] == [None, 4096, 4096]

    # transformers' own dict: layer_types computed from max_window_layers.
    c = ModelConfig.from_hf(
        hf_dict("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    )
    assert [c.layer_window(i) for i in range(3)] == [None, None, 4]
    c = ModelConfig.from_hf(
        hf_dict("qwen2", use_sliding_window=False, sliding_window=4, max_window_layers=2)
    )
    assert [c.layer_window(i) for i in range(3)] == [None, None, None]


# ------------------------------------------------------------------------------------------
# Rotary keys: transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`).


def test_4x_rope_theta_and_eos_list():
    c = ModelConfig.from_hf(llama_4x())
    assert c.rope_theta == 500000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == 1e-5
    assert c.bos_token_id == 128000
    assert c.eos_token_ids == (128001, 128008, 128009)
    assert c.max_position_embeddings == 512


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_4x_llama3_scaling(type_key):
    scaling = dict(LLAMA3_ROPE)
    scaling[type_key] = scaling.pop("rope_type")
    c = ModelConfig.from_hf(llama_4x(rope_scaling=scaling))
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling(
        kind="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_4x_linear_scaling(type_key):
    c = ModelConfig.from_hf(llama_4x(rope_scaling={type_key: "linear", "factor": 2.0}))
    assert c.rope_scaling == RopeScaling(kind="linear", factor=2.0)


def test_4x_default_rope_type_means_no_scaling():
    c = ModelConfig.from_hf(llama_4x(rope_scaling={"rope_type": "default"}))
    assert c.rope_scaling is None


def test_5x_rope_parameters():
    d = hf_dict("llama", rope_theta=123456.0)
    assert "rope_parameters" in d and d.get("rope_scaling") is None  # really the 5.x layout
    c = ModelConfig.from_hf(d)
    assert c.rope_theta == 123456.0 and c.rope_scaling is None

    c = ModelConfig.from_hf(hf_dict("llama", rope_scaling=LLAMA3_ROPE))
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)

    c = ModelConfig.from_hf(hf_dict("llama", rope_scaling={"type": "linear", "factor": 4.0}))
    assert c.rope_scaling == RopeScaling(kind="linear", factor=4.0)


def test_5x_rope_parameters_hand_written():
    hf = llama_4x(rope_theta=None, rope_scaling=None)
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 3.0, "rope_theta": 1e6}
    c = ModelConfig.from_hf(hf)
    assert c.rope_theta == 1e6 and c.rope_scaling == RopeScaling(kind="linear", factor=3.0)


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
@pytest.mark.parametrize("key", ["rope_scaling:rope_type", "rope_scaling:type", "rope_parameters"])
def test_unsupported_rope_types_refused(kind, key):
    field, _, type_key = key.partition(":")
    scaling = {
        type_key or "rope_type": kind,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "short_factor": [1.0] * 8,
        "long_factor": [1.0] * 8,
    }
    hf = llama_4x()
    if field == "rope_parameters":
        del hf["rope_scaling"]
        scaling["rope_theta"] = 10000.0
    hf[field] = scaling
    with raises_kind(ErrorKind.UNSUPPORTED, field, kind):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize(
    ("kind", "missing"),
    [
        ("linear", "factor"),
        ("llama3", "factor"),
        ("llama3", "low_freq_factor"),
        ("llama3", "high_freq_factor"),
        ("llama3", "original_max_position_embeddings"),
    ],
)
def test_incomplete_rope_scaling_is_config_error(kind, missing):
    """A scaling dict without one of its keys is a CONFIG error naming the key, not a
    KeyError (transformers refuses the same dicts)."""
    scaling = dict(LLAMA3_ROPE, rope_type=kind)
    del scaling[missing]
    with raises_kind(ErrorKind.CONFIG, missing):
        ModelConfig.from_hf(llama_4x(rope_scaling=scaling))


# ------------------------------------------------------------------------------------------
# Refusals.


def test_unknown_architecture_refused():
    hf = llama_4x(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with raises_kind(ErrorKind.UNSUPPORTED, "architectures", "GPT2LMHeadModel"):
        ModelConfig.from_hf(hf)


def test_unknown_model_type_refused():
    with raises_kind(ErrorKind.UNSUPPORTED, "model_type", "gemma"):
        ModelConfig.from_hf(llama_4x(model_type="gemma"))


@pytest.mark.parametrize(
    "key",
    ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"],
)
def test_missing_required_key(key):
    hf = llama_4x()
    del hf[key]
    with raises_kind(ErrorKind.CONFIG, key):
        ModelConfig.from_hf(hf)


def test_hidden_act_gelu_refused():
    with raises_kind(ErrorKind.UNSUPPORTED, "hidden_act", "gelu"):
        ModelConfig.from_hf(llama_4x(hidden_act="gelu"))


def test_mlp_bias_refused():
    with raises_kind(ErrorKind.UNSUPPORTED, "mlp_bias"):
        ModelConfig.from_hf(llama_4x(mlp_bias=True))


def test_heads_not_multiple_of_kv_heads_refused():
    with raises_kind(ErrorKind.CONFIG, "num_key_value_heads"):
        ModelConfig.from_hf(llama_4x(num_key_value_heads=3))


# ------------------------------------------------------------------------------------------
# Round trip and parameter count.

ROUND_TRIP = {
    "llama": ("llama", {}),
    "llama_tied_bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral_window": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 8}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_to_hf_round_trip(name):
    arch, overrides = ROUND_TRIP[name]
    c = ModelConfig.from_hf(hf_dict(arch, max_window_layers=1, **overrides))
    assert ModelConfig.from_hf(c.to_hf()) == c
    # `to_hf()` is a config transformers itself accepts, and it means the same model.
    _, transformers = require_reference()
    cls = getattr(transformers, c.architecture.replace("ForCausalLM", "Config"))
    assert ModelConfig.from_hf(cls(**c.to_hf()).to_dict()) == c


NUM_PARAMS = {
    "llama_untied": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_bias": ("llama", {"attention_bias": True}),
    "mqa": ("llama", {"num_key_value_heads": 1}),
    "qwen2": ("qwen2", {}),
    "qwen3_tied": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("name", NUM_PARAMS)
def test_num_params_matches_hf(name):
    arch, overrides = NUM_PARAMS[name]
    model = tiny_hf_model(arch, **overrides)
    hf_count = sum(p.numel() for p in model.parameters())  # shared tensors counted once
    assert ModelConfig.from_hf(model.config.to_dict()).num_params == hf_count


# ------------------------------------------------------------------------------------------
# Values that used to be accepted and silently broke the model (red-team finding 6).

MISTRAL = {**llama_4x(), "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
BROKEN_VALUES = {
    "window_zero": ({**MISTRAL, "sliding_window": 0}, "sliding_window"),
    "window_negative": ({**MISTRAL, "sliding_window": -4}, "sliding_window"),
    "window_overflows_int32": ({**MISTRAL, "sliding_window": 10**30}, "sliding_window"),
    "window_float": ({**MISTRAL, "sliding_window": 4.5}, "sliding_window"),
    "theta_zero": (llama_4x(rope_theta=0), "rope_theta"),
    "theta_negative": (llama_4x(rope_theta=-10000.0), "rope_theta"),
    "theta_nan": (llama_4x(rope_theta=float("nan")), "rope_theta"),
    "theta_infinite": (llama_4x(rope_theta=float("inf")), "rope_theta"),
    "eps_negative": (llama_4x(rms_norm_eps=-1e-6), "rms_norm_eps"),
    "eps_nan": (llama_4x(rms_norm_eps=float("nan")), "rms_norm_eps"),
    "linear_factor_zero": (
        llama_4x(rope_scaling={"rope_type": "linear", "factor": 0.0}),
        "factor",
    ),
    "llama3_factor_negative": (
        llama_4x(rope_scaling={**LLAMA3_ROPE, "factor": -8.0}),
        "factor",
    ),
    "llama3_equal_freq_factors": (
        llama_4x(rope_scaling={**LLAMA3_ROPE, "high_freq_factor": 1.0}),
        "high_freq_factor",
    ),
    "kv_heads_zero": (llama_4x(num_key_value_heads=0), "num_key_value_heads"),
    "head_dim_zero": (llama_4x(head_dim=0), "head_dim"),
    "max_positions_zero": (llama_4x(max_position_embeddings=0), "max_position_embeddings"),
}


@pytest.mark.parametrize("name", BROKEN_VALUES)
def test_values_that_break_the_model_are_config_errors(name):
    """`num_key_value_heads: 0` silently became MHA; `sliding_window: 10**30` raised an
    OverflowError on the first step; the others built a model with NaN or nonsense logits."""
    hf, key = BROKEN_VALUES[name]
    with raises_kind(ErrorKind.CONFIG, key):
        parse_config(hf, "config.json")
