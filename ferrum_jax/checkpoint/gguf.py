"""GGUF checkpoints (llama.cpp): metadata -> `ModelConfig`, dequantised tensors -> params.

The header (metadata, tensor infos) is first walked by a bounds-checked scanner of our own:
every count, length, dimension and data range is checked against the file size before
anything is allocated, so a hostile or truncated file fails with a `FerrumError` naming
the file and tensor (`gguf.GGUFReader` alone can loop for 2**64 iterations on a bogus
array length). Tensors are then read one at a time at the validated offsets and
dequantised with `gguf.quants`. The tokenizer metadata is decoded by the same scanner
(`read_tokenizer_fields`), after validation, and handed to `Tokenizer.from_gguf`.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import gguf
import jax
import numpy as np

from ferrum_jax.checkpoint.build import (
    Place,
    build_params,
    check_allow_non_finite,
    refuse_non_finite,
)
from ferrum_jax.checkpoint.hf_config import parse_config
from ferrum_jax.checkpoint.layout import EXPERT_NAMES, CheckpointTensor, checkpoint_layout
from ferrum_jax.dtypes import model_dtype
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig
from ferrum_jax.models.quant import (
    QArray,
    WeightFormat,
    is_quantizable,
    quantization_format,
    quantize_weight,
)
from ferrum_jax.text.tokenizer import Tokenizer

_QT = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {
        _QT.F32,
        _QT.F16,
        _QT.BF16,
        _QT.Q8_0,
        _QT.Q4_0,
        _QT.Q4_1,
        _QT.Q5_0,
        _QT.Q4_K,
        _QT.Q5_K,
        _QT.Q6_K,
    }
)
"""Tensor encodings `load_gguf` dequantises (all covered by tests)."""

# GGUF general.architecture -> (HF architecture, HF model_type). llama.cpp writes Mixtral as
# "llama" with experts (`config_from_gguf` tells them apart by `llama.expert_count`).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
_MIXTRAL = ("MixtralForCausalLM", "mixtral")
_GEMMA_ARCHS = {"gemma2": (2, 46), "gemma3": (6, 62)}
"""Gemma arch -> (every n-th layer global, the layer count of its 27B model).

llama.cpp fixes both in code, not metadata: the sliding pattern, and the 27B's attention
scale `(hidden / heads) ** -0.5` where the others take `head_dim ** -0.5`."""
_PERMUTED_QK = frozenset({"llama", "mixtral"})
"""model_types whose Q/K rows llama.cpp's converter permutes (`LlamaModel.permute`)."""
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma's four norms: llama.cpp's `ffn_norm` is the pre-feedforward one there.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# One GGUF tensor holds one projection of every expert: `[experts, out, in]`.
_EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
_ROUTER = "ffn_gate_inp.weight"
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")

