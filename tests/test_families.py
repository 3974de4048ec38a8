"""Gemma 2, Gemma 3, Mixtral, Qwen3-MoE and Phi-3 against HF transformers (torch CPU fp32).

Each family is a tiny random HF model saved with `save_pretrained` and loaded by
`load_model` (the HF reader and checkpoint layout under test too). Proven per family: a
mixed ragged batch and greedy decoding equal to HF, the executor's `unified_decode`, the
(2, 4) virtual mesh (MoE with experts split on `model`, and with their inner dim split),
HF export, orbax and GGUF round trips; then the configs each family refuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
from conftest import TINY_SIZES, hf_greedy, hf_logits, require_reference

from ferrum_jax import engine
from ferrum_jax.checkpoint import hf_state_dict, load_gguf, load_model, save_orbax
from ferrum_jax.checkpoint.gguf import gguf_name, unpermute_qk
from ferrum_jax.checkpoint.hf_config import parse_config
from ferrum_jax.engine import RaggedItem, pack_ragged, run_ragged
from ferrum_jax.engine_loop import Request, run_unified
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.models import attention
from ferrum_jax.models.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4
NEW_TOKENS = 32
SIZES = {**TINY_SIZES, "head_dim": 16}
CASES = {
    # Both soft-caps low enough to bend the scores and logits; window 4 on layer 0.
    "gemma2": (
        "Gemma2",
        dict(
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
            query_pre_attn_scalar=24,
        ),
    ),
    # 2 local : 1 global, window 4 (every prompt is longer), linear scaling on the global layer.
    "gemma3": (
        "Gemma3Text",
        dict(
            num_hidden_layers=3,
            sliding_window=4,
            sliding_window_pattern=3,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            query_pre_attn_scalar=24,
        ),
    ),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (
        "Qwen3Moe",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "phi3": ("Phi3", dict()),
}
MOE = ("mixtral", "qwen3_moe")


class Family:
    """One tiny HF model, saved to disk, and the same model loaded by us."""

    def __init__(self, name: str, root: pathlib.Path):
        torch, transformers = require_reference()
        prefix, overrides = CASES[name]
        config = getattr(transformers, f"{prefix}Config")(
            **{**SIZES, **overrides}, attn_implementation="eager"
        )
        cls = getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")
        torch.manual_seed(sum(map(ord, name)))
        self.name, self.hf = name, cls(config).eval()
        self.hf.generation_config.eos_token_id = None
        with torch.no_grad():  # norms away from their init, so their convention matters
            for key, p in self.hf.named_parameters():
                if "norm" in key:
                    p.uniform_(-0.5, 0.5) if name.startswith("gemma") else p.uniform_(0.5, 1.5)
        self.dir = root / name
        self.hf.save_pretrained(self.dir)
        self.model = load_model(self.dir)
        self.config = self.model.config
        rng = np.random.default_rng(len(name))
        self.prompts = [rng.integers(3, 256, 11), rng.integers(3, 256, 7)]

    def hf_logits(self, seq) -> np.ndarray:
        return hf_logits(self.hf, seq)

    def hf_generate(self, prompt) -> list[int]:
        return hf_greedy(self.hf, prompt, NEW_TOKENS).tolist()

    @functools.cached_property
    def greedy(self) -> list[list[int]]:
        """`engine.generate`'s NEW_TOKENS greedy tokens of each prompt (one batch)."""
        tokens = np.zeros((2, 11), np.int32)
        for i, p in enumerate(self.prompts):
            tokens[i, : len(p)] = p
        out = engine.generate(
            self.model.graphdef,
            self.model.params,
            tokens,
            np.asarray([len(p) for p in self.prompts], np.int32),
            max_new_tokens=NEW_TOKENS,
            stop_tokens=[],
        )
        return np.asarray(out.tokens).tolist()


MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@functools.cache
def _family(name: str, root: pathlib.Path) -> Family:
    return Family(name, root)


@pytest.fixture(scope="module", params=sorted(CASES))
def fam(request, root, one_torch_thread) -> Family:
    return _family(request.param, root)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MEASURED:
        print("\nmax abs logits diff vs HF:")
        for key, value in sorted(MEASURED.items()):
            print(f"  {key}: {value:.2e}")


