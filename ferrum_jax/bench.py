"""`ferrum-jax bench`: throughput, latency and compile cost vs HF transformers and the roofline.

Everything is measured in one process run: a bandwidth/FLOP probe, then for each batch size
ours and (with `--compare hf`) HF transformers interleaved A/B per repeat, then the probe
again; medians of the repeats are reported. Compile time is measured separately with
ahead-of-time compilation, so no timed run includes a compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax import engine, progress, sharding
from ferrum_jax.cache import init_cache
from ferrum_jax.checkpoint import hf_state_dict, load_model
from ferrum_jax.errors import FerrumError
from ferrum_jax.model import Model
from ferrum_jax.models.attention import IMPLEMENTATIONS, resolve_implementation
from ferrum_jax.models.kv_quant import bytes_per_token
from ferrum_jax.sampling import SamplingParams, row_keys

_NOISE_TOLERANCE = 0.15
"""Relative change of the calibration probe, before vs after, that flags a noisy machine."""
_PROBE_BYTES = 512 * 2**20
"""Size of the bandwidth probe's array: far larger than any cache."""


@dataclasses.dataclass(frozen=True)
class Probe:
    """Machine limits measured in this run."""

    bandwidth_gbs: float
    """Streaming read bandwidth (GB/s): an XLA reduction over a 512 MiB array."""
    matmul_gflops: float
    """fp32 matmul throughput (GFLOP/s) at 2048^3."""


