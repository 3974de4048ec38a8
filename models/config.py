"""`ModelConfig`: one decoder architecture (Llama, Gemma, MoE and Phi-3 families), parsed from an
HF `config.json` dict. Each family's keys are read in one place here (`_FAMILY_FIELDS`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ferrum_jax.errors import FerrumError

# HF architecture name -> model_type.
_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
}
# Architectures refused by name, with the reason.
_REFUSED_ARCHITECTURES: dict[str, str] = {
    "Gemma3ForConditionalGeneration": (
        "the multimodal Gemma 3 checkpoint keeps its language model under vision-language "
        "tensor names (its `text_config` alone does not describe the file); load the text-only "
        "Gemma3ForCausalLM checkpoint or its GGUF instead"
    ),
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
"""MLP activations: SwiGLU's SiLU, and GeGLU's tanh-approximated GELU (Gemma)."""
GEMMA_TYPES = frozenset({"gemma2", "gemma3_text"})
_MODEL_TYPES = frozenset(_ARCHITECTURES.values())
_MAX_POSITION = 2**31 - 1
"""Positions, lengths and windows are int32 on the device."""


def _finite(name: str, value: float, *, minimum: float, inclusive: bool) -> None:
    """Refuses NaN, infinities and values below `minimum` (or equal, unless `inclusive`)."""
    ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise FerrumError.config(f"{name} must be a finite number {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (HF `rope_scaling` / `rope_parameters`)."""

    kind: str
    """`"linear"` or `"llama3"`."""
    factor: float
    """Scaling factor of the long-context extension."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below `original_max_position_embeddings / high_freq_factor` are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: context length the model was pretrained with."""

    def __post_init__(self) -> None:
        _finite("rope scaling factor", self.factor, minimum=0, inclusive=False)
        if self.kind == "llama3":
            _finite(
                "rope scaling low_freq_factor", self.low_freq_factor, minimum=0, inclusive=False
            )
            if not self.high_freq_factor > self.low_freq_factor or not math.isfinite(
                self.high_freq_factor
            ):
                raise FerrumError.config(
                    f"rope scaling high_freq_factor ({self.high_freq_factor}) must be finite and "
                    f"greater than low_freq_factor ({self.low_freq_factor})"
                )
            if not 1 <= self.original_max_position_embeddings <= _MAX_POSITION:
                raise FerrumError.config(
                    "rope scaling original_max_position_embeddings must be in "
                    f"[1, {_MAX_POSITION}], got {self.original_max_position_embeddings}"
                )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder: Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM), Gemma 2/3,
    Mixtral, Qwen3-MoE, Phi-3. The defaults of the family fields are the Llama block's."""

    architecture: str
    """HF architecture name, e.g. `"LlamaForCausalLM"`."""
    model_type: str
    """HF model_type: `"llama"`, `"mistral"`, `"qwen2"`, `"qwen3"`, `"gemma2"`, `"gemma3_text"`,
    `"mixtral"`, `"qwen3_moe"` or `"phi3"`."""
    vocab_size: int
    """Rows of the token embedding and of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of a dense MLP."""
    num_layers: int
    """Decoder blocks."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA groups); 1 is MQA, `num_heads` is MHA."""
    head_dim: int
    """Width of one head; may differ from `hidden_size // num_heads` (Qwen3, Mistral-Nemo)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None = None
    """Long-context frequency scaling, or None."""
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2, or Llama `attention_bias`)."""
    o_bias: bool = False
    """The output projection carries a bias (Llama `attention_bias`)."""
    qk_norm: bool = False
    """RMSNorm over head_dim of queries and keys before rotary (Qwen3)."""
    tie_word_embeddings: bool = False
    """The LM head reuses the token embedding."""
    sliding_window: int | None = None
    """Tokens a sliding-window layer attends to (itself included), or None."""
    layer_types: tuple[str, ...] = ()
    """Per layer `"full_attention"` or `"sliding_attention"`; empty means all full."""
    max_position_embeddings: int = 2048
    """Longest sequence the model was trained for."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if the model has one."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end generation."""
    hidden_act: str = "silu"
    """MLP activation: `"silu"` (SwiGLU) or `"gelu_pytorch_tanh"` (GeGLU, Gemma)."""
    norm_plus_one: bool = False
    """Every RMSNorm scales by `1 + w`, `w` stored as HF stores it (Gemma)."""
    sandwich_norms: bool = False
    """Norms before and after both attention and the MLP (Gemma 2/3), not only before."""
    embed_scale: bool = False
    """Embeddings are multiplied by `sqrt(hidden_size)` rounded to the compute dtype (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Scores are scaled by `query_pre_attn_scalar ** -0.5` (Gemma); None: `head_dim ** -0.5`."""
    attn_logit_softcap: float | None = None
    """Attention scores become `cap * tanh(scores / cap)` (Gemma 2); None: uncapped."""
    final_logit_softcap: float | None = None
    """Logits become `cap * tanh(logits / cap)` (Gemma 2); None: uncapped."""
    rope_local_theta: float | None = None
    """Rotary base of sliding-window layers, which take no rope scaling (Gemma 3); None: the
    same rotary as full-attention layers."""
    num_experts: int = 0
    """Experts of each sparse MLP (Mixtral, Qwen3-MoE); 0: every MLP is dense."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k)."""
    expert_intermediate_size: int = 0
    """Width of one expert's SwiGLU MLP."""
    norm_topk_prob: bool = True
    """Top-k router probabilities are renormalised to sum to 1 (Mixtral always; Qwen3-MoE by
    its `norm_topk_prob`)."""
    dense_layers: tuple[int, ...] = ()
    """Layers whose MLP is dense although `num_experts > 0` (Qwen3-MoE `mlp_only_layers` and
    `decoder_sparse_step`)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise FerrumError.config(f"{name} must be positive, got {getattr(self, name)}")
        for name, hf_name in (
            ("num_heads", "num_attention_heads"),
            ("num_kv_heads", "num_key_value_heads"),
            ("head_dim", "head_dim"),
        ):
            if getattr(self, name) <= 0:
                raise FerrumError.config(f"{hf_name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise FerrumError.config(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise FerrumError.config(f"head_dim must be even for rotary, got {self.head_dim}")
        _finite("rope_theta", self.rope_theta, minimum=0, inclusive=False)
        _finite("rms_norm_eps", self.rms_norm_eps, minimum=0, inclusive=True)
        if self.sliding_window is not None and not 1 <= self.sliding_window <= _MAX_POSITION:
            raise FerrumError.config(
                f"sliding_window must be in [1, {_MAX_POSITION}], got {self.sliding_window}"
            )
        if not 1 <= self.max_position_embeddings <= _MAX_POSITION:
            raise FerrumError.config(
                f"max_position_embeddings must be in [1, {_MAX_POSITION}], got "
                f"{self.max_position_embeddings}"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise FerrumError.config(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise FerrumError.unsupported(
                f"hidden_act {self.hidden_act!r} is not supported (supported: {list(ACTIVATIONS)})"
            )
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name), minimum=0, inclusive=False)
        if self.rope_local_theta is not None:
            _finite("rope_local_theta", self.rope_local_theta, minimum=0, inclusive=False)
        self._check_experts()

    def _check_experts(self) -> None:
        if self.num_experts < 0:
            raise FerrumError.config(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts == 0:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise FerrumError.config(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                f"({self.num_experts})]"
            )
        if self.expert_intermediate_size <= 0:
            raise FerrumError.config(
                f"expert intermediate size must be positive, got {self.expert_intermediate_size}"
            )
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise FerrumError.config(f"mlp_only_layers {bad} are not layers of {self.num_layers}")

    def is_sparse(self, layer: int) -> bool:
        """`layer`'s MLP is a mixture of experts."""
        return self.num_experts > 0 and layer not in self.dense_layers

    def uses_local_rope(self, layer: int) -> bool:
        """`layer` rotates by `rope_local_theta` (a sliding layer of Gemma 3), not `rope_theta`."""
        return self.rope_local_theta is not None and self.layer_window(layer) is not None

    @property
    def attention_scale(self) -> float:
        """What the attention scores are multiplied by."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of `layer`, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes one token's keys and values take in the cache, all layers together."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def _mlp_params(self, layer: int, *, active: bool) -> int:
        """Weights of `layer`'s MLP: all of them, or those one token multiplies through."""
        e = self.hidden_size
        if not self.is_sparse(layer):
            return 3 * e * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        return experts * 3 * e * self.expert_intermediate_size + e * self.num_experts

    @property
    def layer_matmul_params(self) -> int:
        """Weights one token multiplies through in one layer (q/k/v/o and the MLP, routed
        experts only), averaged over the layers."""
        e, h, kv, d = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        mlp = sum(self._mlp_params(i, active=True) for i in range(self.num_layers))
        return e * (h + 2 * kv) * d + h * d * e + mlp // self.num_layers

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once, every expert counted)."""
        e, h, kv, d = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        small = (h + 2 * kv) * d * self.qkv_bias + e * self.o_bias + 2 * d * self.qk_norm
        attention = e * (h + 2 * kv) * d + h * d * e + small + (4 if self.sandwich_norms else 2) * e
        mlp = sum(self._mlp_params(i, active=False) for i in range(self.num_layers))
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * attention + mlp + e + head

    def forward_flops(self, tokens: float, context: float, lm_head_rows: float) -> float:
        """FLOPs of a forward over `tokens` tokens that attend to `context` keys on average,
        with the LM head on `lm_head_rows` rows (matmuls only: 2 FLOPs per multiply-add)."""
        attention = 2 * 2 * self.num_heads * self.head_dim * context  # QK^T and PV
        per_token = self.num_layers * (2 * self.layer_matmul_params + attention)
        return tokens * per_token + lm_head_rows * 2 * self.hidden_size * self.vocab_size

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Parses an HF `config.json` dict (transformers 4.x or 5.x keys)."""
        architecture = _architecture(hf)
        model_type = _ARCHITECTURES[architecture]
        if hf.get("model_type", model_type) not in _MODEL_TYPES:
            raise FerrumError.unsupported(f"model_type {hf['model_type']!r} is not supported")
        if hf.get("mlp_bias", False):
            raise FerrumError.unsupported("mlp_bias=true is not supported")

        hidden = _required_int(hf, "hidden_size")
        heads = _required_int(hf, "num_attention_heads")
        if heads <= 0:
            raise FerrumError.config(f"num_attention_heads must be positive, got {heads}")
        head_dim = _optional_int(hf, "head_dim")
        kv_heads = _optional_int(hf, "num_key_value_heads")
        max_positions = _optional_int(hf, "max_position_embeddings")
        attention_bias = bool(hf.get("attention_bias", False))
        window, layer_types = _sliding_window(hf, model_type)
        eos = hf.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
        eos_ids = tuple(_token_id(hf, "eos_token_id", t) for t in eos_list)
        bos = hf.get("bos_token_id")
        fields: dict[str, Any] = dict(
            architecture=architecture,
            model_type=model_type,
            vocab_size=_required_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required_int(hf, "intermediate_size"),
            num_layers=_required_int(hf, "num_hidden_layers"),
            num_heads=heads,
            # Absent means the default; 0 is an error (`or` would turn it into the default).
            num_kv_heads=heads if kv_heads is None else kv_heads,
            head_dim=hidden // heads if head_dim is None else head_dim,
            rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6, "config"),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            layer_types=layer_types,
            max_position_embeddings=2048 if max_positions is None else max_positions,
            bos_token_id=None if bos is None else _token_id(hf, "bos_token_id", bos),
            eos_token_ids=eos_ids,
            hidden_act=hf.get("hidden_act", "silu"),
        )
        fields.update(_FAMILY_FIELDS.get(model_type, _no_fields)(hf))
        if "rope_theta" not in fields:  # a family with its own rotary keys parsed them
            fields["rope_theta"], fields["rope_scaling"] = _rope(hf)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers 4.x keys) that parses back to this config."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": self.o_bias or (self.qkv_bias and self.model_type != "qwen2"),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            # Not part of the architecture; an absent key would take Phi-3's default 32000,
            # which transformers refuses for a vocabulary smaller than that.
            "pad_token_id": None,
            "sliding_window": self.sliding_window,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {
                "rope_type": self.rope_scaling.kind,
                "factor": self.rope_scaling.factor,
            }
            if self.rope_scaling.kind == "llama3":
                hf["rope_scaling"].update(
                    low_freq_factor=self.rope_scaling.low_freq_factor,
                    high_freq_factor=self.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=(
                        self.rope_scaling.original_max_position_embeddings
                    ),
                )
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            hf["use_sliding_window"] = self.sliding_window is not None
        if self.layer_types:
            hf["layer_types"] = list(self.layer_types)
        if self.model_type in GEMMA_TYPES:
            hf.update(
                hidden_activation=self.hidden_act,
                # transformers types it as an int.
                query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                layer_types=list(self.layer_types) or ["full_attention"] * self.num_layers,
            )
            if self.rope_local_theta is not None:
                hf["rope_local_base_freq"] = self.rope_local_theta
        if self.model_type == "mixtral":
            hf.update(
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                intermediate_size=self.expert_intermediate_size,
            )
        if self.model_type == "qwen3_moe":
            hf.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.expert_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=list(self.dense_layers),
            )
        return hf


