"""Accelerator benchmark: real-shaped Llama models with random bf16 weights, no checkpoint.

Per model: decode tokens/s at batch 1, 8 and 64 (~128 live tokens per row), memory-bandwidth
utilisation (MBU) against a streaming read measured in the same run, prefill of 2048 tokens
as model FLOPs utilisation (MFU) against a bf16 matmul measured in the same run, the
attention implementation the step ran, and HF transformers (torch, sdpa) on the same device
at batch 1 (its own random weights: only the time is compared). `benchmarks/device.sh` runs it
on an H100/H200; `--smoke` runs a tiny config anywhere (a test keeps it working on CPU).

The JSON report is rewritten after every measurement, so a run stopped at its time limit
still leaves what it measured.

    python benchmarks/device_bench.py --out report.json [--models llama-3.2-1b] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax import bench
from ferrum_jax.model import Model
from ferrum_jax.models import attention
from ferrum_jax.models.config import ModelConfig

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
MODELS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures."""

    models: tuple[str, ...]
    """Keys of `MODELS`."""
    batches: tuple[int, ...]
    """Decode batch sizes."""
    prompt_len: int
    """Live tokens per row when decode starts."""
    new_tokens: int
    """Tokens decoded per row (the decode rate is over all but the first)."""
    prefill_len: int
    """Prompt tokens of the prefill (MFU) measurement, batch 1."""
    repeat: int
    """Timed runs per measurement; medians are reported."""
    matmul_size: int
    """Side of the bf16 matmul that measures the device's compute peak."""


FULL = Plan(("llama-3.2-1b", "llama-3.1-8b"), (1, 8, 64), 128, 128, 2048, 3, 8192)
SMOKE = Plan(("tiny",), (1,), 16, 8, 64, 1, 256)


def config_of(name: str) -> ModelConfig:
    return ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], **MODELS[name]})


def bf16_matmul_tflops(size: int, repeat: int = 5) -> float:
    """bf16 matmul throughput at `size`^3 on the default device (TFLOP/s)."""
    x = jnp.ones((size, size), jnp.bfloat16)
    square = jax.jit(lambda a: a @ a)
    seconds = bench._best_time(lambda: square(x), repeat)
    return 2 * size**3 / seconds / 1e12


def _ours(model: Model, batch: int, prompt_len: int, new_tokens: int, plan: Plan, impl: str):
    """Our one-jit generate loop, warmed, timed `plan.repeat` times."""
    rng = np.random.default_rng(batch)
    prompts = rng.integers(10, model.config.vocab_size, (batch, prompt_len), dtype=np.int32)
    ours = bench._Ours(model, batch, prompt_len, new_tokens, attention_impl=impl)
    ours.set_prompts(prompts)
    ours.e2e()  # warm
    results: dict[str, list[float]] = {"prefill": [], "ttft": [], "e2e": []}
    for _ in range(plan.repeat):
        bench._measure(ours, results)
    return ours, results, prompts


def _hf_decode(config: ModelConfig, prompts: np.ndarray, plan: Plan) -> dict[str, float] | None:
    """HF transformers with random bf16 weights, built directly on the device."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    hf_config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    hf = bench._HF(model, torch, plan.new_tokens, device=device)
    hf.set_prompts(prompts)
    hf.e2e()  # warm
    results: dict[str, list[float]] = {"prefill": [], "ttft": [], "e2e": []}
    for _ in range(plan.repeat):
        bench._measure(hf, results)
    rates = bench._median(results).rates(prompts.shape[0], prompts.shape[1], plan.new_tokens)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"device": device, **rates}


def run(plan: Plan, out: pathlib.Path) -> dict[str, Any]:
    impl = attention.default_implementation()
    probe = bench.probe_machine()
    report: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "attention": impl,
        "bandwidth_gbs": probe.bandwidth_gbs,
        "bf16_matmul_tflops": bf16_matmul_tflops(plan.matmul_size),
        "plan": dataclasses.asdict(plan),
        "models": {},
    }

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    save()
    for name in plan.models:
        config = config_of(name)
        start = time.perf_counter()
        model = Model.init(config, dtype="bfloat16")
        entry: dict[str, Any] = {
            "parameters": config.num_params,
            "init_s": time.perf_counter() - start,
            "decode": [],
        }
        report["models"][name] = entry
        for batch in plan.batches:
            live, new = plan.prompt_len, plan.new_tokens
            ours, results, prompts = _ours(model, batch, live, new, plan, impl)
            row = bench._row(model, probe, batch, live, new, ours, results)
            row["mbu"] = row.pop("roofline_fraction")
            entry["decode"].append(row)
            print(f"{name} batch {batch}: {row['decode_tok_s']:.1f} tok/s, MBU {row['mbu']:.2f}")
            if batch == 1:
                hf = _hf_decode(config, prompts, plan)
                entry["hf_batch1"] = hf
                if hf is not None:
                    entry["decode_ratio_vs_hf_batch1"] = row["decode_tok_s"] / hf["decode_tok_s"]
            save()
        ours, results, _ = _ours(model, 1, plan.prefill_len, 2, plan, impl)
        prefill_s = bench._median(results).prefill_s
        flops = config.forward_flops(plan.prefill_len, plan.prefill_len / 2, 1)
        entry["prefill"] = {
            "tokens": plan.prefill_len,
            "seconds": prefill_s,
            "tok_s": plan.prefill_len / prefill_s,
            "tflops": flops / prefill_s / 1e12,
            "mfu": flops / prefill_s / 1e12 / report["bf16_matmul_tflops"],
        }
        print(f"{name} prefill {plan.prefill_len}: MFU {entry['prefill']['mfu']:.2f}")
        save()
        del model, ours
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--models", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny config, a few tokens")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.models:
        plan = dataclasses.replace(plan, models=tuple(args.models.split(",")))
    unknown = set(plan.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models: {sorted(unknown)}")
    run(plan, pathlib.Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