def _best_time(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def probe_machine(repeat: int = 5) -> Probe:
    """Measures streaming bandwidth and matmul peak on the default device."""
    stream = jnp.ones((_PROBE_BYTES // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    read_s = _best_time(lambda: total(stream), repeat)
    square = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    mm_s = _best_time(lambda: matmul(square), repeat)
    stream.delete()
    return Probe(bandwidth_gbs=_PROBE_BYTES / read_s / 1e9, matmul_gflops=2 * 2048**3 / mm_s / 1e9)


@dataclasses.dataclass
class Timings:
    """Median timings of one implementation at one batch size."""

    prefill_s: float
    ttft_s: float
    e2e_s: float

    def rates(self, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
        decode_s = max(self.e2e_s - self.ttft_s, 1e-9)
        return {
            "prefill_s": self.prefill_s,
            "prefill_tok_s": batch * prompt_len / self.prefill_s,
            "ttft_s": self.ttft_s,
            "decode_tok_s": batch * (new_tokens - 1) / decode_s,
            "e2e_tok_s": batch * new_tokens / self.e2e_s,
            "decode_step_s": decode_s / (new_tokens - 1),
        }


class _Ours:
    """ferrum-jax: AOT-compiled prefill (last logits) and the one-jit generate loop."""

    def __init__(
        self,
        model: Model,
        batch: int,
        prompt_len: int,
        new_tokens: int,
        max_context: int | None = None,
        attention_impl: str = "auto",
    ):
        """`max_context`: tokens each row's cache holds (default: just the prompt bucket and
        the new tokens) — the page table's width, not the tokens live in it."""
        self.attention_impl = resolve_implementation(attention_impl)
        graphdef, params = model.graphdef, model.params
        self.config, self.params, self.dtype = model.runtime_config, params, model.dtype
        self.batch, self.bucket = batch, engine.bucket(prompt_len, minimum=engine.MIN_BUCKET)
        self.cache_len = max_context or self.bucket + new_tokens
        self.tokens = jnp.zeros((batch, self.bucket), jnp.int32)
        self.lengths = jnp.full((batch,), prompt_len, jnp.int32)
        self.slots = jnp.arange(batch, dtype=jnp.int32)
        self.sampling = SamplingParams.greedy(batch)
        self.keys = row_keys(0, batch)
        self.stop = jnp.full((batch, 1), -1, jnp.int32)  # never stops early
        self.row_max = jnp.full((batch,), new_tokens, jnp.int32)
        self.compile_s: dict[str, float] = {}
        cache = self.fresh_cache()
        self._prefill = self._compile(
            "prefill",
            engine.prefill_step,
            graphdef,
            params,
            cache,
            self.tokens,
            self.lengths,
            self.slots,
            False,
        )
        self._compile(
            "decode",
            engine.decode_step,
            graphdef,
            params,
            cache,
            self.lengths,
            None,
            jnp.ones((batch,), bool),
        )
        self._generate = self._compile(
            "generate",
            engine.generate_step,
            graphdef,
            params,
            self.tokens,
            self.lengths,
            self.row_max,
            self.stop,
            self.sampling,
            self.keys,
            max_new_tokens=new_tokens,
            cache_len=self.cache_len,
            attention_impl=self.attention_impl,
        )

    def _compile(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        compiled = fn.lower(*args, **kwargs).compile()
        self.compile_s[name] = time.perf_counter() - start
        return compiled

    def fresh_cache(self):
        return init_cache(
            self.config,
            self.batch,
            self.cache_len,
            self.dtype,
            attention_impl=self.attention_impl,
        )

    def set_prompts(self, prompts: np.ndarray) -> None:
        padded = np.zeros((self.batch, self.bucket), np.int32)
        padded[:, : prompts.shape[1]] = prompts
        self.tokens = jnp.asarray(padded)

    def prefill(self) -> float:
        cache = jax.block_until_ready(self.fresh_cache())
        start = time.perf_counter()
        logits, _ = self._prefill(self.params, cache, self.tokens, self.lengths, self.slots)
        jax.block_until_ready(logits)
        return time.perf_counter() - start

    def ttft(self) -> float:
        cache = jax.block_until_ready(self.fresh_cache())
        start = time.perf_counter()
        logits, _ = self._prefill(self.params, cache, self.tokens, self.lengths, self.slots)
        np.asarray(jnp.argmax(logits, axis=-1))
        return time.perf_counter() - start

    def e2e(self) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = self._generate(
            self.params,
            self.tokens,
            self.lengths,
            self.row_max,
            self.stop,
            self.sampling,
            self.keys,
        )
        tokens = np.asarray(out.tokens)
        return time.perf_counter() - start, tokens


class _HF:
    """HF transformers (torch, sdpa, inference_mode), greedy, same weights and prompts;
    `device` is the torch device the model is on."""

    def __init__(self, model, torch, new_tokens: int, device: str = "cpu"):
        self.model, self.torch, self.new_tokens, self.device = model, torch, new_tokens, device

    def set_prompts(self, prompts: np.ndarray) -> None:
        self.ids = self.torch.tensor(prompts, dtype=self.torch.long, device=self.device)
        self.mask = self.torch.ones_like(self.ids)

    def _sync(self) -> None:
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def prefill(self) -> float:
        with self.torch.inference_mode():
            start = time.perf_counter()
            self.model(self.ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1)
            self._sync()
            return time.perf_counter() - start

    def _generate(self, n: int):
        return self.model.generate(
            self.ids,
            attention_mask=self.mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )

    def ttft(self) -> float:
        with self.torch.inference_mode():
            start = time.perf_counter()
            self._generate(1)
            self._sync()
            return time.perf_counter() - start

    def e2e(self) -> tuple[float, np.ndarray]:
        with self.torch.inference_mode():
            start = time.perf_counter()
            out = self._generate(self.new_tokens)
            self._sync()
            elapsed = time.perf_counter() - start
        return elapsed, out[:, self.ids.shape[1] :].cpu().numpy()


def _measure(impl, results: dict[str, list[float]]) -> np.ndarray:
    results["prefill"].append(impl.prefill())
    results["ttft"].append(impl.ttft())
    e2e, tokens = impl.e2e()
    results["e2e"].append(e2e)
    return tokens


def _median(results: dict[str, list[float]]) -> Timings:
    return Timings(
        prefill_s=statistics.median(results["prefill"]),
        ttft_s=statistics.median(results["ttft"]),
        e2e_s=statistics.median(results["e2e"]),
    )


def _hf_model(ours: Model, dtype: str):
    """The HF torch model holding exactly our weights (dequantised GGUF / HF / orbax)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise FerrumError.unsupported(
            "--compare hf needs torch and transformers: pip install 'ferrum-jax[dev]'"
        ) from e
    config = ours.runtime_config
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    hf_config._attn_implementation = "sdpa"
    model = getattr(transformers, config.architecture)(hf_config).eval()
    state = {k: torch.from_numpy(v) for k, v in hf_state_dict(config, ours.params).items()}
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    return model.to(torch_dtype), torch


def _kv_bytes_per_token(model: Model, attention: str) -> int:
    """KV bytes per token (all layers) in the pages `attention` reads (quantized or not)."""
    c = model.runtime_config
    layout = IMPLEMENTATIONS[attention].layout
    return bytes_per_token(layout, c.num_layers, c.num_kv_heads, c.head_dim, model.dtype)


def _bytes_per_decode_step(model: Model, attention: str, batch: int, context: float) -> float:
    """Bytes a decode step must read: every weight once (the tied LM head reads the whole
    embedding, int4 counted packed) plus each row's cached keys/values."""
    return model.param_bytes + batch * context * _kv_bytes_per_token(model, attention)


def _peak_memory() -> dict[str, float]:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    device = None
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        device = stats["peak_bytes_in_use"] / 2**20
    return {"host_peak_mib": host, "device_peak_mib": device}


def run_bench(args: argparse.Namespace) -> int:
    """The `bench` subcommand: prints a table and writes `--json` / `--plot`.

    One results row per (batch, prompt length, max context): `args.batch`, `args.prompt_len`
    and `args.max_context` are lists (the CLI parses and checks them; a max context of None
    sizes the cache to the prompt and the new tokens).
    """
    mesh = sharding.mesh_from_spec(args.mesh) if getattr(args, "mesh", None) else None
    quantize = getattr(args, "quantize", "none")
    with progress.waiting("loading"):
        loaded = load_model(
            args.model,
            dtype=args.dtype,
            mesh=mesh,
            quantize=None if quantize == "none" else quantize,
            allow_non_finite=getattr(args, "allow_non_finite", False),
        )
    config = loaded.runtime_config
    hf = _hf_model(loaded, args.dtype) if args.compare == "hf" else None
    contexts = getattr(args, "max_context", None) or [None]
    attention = resolve_implementation(getattr(args, "attention", "auto"))
    before = probe_machine()
    _log(f"probe: {before.bandwidth_gbs:.1f} GB/s, {before.matmul_gflops:.0f} GFLOP/s fp32")
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        for prompt_len in args.prompt_len:
            prompts = rng.integers(10, config.vocab_size, (batch, prompt_len), dtype=np.int32)
            theirs = None
            if hf is not None:
                theirs = _HF(hf[0], hf[1], args.new_tokens)
                theirs.set_prompts(prompts)
                theirs.e2e()  # warm torch's kernels / allocator
            hf_results: dict[str, list[float]] = {"prefill": [], "ttft": [], "e2e": []}
            agree = None
            for max_context in contexts:
                # Compiling and the runs of one row take 30 s and more on a small CPU: the
                # stage says it is still measuring (a line every 5 s off a terminal).
                with progress.waiting(f"measuring batch {batch}, prompt {prompt_len}"):
                    ours = _Ours(loaded, batch, prompt_len, args.new_tokens, max_context, attention)
                    ours.set_prompts(prompts)
                    ours.e2e()
                    ours_results: dict[str, list[float]] = {"prefill": [], "ttft": [], "e2e": []}
                    for _ in range(args.repeat):
                        # Interleaved A/B: a slow patch of the machine hits both sides alike. HF's
                        # cache grows as it goes, so it is measured once per prompt length.
                        our_tokens = _measure(ours, ours_results)
                        if theirs is not None and max_context == contexts[0]:
                            their_tokens = _measure(theirs, hf_results)
                            agree = float(np.mean(our_tokens == their_tokens))
                    row = _row(
                        loaded, before, batch, prompt_len, args.new_tokens, ours, ours_results
                    )
                    row["max_context"] = ours.cache_len
                    if theirs is not None:
                        _add_hf(row, hf_results, batch, prompt_len, args.new_tokens, agree)
                    row.update(_peak_memory())
                rows.append(row)
                _log(_format_row(row))
    after = probe_machine()
    drift = abs(after.bandwidth_gbs - before.bandwidth_gbs) / before.bandwidth_gbs
    drift = max(drift, abs(after.matmul_gflops - before.matmul_gflops) / before.matmul_gflops)
    report = {
        "model": loaded.source,
        "dtype": args.dtype,
        "attention": attention,
        "quantization": loaded.quantization,
        "param_bytes": loaded.param_bytes,
        "kv_dtype": getattr(args, "kv_dtype", "auto"),
        "kv_bytes_per_token": _kv_bytes_per_token(loaded, attention),
        "device": str(jax.devices()[0].device_kind),
        "bandwidth_gbs": before.bandwidth_gbs,
        "matmul_gflops": before.matmul_gflops,
        "prompt_len": args.prompt_len[0],
        "prompt_lens": list(args.prompt_len),
        "max_contexts": [row["max_context"] for row in rows if row["batch"] == args.batch[0]][
            : len(contexts)
        ],
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
        "results": rows,
        "noisy": drift > _NOISE_TOLERANCE,
        "probe_after": dataclasses.asdict(after),
    }
    if report["noisy"]:
        _log(f"warning: the machine was noisy (probe drifted {drift:.0%}); rerun for figures")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report) if not sys.stdout.isatty() else _table(report))
    return 0


def _row(model, probe, batch, prompt_len, new_tokens, ours, results) -> dict[str, Any]:
    """Our figures of one (batch, prompt length, max context), against the roofline."""
    config = model.runtime_config
    mine = _median(results).rates(batch, prompt_len, new_tokens)
    context = prompt_len + new_tokens / 2
    step_bytes = _bytes_per_decode_step(model, ours.attention_impl, batch, context)
    prefill_flops = config.forward_flops(batch * prompt_len, prompt_len / 2, batch)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "prefill_tok_s": mine["prefill_tok_s"],
        "ttft_s": mine["ttft_s"],
        "decode_tok_s": mine["decode_tok_s"],
        "e2e_tok_s": mine["e2e_tok_s"],
        "compile_s": ours.compile_s,
        "roofline_fraction": step_bytes / mine["decode_step_s"] / (probe.bandwidth_gbs * 1e9),
        "prefill_roofline_fraction": prefill_flops
        / mine["prefill_s"]
        / (probe.matmul_gflops * 1e9),
        "decode_step_ms": mine["decode_step_s"] * 1e3,
        "hf_prefill_tok_s": None,
        "hf_decode_tok_s": None,
        "hf_ttft_s": None,
        "hf_e2e_tok_s": None,
        "decode_ratio_vs_hf": None,
        "prefill_ratio_vs_hf": None,
        "greedy_token_agreement_vs_hf": None,
    }


def _add_hf(row, results, batch, prompt_len, new_tokens, agree) -> None:
    rates = _median(results).rates(batch, prompt_len, new_tokens)
    row.update(
        hf_prefill_tok_s=rates["prefill_tok_s"],
        hf_decode_tok_s=rates["decode_tok_s"],
        hf_ttft_s=rates["ttft_s"],
        hf_e2e_tok_s=rates["e2e_tok_s"],
        decode_ratio_vs_hf=row["decode_tok_s"] / rates["decode_tok_s"],
        prefill_ratio_vs_hf=row["prefill_tok_s"] / rates["prefill_tok_s"],
        greedy_token_agreement_vs_hf=agree,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _format_row(row: dict[str, Any]) -> str:
    text = (
        f"batch {row['batch']}, prompt {row['prompt_len']}, max context {row['max_context']}: "
        f"prefill {row['prefill_tok_s']:.0f} tok/s, "
        f"ttft {row['ttft_s'] * 1e3:.1f} ms, decode {row['decode_tok_s']:.1f} tok/s "
        f"({row['decode_step_ms']:.1f} ms/step, {row['roofline_fraction']:.0%} of roofline)"
    )
    if row["hf_decode_tok_s"] is not None:
        text += (
            f" | HF prefill {row['hf_prefill_tok_s']:.0f} tok/s, ttft "
            f"{row['hf_ttft_s'] * 1e3:.1f} ms, decode {row['hf_decode_tok_s']:.1f} tok/s"
            f" | x{row['decode_ratio_vs_hf']:.2f} decode, x{row['prefill_ratio_vs_hf']:.2f} prefill"
        )
    return text


def _table(report: dict[str, Any]) -> str:
    return "\n".join(_format_row(row) for row in report["results"])


def plot(report: dict[str, Any], path: str) -> None:
    """Writes `plot_figure(report)` to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = plot_figure(report)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_figure(report: dict[str, Any]):
    """Decode tokens/s vs batch for ours, HF and the bandwidth roofline (a matplotlib Figure).

    Several batch sizes give lines over the batch axis; one batch size gives labelled bars,
    since a line through one point draws nothing (the roofline is a bar there too).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One line per batch size: the rows of the first prompt length and max context.
    key = lambda r: (r.get("prompt_len"), r.get("max_context"))
    rows = [r for r in report["results"] if key(r) == key(report["results"][0])]
    batches = [r["batch"] for r in rows]
    series = [("ferrum-jax", [r["decode_tok_s"] for r in rows])]
    if rows[0]["hf_decode_tok_s"] is not None:
        series.append(("HF transformers", [r["hf_decode_tok_s"] for r in rows]))
    roofline = [
        r["decode_tok_s"] / r["roofline_fraction"] if r["roofline_fraction"] else 0 for r in rows
    ]
    roofline_label = f"roofline ({report['bandwidth_gbs']:.0f} GB/s)"
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(rows) == 1:
        labels = [name for name, _ in series] + [roofline_label]
        values = [values[0] for _, values in series] + [roofline[0]]
        colors = [f"C{i}" for i in range(len(series))] + ["0.8"]
        bars = ax.bar(labels, values, color=colors, edgecolor="k")
        bars[-1].set_hatch("//")
        ax.bar_label(bars, fmt="%.1f")
        ax.margins(y=0.12)  # room for the labels above the bars
        ax.set_xlabel(f"batch size {batches[0]}")
    else:
        for (name, values), marker in zip(series, ("o-", "s-"), strict=False):
            ax.plot(batches, values, marker, label=name)
        ax.plot(batches, roofline, "k--", label=roofline_label)
        ax.set_xlabel("batch size")
        ax.set_xscale("log", base=2)
        ax.legend()
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report['dtype']} decode, {report['device']}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