def _int_if_whole(value: float | None) -> float | int | None:
    return int(value) if value is not None and float(value).is_integer() else value


def _no_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def _gemma_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 2 and 3: GeGLU, `(1 + w)` norms, sandwich norms, scaled embeddings, soft-caps."""
    key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    act = hf.get(key) or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise FerrumError.unsupported(
            f"{key} {act!r} is not supported (supported: {list(ACTIVATIONS)})"
        )
    fields: dict[str, Any] = dict(
        hidden_act=act,
        norm_plus_one=True,
        sandwich_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=_number(hf, "query_pre_attn_scalar", 256, "config"),
    )
    for ours, key in (
        ("attn_logit_softcap", "attn_logit_softcapping"),
        ("final_logit_softcap", "final_logit_softcapping"),
    ):
        if hf.get(key) is not None:
            fields[ours] = _number(hf, key, None, "config")
    return fields


def _gemma3_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 2's block plus q/k norms and a local rotary base for sliding layers; global layers
    keep `rope_theta` (1M by default) and any `rope_scaling`."""
    fields = _gemma_fields(hf)
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        # transformers 5.x: one rope dict per layer type.
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        for key, part in (("full_attention", full), ("sliding_attention", local)):
            if not isinstance(part, Mapping):
                raise FerrumError.config(f"rope_parameters.{key} must be a dict, got {part!r}")
        theta, scaling = _rope({"rope_parameters": {"rope_theta": 1_000_000.0, **full}})
        if local.get("rope_type", "default") != "default":
            raise FerrumError.unsupported(
                f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not "
                "supported (sliding layers take plain rotary)"
            )
        local_theta = _number(local, "rope_theta", 10_000.0, "rope_parameters.sliding_attention")
    else:
        theta, scaling = _rope({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)})
        local_theta = _number(hf, "rope_local_base_freq", 10_000.0, "config")
    return dict(fields, rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)


