"""`describe_model` and `ferrum-jax info` read metadata only: no weight is read or dequantised."""

from __future__ import annotations

import json

import gguf
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import tokenizers

from ferrum_jax.checkpoint import (
    default_model_path,
    describe_model,
    hf_state_dict,
    load_model,
    read_tokenizer,
    save_orbax,
)
from ferrum_jax.checkpoint import gguf as gguf_reader
from ferrum_jax.checkpoint import safetensors as hf_reader
from ferrum_jax.checkpoint.hf_config import write_config
from ferrum_jax.cli import main
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.text.tokenizer import Tokenizer

CONFIG = ModelConfig.from_hf(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": 2,
    }
)


def write_tokenizer(root) -> None:
    """A word-level tokenizer with a chat template, as an HF directory holds it."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.save(str(root / "tokenizer.json"))
    config = {"eos_token": "</s>", "chat_template": "{{ messages }}"}
    (root / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """format -> path of the same tiny model as an HF directory and as an orbax directory."""
    root = tmp_path_factory.mktemp("describe")
    model = Model.init(CONFIG, seed=0)
    hf = root / "hf"
    hf.mkdir()
    safetensors.numpy.save_file(hf_state_dict(CONFIG, model.params), hf / "model.safetensors")
    write_config(CONFIG, hf)
    write_tokenizer(hf)
    save_orbax(load_model(hf), root / "orbax")
    return {"hf": hf, "orbax": root / "orbax"}


@pytest.fixture
def no_weights(monkeypatch):
    """Every way a weight gets read or dequantised fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(gguf_reader, "_dequantized", fail)
    monkeypatch.setattr(gguf.quants, "dequantize", fail)
    monkeypatch.setattr(hf_reader, "_read", fail)
    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", fail)


def test_gguf_is_described_from_its_header(no_weights):
    described = describe_model()
    assert described.format == "gguf" and described.config.max_position_embeddings == 8192
    mix = {e.name: e for e in described.encodings}
    assert described.encodings[0].name == "Q4_1" and set(mix) == {"Q4_1", "Q8_0", "F32"}
    assert sum(e.tensors for e in described.encodings) == 272
    assert sum(e.nbytes for e in described.encodings) < described.file_bytes
    assert described.has_tokenizer and described.has_chat_template


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_directories_are_described_from_their_headers(checkpoints, kind, no_weights):
    described = describe_model(checkpoints[kind])
    assert described.format == kind and described.config == CONFIG
    name = "F32" if kind == "hf" else "float32"
    (encoding,) = described.encodings
    assert encoding.name == name and encoding.nbytes == CONFIG.num_params * 4
    assert described.file_bytes > 0  # orbax compresses: on disk may be below nbytes
    assert described.has_tokenizer and described.has_chat_template


def test_info_shows_quantization_and_human_units_without_loading(capsys, no_weights):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Q4_1 (210 tensors" in out and "MiB" in out and "134.5M" in out
    assert "8192 tokens" in out and "chat template" in out
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"]["Q4_1"]["tensors"] == 210
    assert report["parameter_bytes"] == report["parameters"] * 4
    assert report["chat_template"] is True and report["max_position_embeddings"] == 8192


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_info_of_directories(capsys, checkpoints, kind, no_weights):
    assert main(["info", "--model", str(checkpoints[kind]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == kind and report["parameters"] == CONFIG.num_params


def test_gguf_tokenizer_equals_the_one_gguf_reader_gives():
    """The scanner's tokenizer metadata is exactly what `gguf.GGUFReader` decodes."""
    path = default_model_path()
    reader = gguf.GGUFReader(path)
    fields = gguf_reader.read_tokenizer_fields(path).fields
    assert {k for k in reader.fields if k.startswith("tokenizer.")} == set(fields)
    for key, value in fields.items():
        assert reader.get_field(key).contents() == value, key
    ours, theirs = read_tokenizer(), Tokenizer.from_gguf(reader)
    assert ours.to_files() == theirs.to_files()


def test_force_replaces_only_checkpoints(tmp_path, checkpoints):
    """`save_orbax(overwrite=True)` replaces a checkpoint or an empty directory, nothing else."""
    from ferrum_jax.errors import ErrorKind, FerrumError

    model = load_model(checkpoints["hf"])
    target = tmp_path / "ckpt"
    save_orbax(model, target)
    with pytest.raises(FerrumError) as e:
        save_orbax(model, target)
    assert e.value.kind is ErrorKind.ALREADY_EXISTS
    save_orbax(model.with_params(model.params), target, overwrite=True)
    assert load_model(target).config == CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no leftovers
    (tmp_path / "empty").mkdir()
    save_orbax(model, tmp_path / "empty", overwrite=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FerrumError, match="not a ferrum-jax orbax checkpoint"):
        save_orbax(model, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    np.testing.assert_equal(len(list(tmp_path.iterdir())), 3)