def test_configs_parse_each_family(root, one_torch_thread):
    gemma3 = _family("gemma3", root).config
    assert gemma3.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert (gemma3.rope_local_theta, gemma3.rope_theta) == (10_000.0, 1_000_000.0)
    assert [gemma3.uses_local_rope(i) for i in range(3)] == [True, True, False]
    assert gemma3.qk_norm and gemma3.norm_plus_one and gemma3.sandwich_norms
    gemma2 = _family("gemma2", root).config
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (2.0, 5.0)
    assert gemma2.attention_scale == 24**-0.5 and gemma2.hidden_act == "gelu_pytorch_tanh"
    qwen = _family("qwen3_moe", root).config
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.norm_topk_prob) == (8, 2, True)
    for name in CASES:
        f = _family(name, root)
        assert f.config.num_params == sum(p.numel() for p in f.hf.parameters()), name
        assert ModelConfig.from_hf(f.config.to_hf()) == f.config


def test_mixed_ragged_batch_matches_hf(fam):
    """Two fresh prompts, a chunk continuing at 13 and two decodes, in one ragged step over
    scattered pages, against HF full forwards."""
    rng = np.random.default_rng(3)
    seqs = {n: rng.integers(3, 256, k) for n, k in {"a": 9, "b": 23, "c": 20, "d": 6}.items()}
    prefix = {"c": 13, "d": 5}
    pages = engine.init_pages(fam.model.runtime_config, 32, 4, attention_impl="xla")
    free = [int(p) for p in np.random.default_rng(0).permutation(32)]
    owned = {}
    for n, seq in seqs.items():
        owned[n], free = free[: -(-len(seq) // 4)], free[-(-len(seq) // 4) :]

    def step(items):
        nonlocal pages
        batch = pack_ragged(items, pages_per_item=32, num_pages=32)
        logits, pages = run_ragged(fam.model.graphdef, fam.model.params, pages, batch)
        return [np.asarray(x) for x in logits]

    step([RaggedItem(seqs[n][: prefix[n]], 0, owned[n], "none") for n in prefix])
    got = step(
        [
            RaggedItem(seqs["a"], 0, owned["a"], "all"),
            RaggedItem(seqs["c"][13:], 13, owned["c"], "all"),
            RaggedItem(seqs["b"], 0, owned["b"], "all"),
            RaggedItem(seqs["d"][5:], 5, owned["d"], "last"),
        ]
    )
    diff = 0.0
    for (n, start), logits in zip({"a": 0, "c": 13, "b": 0, "d": 5}.items(), got, strict=True):
        want = fam.hf_logits(seqs[n])[start:]
        diff = max(diff, float(np.abs(logits - want[-len(logits) :]).max()))
    MEASURED[f"ragged[{fam.name}]"] = diff
    assert diff <= TOL, diff


def test_greedy_matches_hf_generate(fam):
    for prompt, ours in zip(fam.prompts, fam.greedy, strict=True):
        assert ours == fam.hf_generate(prompt), fam.name


def test_unified_decode_matches_generate(fam):
    """The executor serving both prompts at once through Ferrum 0.7's `unified_decode` loop
    (the longer one chunked) gives `engine.generate`'s tokens."""
    executor = JaxModelExecutor(
        fam.config,
        fam.model.graphdef,
        fam.model.params,
        max_batch_size=4,
        max_sequence_length=64,
        block_size=4,
        max_num_batched_tokens=16,
    )
    requests = [Request(f"r{i}", p.tolist(), 8) for i, p in enumerate(fam.prompts)]
    results = asyncio.run(
        run_unified(executor, requests, token_budget=12, decode_chunk=4, prefill_chunk=6)
    )
    for i, want in enumerate(fam.greedy):
        assert results[f"r{i}"].tokens == want[:8], (fam.name, i)
    kind = {"gemma2": "Gemma", "gemma3": "Gemma", "phi3": "Phi", "mixtral": "Mistral"}
    assert executor.info().model_type.kind.value == kind.get(fam.name, "Qwen")


def test_hf_export_loads_in_transformers(fam, tmp_path):
    """`hf_state_dict` + `to_hf` written as an HF directory load in transformers as the same
    model (the names on the Hub: Phi-3's fused projections, per-expert tensors)."""
    torch, transformers = require_reference()
    from safetensors.numpy import save_file

    state = hf_state_dict(fam.config, fam.model.params)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(fam.config.to_hf()))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    ids = torch.tensor(fam.prompts[0][None])
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), fam.hf(ids).logits.numpy(), atol=1e-5)