def _moe_counts(hf: Mapping[str, Any], experts_key: str, size_key: str) -> dict[str, Any]:
    experts = _optional_int(hf, experts_key)
    top_k = _optional_int(hf, "num_experts_per_tok")
    size = _optional_int(hf, size_key)
    return dict(
        num_experts=0 if experts is None else experts,
        num_experts_per_tok=2 if top_k is None else top_k,
        expert_intermediate_size=0 if size is None else size,
    )


def _mixtral_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Mixtral: every MLP sparse, softmax over all experts then the top-k renormalised."""
    fields = _moe_counts(hf, "num_local_experts", "intermediate_size")
    if fields["num_experts"] <= 0:
        raise FerrumError.config(f"num_local_experts must be positive, got {fields['num_experts']}")
    return dict(fields, norm_topk_prob=True)


def _qwen3_moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: sparse layers by `decoder_sparse_step` and `mlp_only_layers`, top-k
    renormalised only with `norm_topk_prob`."""
    key = "num_experts" if "num_experts" in hf else "num_local_experts"
    fields = _moe_counts(hf, key, "moe_intermediate_size")
    step = _optional_int(hf, "decoder_sparse_step")
    step = 1 if step is None else step
    if step < 1:
        raise FerrumError.config(f"decoder_sparse_step must be >= 1, got {step}")
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise FerrumError.config(f"mlp_only_layers must be a list of layers, got {only!r}")
    layers = _required_int(hf, "num_hidden_layers")
    if any(not 0 <= i < layers for i in only):
        raise FerrumError.config(f"mlp_only_layers {only} are not all layers of {layers}")
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    return dict(fields, norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_layers=dense)


