"""HF safetensors directories: logits against HF torch (single-file, sharded, tied
embeddings), bf16 checkpoints, loading to bfloat16, tokenizer pick-up."""

from __future__ import annotations

import io
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
import tokenizers
from conftest import require_reference, tiny_hf_model
from flax import nnx

from ferrum_jax.checkpoint import checkpoint_layout, load_hf, load_model
from ferrum_jax.checkpoint.hf_config import read_config
from ferrum_jax.engine import forward
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.models.config import ModelConfig

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 10), dtype=np.int32)


def write_tokenizer(root) -> None:
    """A tiny word-level tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages }}"}
    (root / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF model, directory it was saved to)."""
    torch, _ = require_reference()
    root = tmp_path_factory.mktemp("hf")
    llama = tiny_hf_model("llama")
    qwen2 = tiny_hf_model("qwen2", tie_word_embeddings=True)
    bf16 = tiny_hf_model("llama", seed=1).to(torch.bfloat16)
    llama.save_pretrained(root / "llama")
    llama.save_pretrained(root / "sharded", max_shard_size="40KB")
    qwen2.save_pretrained(root / "qwen2")
    write_tokenizer(root / "qwen2")
    bf16.save_pretrained(root / "bf16")
    return {
        "llama": (llama, root / "llama"),
        "sharded": (llama, root / "sharded"),
        "qwen2": (qwen2, root / "qwen2"),
        "bf16": (bf16, root / "bf16"),
    }


def hf_logits(hf_model) -> np.ndarray:
    torch, _ = require_reference()
    with torch.no_grad():
        return hf_model(torch.from_numpy(TOKENS).long()).logits.numpy()


@pytest.mark.parametrize("name", ["llama", "sharded", "qwen2"])
def test_logits_match_hf(checkpoints, name):
    hf_model, path = checkpoints[name]
    loaded = load_model(path)
    assert loaded.format == "hf" and loaded.source == str(path)
    ours = np.asarray(forward(loaded.graphdef, loaded.params, TOKENS))
    np.testing.assert_allclose(ours, hf_logits(hf_model), rtol=0, atol=1e-4)


def test_sharded_checkpoint_has_several_shards(checkpoints):
    path = checkpoints["sharded"][1]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def expected_params(hf_model, torch_dtype) -> dict:
    """Param path -> HF weight rounded by torch to `torch_dtype`, in our layout, as float32."""
    state = hf_model.state_dict()
    parts: dict = {}
    for t in checkpoint_layout(ModelConfig.from_hf(hf_model.config.to_dict())):
        part = t.to_param(state[t.name].to(torch_dtype).float().numpy())
        axis = 0 if t.index is None else len(t.index) - 1  # fused parts stack on their last slice
        parts.setdefault(t.path, (axis, []))[1].append(part)
    return {path: np.concatenate(arrays, axis=axis) for path, (axis, arrays) in parts.items()}


def assert_params_equal(params, expected: dict, dtype: str) -> None:
    flat = dict(nnx.to_flat_state(params))
    assert flat.keys() == expected.keys()
    for path, want in expected.items():
        got = flat[path].get_value()
        assert str(got.dtype) == dtype, path
        np.testing.assert_array_equal(np.asarray(got, np.float32), want, err_msg=str(path))


def test_bf16_checkpoint_loads_exactly(checkpoints):
    torch, _ = require_reference()
    hf_model, path = checkpoints["bf16"]
    loaded = load_hf(path)
    assert_params_equal(loaded.params, expected_params(hf_model, torch.bfloat16), "float32")


def test_load_to_bfloat16(checkpoints):
    torch, _ = require_reference()
    hf_model, path = checkpoints["llama"]
    loaded = load_hf(path, dtype="bfloat16")
    # Rounded once from the float32 file, as torch rounds (to nearest even).
    assert_params_equal(loaded.params, expected_params(hf_model, torch.bfloat16), "bfloat16")
    assert nnx.merge(loaded.graphdef, loaded.params).dtype == "bfloat16"
    logits = forward(loaded.graphdef, loaded.params, TOKENS)
    assert logits.dtype == jax.numpy.float32 and np.isfinite(np.asarray(logits)).all()


def test_tokenizer_picked_up_when_present(checkpoints):
    assert load_hf(checkpoints["llama"][1]).tokenizer is None
    tokenizer = load_hf(checkpoints["qwen2"][1]).tokenizer
    assert tokenizer is not None
    assert tokenizer.encode("hello world", add_special_tokens=False) == [3, 4]
    assert tokenizer.eos_token_ids == (2,)


def test_invalid_dtype(checkpoints):
    with pytest.raises(FerrumError) as e:
        load_model(checkpoints["llama"][1], dtype="float16")
    assert e.value.kind is ErrorKind.INVALID_PARAMETER and "float16" in e.value.message


def test_place_receives_every_param(checkpoints):
    seen = []

    def place(path, array):
        seen.append(path)
        return jax.device_put(array)

    loaded = load_model(checkpoints["qwen2"][1], place=place)
    assert sorted(map(str, seen)) == sorted(str(p) for p, _ in nnx.to_flat_state(loaded.params))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [_Terminal(), io.StringIO()], ids=["tty", "pipe"])
def test_progress_bar_only_on_a_terminal(checkpoints, stream, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stream)
    path = checkpoints["llama"][1]
    load_hf(path)
    shown = stream.getvalue()
    if stream.isatty():
        total = len(checkpoint_layout(read_config(pathlib.Path(path))))
        assert f"loading {pathlib.Path(path).name}" in shown and f"{total}/{total}" in shown
    else:
        assert shown == ""