# GGUF metadata value types (gguf.GGUFValueType): struct formats of the scalars.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_MAX_NESTING = 4
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclasses.dataclass(frozen=True)
class GGUFArray:
    """A metadata array, summarised: its element type id and length (contents skipped)."""

    item_type: int
    length: int


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file, validated against the file's size."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    dims: tuple[int, ...]
    """ggml `ne` order: fastest-varying first (reversed numpy/HF order)."""
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy / HF shape, e.g. `[out, in]` for a linear weight."""
        return tuple(reversed(self.dims))


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data: metadata (arrays summarised) and tensor infos."""

    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Reads little-endian fields from a buffer; every read is checked against its end."""

    def __init__(self, path: pathlib.Path, buf: mmap.mmap) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def error(self, what: str) -> FerrumError:
        return FerrumError.invalid_format(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            raise self.error(
                f"{what} at byte {self.pos} needs {n} bytes, past the end of the "
                f"{len(self.buf)}-byte file (truncated or corrupt)"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what} at byte {start} is not UTF-8") from e

    def count(self, what: str, min_item_bytes: int) -> int:
        """A length field; more items than the remaining bytes could hold is corrupt."""
        n = self.unpack("<Q", what)
        if n > (len(self.buf) - self.pos) // min_item_bytes:
            raise self.error(
                f"{what} claims {n} items, more than the rest of the file could hold "
                "(truncated or corrupt)"
            )
        return n

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            value = self.unpack(_SCALARS[kind], what)
            # float32 keeps its type so the config can recover the decimal the converter wrote.
            return np.float32(value) if kind == _FLOAT32 else value
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY or depth >= _MAX_NESTING:
            raise self.error(f"{what} has unknown or too deeply nested value type {kind}")
        item = self.unpack("<I", what)
        if item in _SCALARS:
            size = struct.calcsize(_SCALARS[item])
            n = self.count(what, size)
            self.take(n * size, what)
        elif item == _STRING:
            n = self.count(what, 8)
            for _ in range(n):  # strings are length-prefixed: walk them, decode none
                self.take(self.unpack("<Q", what), what)
        else:
            n = self.count(what, 12)
            for _ in range(n):
                self.value(item, what, depth + 1)
        return GGUFArray(item, n)


def read_gguf_header(path: pathlib.Path) -> GGUFHeader:
    """Parses and validates a GGUF header (v2/v3, little-endian); reads no tensor data."""
    size = path.stat().st_size
    if size < 24:
        raise FerrumError.invalid_format(f"{path}: {size} bytes is too short for a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(path, buf)
        if buf[:4] != b"GGUF":
            raise cur.error("not a GGUF file (bad magic)")
        cur.take(4, "magic")
        version = cur.unpack("<I", "version")
        if version not in (2, 3):
            raise FerrumError.unsupported(
                f"{path}: GGUF version {version} is not supported (2 and 3, little-endian)"
            )
        n_tensors = cur.count("tensor count", 24)
        n_kv = cur.count("metadata count", 13)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in metadata:
                raise cur.error(f"metadata key {key!r} appears twice")
            metadata[key] = cur.value(cur.unpack("<I", f"type of {key!r}"), f"value of {key!r}")
        infos = [_tensor_info(cur) for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.error(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ggml_type, dims, offset, nbytes in infos:
        if name in tensors:
            raise FerrumError.invalid_format(f"{path}: tensor {name!r} appears twice")
        end = data_start + offset + nbytes
        if offset % alignment or end > size:
            raise FerrumError.invalid_format(
                f"{path}: tensor {name!r} ({ggml_type.name}, ne={list(dims)}) spans bytes "
                f"{data_start + offset}..{end}, outside the {size}-byte file "
                "(truncated, misaligned or absurd size)"
            )
        tensors[name] = GGUFTensorInfo(name, ggml_type, dims, data_start + offset, nbytes)
    return GGUFHeader(metadata, tensors)


def _tensor_info(cur: _Cursor) -> tuple[str, gguf.GGMLQuantizationType, tuple[int, ...], int, int]:
    name = cur.string("tensor name")
    n_dims = cur.unpack("<I", f"dims of tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cur.error(f"tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
    dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.take(8 * n_dims, f"tensor {name!r}"))
    raw_type = cur.unpack("<I", f"type of tensor {name!r}")
    offset = cur.unpack("<Q", f"offset of tensor {name!r}")
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
        raise FerrumError.unsupported(
            f"{cur.path}: tensor {name!r} has unknown ggml type id {raw_type}"
        ) from None
    if ggml_type not in SUPPORTED_TYPES:
        raise FerrumError.unsupported(
            f"{cur.path}: tensor {name!r} has type {ggml_type.name}, which is not supported "
            f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
        )
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if dims[0] % block:
        raise cur.error(
            f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
            f"{ggml_type.name} block size {block}"
        )
    return name, ggml_type, tuple(dims), offset, math.prod(dims) // block * type_size


def _layer_names(config: ModelConfig | None) -> dict[str, str]:
    """GGUF layer tensor suffix -> HF suffix for `config`'s family (None: Llama's)."""
    if config is not None and config.sandwich_norms:
        return _GEMMA_LAYER_NAMES
    return _LAYER_NAMES


def hf_name(name: str, config: ModelConfig | None = None) -> str | None:
    """The HF tensor name of GGUF tensor `name`, or None if it has none (expert tensors hold
    many: see `gguf_tensors`)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.fullmatch(name)
    names = _layer_names(config)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None