def test_orbax_round_trip(fam, tmp_path):
    save_orbax(fam.model, tmp_path / "orbax")
    back = load_model(tmp_path / "orbax")
    assert back.config == fam.config
    for (path, a), (_, b) in zip(
        _flat(fam.model.params), _flat(back.params), strict=True
    ):  # same tree, same values
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def _flat(params):
    from flax import nnx

    return [(p, np.asarray(v.get_value())) for p, v in nnx.to_flat_state(params)]


# ---------------------------------------------------------------------------------------------
# The (2, 4) mesh, in a subprocess with 8 virtual devices.


def test_families_on_a_2x4_mesh(root, one_torch_thread, tmp_path):
    """Every family's greedy tokens on data=2,model=4 equal one device's; MoE experts split
    on `model` (4 and 8 experts over 4 devices), and by `EXPERT_TENSOR_PARALLEL_RULES` their
    inner dim instead."""
    steps = 8
    jobs = [
        {"name": n, "dir": str(_family(n, root).dir), "prompt": _family(n, root).prompts[0]}
        for n in sorted(CASES)
    ]
    jobs = [{**j, "prompt": [int(t) for t in j["prompt"]], "steps": steps} for j in jobs]
    jobs = [{**j, "rules": "default"} for j in jobs] + [
        {**j, "rules": "expert_tp"} for j in jobs if j["name"] in MOE
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "families_worker.py"), str(tmp_path / "jobs.json")],
        cwd=ROOT,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    for job in jobs:
        got = results[f"{job['name']}/{job['rules']}"]
        assert got["tokens"] == _family(job["name"], root).greedy[0][:steps], job
        if job["name"] in MOE:
            spec = {k: v for k, v in got["specs"].items() if k.endswith("gate_up_proj")}
            want = "'model', None, None, None" if job["rules"] == "default" else "'model')"
            assert all(want in v for v in spec.values()), (job, spec)


# ---------------------------------------------------------------------------------------------
# GGUF: files written as llama.cpp's converter writes them load as the HF checkpoint does.