def _phi3_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Phi-3: the Llama block (its fused projections are a checkpoint matter); partial rotary
    is refused, and so is `longrope`/`su` scaling (by `_rope`)."""
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), Mapping) else {}
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise FerrumError.unsupported(
            f"partial_rotary_factor {factor!r} is not supported (rotary over the whole head only)"
        )
    return {}


_FAMILY_FIELDS = {
    "gemma2": _gemma_fields,
    "gemma3_text": _gemma3_fields,
    "mixtral": _mixtral_fields,
    "qwen3_moe": _qwen3_moe_fields,
    "phi3": _phi3_fields,
}
"""model_type -> the fields its config keys set beyond the Llama block's."""


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures")
    if not archs:
        by_type = {v: k for k, v in _ARCHITECTURES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
        raise FerrumError.config("config has neither 'architectures' nor a known 'model_type'")
    for arch in archs:
        if arch in _ARCHITECTURES:
            return arch
    for arch in archs:
        if arch in _REFUSED_ARCHITECTURES:
            raise FerrumError.unsupported(f"architectures {archs}: {_REFUSED_ARCHITECTURES[arch]}")
    raise FerrumError.unsupported(
        f"architectures {archs} is not supported; supported: {sorted(_ARCHITECTURES)}"
    )


def _required_int(hf: Mapping[str, Any], key: str) -> int:
    if key not in hf or hf[key] is None:
        raise FerrumError.config(f"config is missing required key {key!r}")
    return _optional_int(hf, key)


def _optional_int(hf: Mapping[str, Any], key: str) -> int | None:
    value = hf.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise FerrumError.config(f"config key {key!r} must be an integer, got {value!r}")
    return value


def _token_id(hf: Mapping[str, Any], key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FerrumError.config(f"config key {key!r} must hold token ids, got {hf[key]!r}")
    return value


def _number(params: Mapping[str, Any], key: str, default: float | None, where: str) -> float:
    value = params.get(key, default)
    if value is None:
        raise FerrumError.config(f"{where} is missing required key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FerrumError.config(f"{where} key {key!r} must be a number, got {value!r}")
    return float(value)


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5.x moves theta and scaling into one `rope_parameters` dict.
    params = hf.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params = hf.get("rope_scaling")
        key = "rope_scaling"
        theta = _number(hf, "rope_theta", 10000.0, "config")
    elif isinstance(params, Mapping):
        theta = _number(params, "rope_theta", hf.get("rope_theta", 10000.0), key)
    if params is not None and not isinstance(params, Mapping):
        raise FerrumError.config(f"{key} must be a dict, got {params!r}")
    if not params:
        return theta, None
    kind = params.get("rope_type", params.get("type"))
    if kind is None:
        raise FerrumError.config(f"{key} has no 'rope_type' (or 'type')")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=_number(params, "factor", None, key))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=_number(params, "factor", None, key),
            low_freq_factor=_number(params, "low_freq_factor", None, key),
            high_freq_factor=_number(params, "high_freq_factor", None, key),
            original_max_position_embeddings=int(
                _number(params, "original_max_position_embeddings", None, key)
            ),
        )
    raise FerrumError.unsupported(
        f"{key}.rope_type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def _sliding_window(hf: Mapping[str, Any], model_type: str) -> tuple[int | None, tuple[str, ...]]:
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    layer_types = tuple(hf.get("layer_types") or ())
    if window is None:
        return None, ()
    if not layer_types and model_type in ("gemma2", "gemma3_text"):
        # Configs written before `layer_types`: every `pattern`-th layer is global.
        pattern = 2 if model_type == "gemma2" else _optional_int(hf, "sliding_window_pattern") or 6
        layers = _required_int(hf, "num_hidden_layers")
        layer_types = tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        )
    for kind in layer_types:
        if kind not in ("full_attention", "sliding_attention"):
            raise FerrumError.unsupported(f"layer_types entry {kind!r} is not supported")
    if isinstance(window, bool) or not isinstance(window, int):
        raise FerrumError.config(f"config key 'sliding_window' must be an integer, got {window!r}")
    if not layer_types and model_type in ("qwen2", "qwen3", "qwen3_moe"):
        # Qwen: only layers from max_window_layers on use the window.
        first = _optional_int(hf, "max_window_layers") or 0
        layers = _required_int(hf, "num_hidden_layers")
        layer_types = tuple(
            "sliding_attention" if i >= first else "full_attention" for i in range(layers)
        )
    return window, layer_types