def gguf_name(name: str, config: ModelConfig | None = None) -> str:
    """The GGUF tensor name of HF tensor `name` (inverse of `hf_name`; an expert's tensor maps
    to the tensor of all experts)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == name:
            return g
    m = _HF_BLOCK.fullmatch(name)
    assert m is not None, name
    layer, rest = m.groups()
    if config is not None and config.num_experts:
        block, projections = EXPERT_NAMES[config.model_type]
        if rest == f"{block}.gate.weight":
            return f"blk.{layer}.{_ROUTER}"
        expert = re.fullmatch(rf"{block}\.experts\.\d+\.(\w+)\.weight", rest)
        if expert:
            return f"blk.{layer}.{_EXPERT_TENSORS[projections.index(expert.group(1))]}"
    short = next(g for g, h in _layer_names(config).items() if h == rest)
    return f"blk.{layer}.{short}"


def gguf_tensors(config: ModelConfig) -> dict[str, list[CheckpointTensor]]:
    """GGUF tensor name -> the HF layout tensors it holds (experts in order), for `config`."""
    out: dict[str, list[CheckpointTensor]] = {}
    for tensor in checkpoint_layout(config):
        out.setdefault(gguf_name(tensor.name, config), []).append(tensor)
    return out


def config_from_gguf(header: GGUFHeader, path: pathlib.Path) -> ModelConfig:
    """`ModelConfig` from GGUF metadata, via the HF `config.json` dict it implies."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise FerrumError.unsupported(
            f"{path}: architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})"
        )
    get_int, get_float = _getter(meta, arch, path, int), _getter(meta, arch, path, float)
    embed = header.tensors.get("token_embd.weight")
    if embed is None or len(embed.dims) != 2:
        raise FerrumError.model(f"{path}: tensor 'token_embd.weight' is missing or not 2-D")
    hidden, heads = get_int("embedding_length"), get_int("attention.head_count")
    head_dim = get_int("attention.key_length", hidden // max(heads, 1))
    for key in ("attention.value_length", "rope.dimension_count"):
        if get_int(key, head_dim) != head_dim:
            raise FerrumError.unsupported(
                f"{path}: {arch}.{key} = {meta[f'{arch}.{key}']} differs from head_dim "
                f"{head_dim} (partial rotary / asymmetric heads are not supported)"
            )
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    experts = get_int("expert_count", 0)
    architecture, model_type = _MIXTRAL if arch == "llama" and experts else _ARCHITECTURES[arch]
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": embed.dims[1],
        "hidden_size": hidden,
        "intermediate_size": get_int("feed_forward_length"),
        "num_hidden_layers": get_int("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get_int("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get_float("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get_float("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta, arch, get_float),
        "max_position_embeddings": get_int("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in header.tensors,
        "bos_token_id": _token_id(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": list(dict.fromkeys(i for i in map(_token_id, eos) if i is not None)),
    }
    if arch in _GEMMA_ARCHS:
        hf.update(_gemma_keys(arch, hf, get_int, get_float))
    if experts:
        hf.update(
            num_local_experts=experts,
            num_experts=experts,
            num_experts_per_tok=get_int("expert_used_count"),
            # llama.cpp renormalises the top-k weights of both (`norm_w` in build_moe_ffn).
            norm_topk_prob=True,
        )
        if model_type == "qwen3_moe":
            hf["moe_intermediate_size"] = get_int("expert_feed_forward_length")
    return parse_config(hf, path)


def _gemma_keys(arch: str, hf: dict[str, Any], get_int: Callable, get_float: Callable) -> dict:
    """The HF keys of a Gemma GGUF that llama.cpp keeps in code or in its own metadata."""
    pattern, layers_27b = _GEMMA_ARCHS[arch]
    pattern = get_int("attention.sliding_window_pattern", pattern)
    layers = hf["num_hidden_layers"]
    big = layers == layers_27b
    keys: dict[str, Any] = {
        "sliding_window": get_int("attention.sliding_window"),
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ],
        "query_pre_attn_scalar": (
            hf["hidden_size"] // hf["num_attention_heads"] if big else hf["head_dim"]
        ),
        "attn_logit_softcapping": get_float("attn_logit_softcapping", None),
        "final_logit_softcapping": get_float("final_logit_softcapping", None),
    }
    if arch == "gemma3":
        keys["rope_local_base_freq"] = get_float("rope.freq_base_swa", 10_000.0)
    return keys


def _getter(meta: Mapping[str, Any], arch: str, path: pathlib.Path, kind: type) -> Callable:
    """`get(key, default)` of `{arch}.{key}`, type-checked; no default means required."""
    missing = object()

    def get(key: str, default: Any = missing) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if default is missing:
                raise FerrumError.invalid_format(f"{path}: metadata {full!r} is missing")
            return default
        value = meta[full]
        types = (int, float, np.floating) if kind is float else int
        if not isinstance(value, types) or isinstance(value, bool):
            raise FerrumError.invalid_format(f"{path}: metadata {full!r} = {value!r} is not {kind}")
        if isinstance(value, np.float32):
            # The converter wrote a decimal (1e-05) into a float32; its shortest repr gets it
            # back, where float() would give 9.99999974e-06.
            return float(str(value))
        return kind(value)

    return get


def _rope_scaling(meta: Mapping[str, Any], arch: str, get_float: Callable) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    # Unsupported kinds (yarn, ...) pass through so ModelConfig rejects them by name.
    return {"rope_type": kind, "factor": get_float("rope.scaling.factor", 1.0)}


def _token_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def validate_layout(
    config: ModelConfig, header: GGUFHeader, path: pathlib.Path
) -> dict[str, GGUFTensorInfo]:
    """Checks names and shapes against the config; returns the tensors by HF name."""
    # Every layer holds tensors: a bogus block_count must not build a huge layout.
    if config.num_layers > len(header.tensors):
        raise FerrumError.model(
            f"{path}: metadata declares {config.num_layers} blocks, the file holds only "
            f"{len(header.tensors)} tensors"
        )
    router = header.tensors.get(f"blk.0.{_ROUTER}")
    if config.num_experts and (router is None or router.shape[0] != config.num_experts):
        # Checked before the layout is built: a bogus count must not build a huge one.
        held = "no router tensor" if router is None else f"a router of {router.shape[0]} experts"
        raise FerrumError.model(
            f"{path}: metadata expert_count is {config.num_experts}, the file holds {held}"
        )
    expected = gguf_tensors(config)
    for name, info in header.tensors.items():
        if name == "rope_freqs.weight":
            raise FerrumError.unsupported(
                f"{path}: tensor 'rope_freqs.weight' (Llama 3.1-style per-frequency rope "
                "factors) is not supported"
            )
        if name not in expected:
            raise FerrumError.model(
                f"{path}: unexpected tensor {name!r} (not part of the {config.architecture} "
                "layout the metadata describes)"
            )
        parts = expected[name]
        want = parts[0].shape if len(parts) == 1 else (len(parts), *parts[0].shape)
        if info.shape != want:
            raise FerrumError.model(
                f"{path}: tensor {name!r} has shape {list(info.shape)} (ne={list(info.dims)}), "
                f"the metadata implies {list(want)}"
            )
    missing = [n for n in expected if n not in header.tensors]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FerrumError.model(f"{path}: missing tensors {shown}{more}")
    return {t.name: header.tensors[name] for name, parts in expected.items() for t in parts}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (`convert_hf_to_gguf.LlamaModel.permute`).

    The converter reorders each head's rows from HF's half-split rotary layout to ggml's
    interleaved one: `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class _Field:
    """One decoded metadata value, shaped like `gguf.ReaderField` for `Tokenizer.from_gguf`."""

    value: Any

    def contents(self) -> Any:
        return self.value


@dataclasses.dataclass(frozen=True)
class TokenizerFields:
    """The `tokenizer.*` metadata of a GGUF file, arrays decoded: a `GGUFReader` stand-in.

    `gguf.GGUFReader` builds a numpy view per array item, ~3 s for SmolLM2's 49k tokens and
    merges on a 2-core machine; the bounds-checked scanner decodes the same bytes in ~0.1 s.
    """

    fields: dict[str, Any]

    def get_field(self, key: str) -> _Field | None:
        return _Field(self.fields[key]) if key in self.fields else None


def read_tokenizer_fields(path: pathlib.Path) -> TokenizerFields:
    """Decodes every `tokenizer.*` metadata value of a GGUF file (run `read_gguf_header` first)."""
    fields: dict[str, Any] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(path, buf)
        cur.take(8, "magic and version")
        cur.count("tensor count", 24)
        for _ in range(cur.count("metadata count", 13)):
            key = cur.string("metadata key")
            kind = cur.unpack("<I", f"type of {key!r}")
            what = f"value of {key!r}"
            if not key.startswith("tokenizer."):
                cur.value(kind, what)  # skipped, still bounds-checked
            elif kind == _ARRAY:
                fields[key] = _decoded_array(cur, what)
            else:
                fields[key] = cur.value(kind, what)
    return TokenizerFields(fields)


def _decoded_array(cur: _Cursor, what: str) -> list[Any]:
    """A flat array of scalars or strings as a list (what `ReaderField.contents()` gives)."""
    item = cur.unpack("<I", what)
    if item == _STRING:
        return [cur.string(what) for _ in range(cur.count(what, 8))]
    if item not in _SCALARS:
        raise cur.error(f"{what} is an array of type {item}, not of scalars or strings")
    code = _SCALARS[item][1:]
    n = cur.count(what, struct.calcsize(code))
    # struct, not numpy: a numpy view would pin the mmap, which must close after the scan.
    return list(
        struct.unpack_from(f"<{n}{code}", cur.buf, cur.take(n * struct.calcsize(code), what))
    )


def read_gguf_tokenizer(path: pathlib.Path, header: GGUFHeader) -> Tokenizer | None:
    """The tokenizer the metadata describes, or None when the file carries none."""
    if "tokenizer.ggml.tokens" not in header.metadata:
        return None
    return Tokenizer.from_gguf(read_tokenizer_fields(path))


_CHUNK_BYTES = 1 << 20
"""Raw bytes dequantized at a time: the float32 staging of a tensor stays this small."""
_Q8_0_BLOCK = 32


def _raw(f: BinaryIO, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor's bytes as owned rows `[..., row bytes]` (no param may alias the file)."""
    raw = np.empty(info.nbytes, np.uint8)
    f.seek(info.start)
    if f.readinto(raw) != info.nbytes:
        raise FerrumError.invalid_format(
            f"{f.name}: tensor {info.name!r} was cut short while reading (file truncated?)"
        )
    return raw.reshape(*info.shape[:-1], -1)


def _dequantized(
    f: BinaryIO, info: GGUFTensorInfo, dtype: np.dtype = np.float32, *, finite: bool = True
) -> np.ndarray:
    """Reads one tensor and dequantises it into `dtype`, a few MiB of rows at a time: a
    bfloat16 load never holds a whole tensor in float32. With `finite`, each float32 chunk
    is checked while it is still in cache (`refuse_non_finite`)."""
    rows = _raw(f, info).reshape(-1, info.nbytes // max(math.prod(info.shape[:-1]), 1))
    out = np.empty((rows.shape[0], info.shape[-1]), dtype)
    step = max(1, _CHUNK_BYTES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        # `dequantize` views F32/F16 rows as floats and decodes quant blocks.
        chunk = gguf.quants.dequantize(rows[start : start + step], info.ggml_type)
        if finite:
            refuse_non_finite(chunk, f.name, info.name)
        out[start : start + step] = chunk
    return out.reshape(info.shape)


def _quantized_rows(
    f: BinaryIO, info: GGUFTensorInfo, fmt: WeightFormat, *, finite: bool = True
) -> QArray:
    """A `[rows, in]` tensor dequantised and quantized to `fmt` a few MiB of rows at a time
    (scales along each row: per row, or blocks of it): the embedding's float32 copy (113 MB
    for SmolLM2) never exists whole, so an int8 load peaks near its final size. With
    `finite`, each chunk is checked before it is quantized."""
    rows = _raw(f, info).reshape(info.shape[0], -1)
    step = max(1, _CHUNK_BYTES // rows.shape[1])
    values, scales = None, None
    for i in range(0, rows.shape[0], step):
        chunk = gguf.quants.dequantize(rows[i : i + step], info.ggml_type)
        if finite:
            refuse_non_finite(chunk, f.name, info.name)
        part = quantize_weight("embed", chunk, fmt)
        if values is None:
            values = np.empty(info.shape, part.qvalue.dtype)
            scales = np.empty((info.shape[0], part.scale.shape[1]), part.scale.dtype)
        values[i : i + step], scales[i : i + step] = part.qvalue, part.scale
    return QArray(values, scales, qtype=fmt.qtype)


def q8_0_blocks(f: BinaryIO, info: GGUFTensorInfo, *, finite: bool = True) -> QArray:
    """A Q8_0 tensor as stored: int8 values `[..., in]` and their float16 block scales
    `[..., in / 32]` (each block: a float16 scale, then 32 int8 values), no float copy.
    With `finite`, the scales are checked: a weight is NaN or infinite only through its
    block's scale."""
    blocks = _raw(f, info).reshape(*info.shape[:-1], -1, 2 + _Q8_0_BLOCK)
    scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    if finite:
        refuse_non_finite(scale, f.name, info.name)
    values = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(info.shape)
    return QArray(values, scale, qtype=np.dtype(np.int8))


def _direct_q8_0(
    config: ModelConfig, by_hf: dict[str, GGUFTensorInfo], quantize: str | None, mesh
) -> set[tuple[str | int, ...]]:
    """Param paths whose every tensor is Q8_0 and loads as int8 blocks without requantizing
    (int8 asked, one device: head adaptation on a mesh runs on float weights)."""
    if quantize != "int8" or mesh is not None:
        return set()
    # o_proj's blocks run along head_dim; a block spanning two heads has no place there.
    whole_blocks = config.head_dim % _Q8_0_BLOCK == 0
    paths: dict[tuple, bool] = {}
    for t in checkpoint_layout(config):
        ok = by_hf[t.name].ggml_type == _QT.Q8_0 and is_quantizable(t.path)
        ok &= whole_blocks or t.path[-1] != "o_proj"
        paths[t.path] = paths.get(t.path, True) and ok
    return {p for p, ok in paths.items() if ok}


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    place: Place | None = None,
    mesh: jax.sharding.Mesh | None = None,
    quantize: str | None = None,
    allow_non_finite: bool = False,
) -> Model:
    """Loads a `.gguf` file: config from metadata, weights, tokenizer.

    Tensors are dequantised straight into `dtype`. With `quantize="int8"`, Q8_0 tensors keep
    their own int8 values and block scales (bit-exact); every other tensor is dequantised and
    quantized again (`models.quant`), one tensor at a time. A tensor holding NaN or infinity
    is refused, by its GGUF name, unless `allow_non_finite`.
    """
    target = model_dtype(dtype)
    finite = not check_allow_non_finite(allow_non_finite)
    path = pathlib.Path(path)
    if not path.is_file():
        raise FerrumError.not_found(f"{path}: no such file")
    header = read_gguf_header(path)
    config = config_from_gguf(header, path)
    by_hf = validate_layout(config, header, path)
    tokenizer = read_gguf_tokenizer(path, header)
    permuted = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    direct = _direct_q8_0(config, by_hf, quantize, mesh)
    fmt = quantization_format(quantize, config)
    # Vocabulary-sized tensors are quantized row chunk by row chunk (their rows are the
    # embedding's rows and the LM head's output channels). On a mesh, heads are adapted
    # first, so everything goes through float weights there.
    by_rows = {"model.embed_tokens.weight", "lm_head.weight"} if fmt and mesh is None else set()
    # An expert tensor holds every expert: dequantised once, sliced per expert.
    experts: dict[str, np.ndarray] = {}

    with open(path, "rb") as f:

        def read(tensor: CheckpointTensor) -> np.ndarray | QArray:
            info = by_hf[tensor.name]
            plus_one = config.norm_plus_one and tensor.name.endswith("norm.weight")
            if tensor.path in direct:
                w = q8_0_blocks(f, info, finite=finite)
            elif tensor.name in by_rows:
                w = _quantized_rows(f, info, fmt, finite=finite)
            else:
                w = experts.get(info.name)
                if w is None:
                    experts.clear()
                    # Gemma's norms lose their 1 in float32, not in a bfloat16 target.
                    w = _dequantized(f, info, np.float32 if plus_one else target, finite=finite)
                    if w.ndim == 3:
                        experts[info.name] = w
                if w.ndim == 3:
                    w = w[int(re.search(r"experts\.(\d+)\.", tensor.name).group(1))]
            proj = tensor.name.split(".")[-2]
            if config.model_type in _PERMUTED_QK and proj in permuted:
                w = jax.tree.map(lambda x: unpermute_qk(x, permuted[proj]), w)  # rows: both
            if plus_one:
                w = w - np.float32(1)  # llama.cpp stores Gemma's norms as 1 + w
            return w

        graphdef, params = build_params(
            config,
            read,
            target,
            place=place,
            mesh=mesh,
            label=f"loading {path.name}",
            quantize=quantize,
        )
    return Model(config, graphdef, params, tokenizer=tokenizer, source=str(path), format="gguf")