def write_gguf(path: pathlib.Path, fam: Family) -> None:
    """`fam` as llama.cpp's converter writes it (F32): Gemma norms stored as 1 + w, experts
    stacked per projection, Mixtral as arch "llama" with Q/K permuted."""
    config = fam.config
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3", "mixtral": "llama"}.get(
        config.model_type, "qwen3moe"
    )
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_ids[0])
    if config.sliding_window:
        w.add_sliding_window(config.sliding_window)
    if config.attn_logit_softcap:
        w.add_float32(f"{arch}.attn_logit_softcapping", config.attn_logit_softcap)
        w.add_float32(f"{arch}.final_logit_softcapping", config.final_logit_softcap)
    if config.sliding_window and arch == "gemma3":
        w.add_sliding_window_pattern(3)
    if config.rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling.factor)
    if config.num_experts:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(config.expert_intermediate_size)
    state = hf_state_dict(config, fam.model.params)
    stacked: dict[str, list[np.ndarray]] = {}
    for name, x in state.items():
        if config.norm_plus_one and name.endswith("norm.weight"):
            x = x + np.float32(1)
        if arch == "llama" and ".q_proj." in name:  # the converter's permute: the inverse
            x = _permute(x, config.num_heads)
        elif arch == "llama" and ".k_proj." in name:
            x = _permute(x, config.num_kv_heads)
        stacked.setdefault(gguf_name(name, config), []).append(x)
    for name, parts in stacked.items():
        w.add_tensor(name, parts[0] if len(parts) == 1 else np.stack(parts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _permute(x: np.ndarray, heads: int) -> np.ndarray:
    back = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2)
    out = back.reshape(x.shape)
    assert np.array_equal(unpermute_qk(out, heads), x)
    return out


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_gguf_round_trip(root, one_torch_thread, tmp_path, name):
    fam = _family(name, root)
    write_gguf(tmp_path / "m.gguf", fam)
    loaded = load_gguf(tmp_path / "m.gguf")
    # llama.cpp keeps no query_pre_attn_scalar: its Gemmas scale by head_dim (27B aside).
    want = fam.config
    if want.query_pre_attn_scalar is not None:
        want = dataclasses.replace(want, query_pre_attn_scalar=float(want.head_dim))
    assert loaded.config == want
    for (path, a), (_, b) in zip(_flat(loaded.params), _flat(fam.model.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7, err_msg=str(path))


def test_gguf_expert_count_mismatch(root, one_torch_thread, tmp_path):
    fam = _family("qwen3_moe", root)
    write_gguf(tmp_path / "m.gguf", fam)
    data = (tmp_path / "m.gguf").read_bytes()
    key = b"qwen3moe.expert_count"
    at = data.index(key) + len(key) + 4  # then the uint32 type tag, then the value
    bad = data[:at] + np.uint32(6).tobytes() + data[at + 4 :]
    (tmp_path / "bad.gguf").write_bytes(bad)
    with pytest.raises(FerrumError) as e:
        load_gguf(tmp_path / "bad.gguf")
    assert e.value.kind is ErrorKind.MODEL and "expert_count is 6" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Refused configs: each a FerrumError naming its key.


def _hf(prefix: str, **overrides) -> dict:
    _, transformers = require_reference()
    arch = f"{prefix.removesuffix('Text')}ForCausalLM"
    d = getattr(transformers, f"{prefix}Config")(**{**SIZES, **overrides}).to_dict()
    return {**d, "architectures": [arch]}


BAD = {
    "gemma_activation": (
        lambda: {**_hf("Gemma2"), "hidden_activation": "relu"},
        "hidden_activation",
    ),
    "mixtral_activation": (lambda: {**_hf("Mixtral"), "hidden_act": "gelu"}, "hidden_act"),
    "top_k_over_experts": (
        lambda: _hf("Mixtral", num_local_experts=4, num_experts_per_tok=5),
        "num_experts_per_tok",
    ),
    "no_experts": (lambda: {**_hf("Mixtral"), "num_local_experts": 0}, "num_local_experts"),
    "phi3_longrope": (
        lambda: {
            **_hf("Phi3"),
            "rope_parameters": None,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
        },
        "longrope",
    ),
    "phi3_su": (
        lambda: {**_hf("Phi3"), "rope_parameters": None, "rope_scaling": {"type": "su"}},
        "rope_scaling",
    ),
    "phi3_partial_rotary": (
        lambda: {**_hf("Phi3"), "rope_parameters": None, "partial_rotary_factor": 0.5},
        "partial_rotary_factor",
    ),
    "softcap_zero": (
        lambda: {**_hf("Gemma2"), "attn_logit_softcapping": 0.0},
        "attn_logit_softcap",
    ),
    "multimodal_gemma3": (
        lambda: {**_hf("Gemma3Text"), "architectures": ["Gemma3ForConditionalGeneration"]},
        "Gemma3ForConditionalGeneration",
    ),
    "mlp_only_layer_out_of_range": (
        lambda: {**_hf("Qwen3Moe", num_experts=4), "mlp_only_layers": [7]},
        "mlp_only_layers",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_are_refused_by_name(case):
    make, key = BAD[case]
    with pytest.raises(FerrumError) as e:
        parse_config(make(), "config.json")
    assert e.value.kind in (ErrorKind.CONFIG, ErrorKind.UNSUPPORTED), e.value
    assert key in str(e.value), str(e.value)


def test_hf_checkpoint_missing_an_expert(root, one_torch_thread, tmp_path):
    """config.json says 4 experts; a checkpoint holding 3 is refused naming what is missing."""
    fam = _family("mixtral", root)
    config = json.loads((fam.dir / "config.json").read_text())
    from safetensors.numpy import save_file

    state = hf_state_dict(fam.config, fam.model.params)
    save_file(
        {k: v for k, v in state.items() if ".experts.3." not in k},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FerrumError) as e:
        load_model(tmp_path)
    assert e.value.kind is ErrorKind.MODEL and re.search(r"experts\.3\.w\d", str(e.value))


def test_every_kernel_receives_the_soft_cap(root, one_torch_thread):
    """No implementation has to refuse a soft-cap: the layer's spec carries it, the TPU kernel
    takes it as `soft_cap` (checked here), the GPU one as `attn_logits_soft_cap`, and "xla"
    applies it (the parity tests above)."""
    from flax import nnx

    fam = _family("gemma2", root)
    spec = nnx.merge(fam.model.graphdef, fam.model.params).layers[0].attn.spec
    assert (spec.soft_cap, spec.window, spec.scale) == (2.0, 4, 24**-0.5)
    meta = attention.metadata(
        np.asarray([0, 1], np.int32),
        np.asarray([1], np.int32),
        np.zeros((1, 1), np.int32),
        num_tokens=1,
        page_size=4,
        num_pages=1,
    )
    pool = (np.zeros((1, 4, 4, 16), np.float32),)
    _, kwargs = attention.tpu_arguments(np.zeros((1, 4, 16), np.float32), pool, meta, spec)
    assert kwargs["soft_cap"] == 2.0 and kwargs["sliding_window"] == 4
