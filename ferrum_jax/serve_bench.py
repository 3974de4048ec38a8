"""`ferrum-jax bench --serve`: the Ferrum 0.7 engine loop against the 0.6 split path.

Both paths serve the same request mix on the same warmed-up executor, one after the other
in one run (`ferrum_jax.engine_loop`): output tokens/s, TTFT and inter-token latency
percentiles per path, and the ratio. Greedy sampling on the host, as the engine does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import jax
import numpy as np

from ferrum_jax import progress, sharding
from ferrum_jax.checkpoint import load_model
from ferrum_jax.engine_loop import Request, run_split, run_unified, summary
from ferrum_jax.executor import JaxModelExecutor


def request_mix(
    n: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab: int,
    rate: float | None,
    seed: int = 0,
) -> list[Request]:
    """`n` requests with uniform prompt and output lengths in the (inclusive) ranges; all
    at time 0, or Poisson arrivals at `rate` requests/s."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, n) if rate else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [
        Request(
            f"req{i}",
            rng.integers(
                10, vocab, int(rng.integers(prompt_range[0], prompt_range[1] + 1))
            ).tolist(),
            int(rng.integers(output_range[0], output_range[1] + 1)),
            float(arrivals[i]),
        )
        for i in range(n)
    ]


def run_serve_bench(args: argparse.Namespace) -> int:
    mesh = sharding.mesh_from_spec(args.mesh) if getattr(args, "mesh", None) else None
    with progress.waiting("loading"):
        model = load_model(
            args.model,
            dtype=args.dtype,
            mesh=mesh,
            allow_non_finite=getattr(args, "allow_non_finite", False),
        )
    prompts, outputs = args.serve_prompts, args.serve_outputs
    executor = JaxModelExecutor(
        model,
        max_batch_size=args.serve_batch,
        max_sequence_length=prompts[1] + outputs[1],
        max_kv_tokens=args.max_kv_tokens,
        mesh=mesh,
        attention_impl=getattr(args, "attention", "auto"),
    )
    requests = request_mix(
        args.requests, tuple(prompts), tuple(outputs), model.runtime_config.vocab_size, args.rate
    )
    print("serve: warming up (compiling every step shape)", file=sys.stderr)
    start = time.perf_counter()
    compiled = asyncio.run(executor.warmup())
    warmup_s = time.perf_counter() - start
    report: dict[str, Any] = {
        "model": model.source,
        "dtype": args.dtype,
        "device": str(jax.devices()[0].device_kind),
        "requests": args.requests,
        "prompt_range": list(prompts),
        "output_range": list(outputs),
        "rate": args.rate,
        "max_batch_size": executor.max_batch_size,
        "kv_pages": executor.cache_metrics_snapshot()["pages_total"],
        "page_size": executor.block_size,
        "warmup_s": warmup_s,
        "programs": len(compiled["ragged"]) + len(compiled["verify"]) + len(compiled["copy"]),
    }
    runs = {"unified": run_unified, "split": run_split}
    tokens = {}
    for name, loop in runs.items():
        print(f"serve: {name} path", file=sys.stderr)
        start = time.perf_counter()
        with progress.waiting(f"serve: {name} path"):
            results = asyncio.run(loop(executor, requests))
        report[name] = summary(results, time.perf_counter() - start)
        tokens[name] = {k: r.tokens for k, r in results.items()}
        print(f"serve: {name}: {_line(report[name])}", file=sys.stderr)
    report["unified_vs_split"] = report["unified"]["serve_tok_s"] / report["split"]["serve_tok_s"]
    report["same_tokens"] = tokens["unified"] == tokens["split"]
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report) if not sys.stdout.isatty() else _table(report))
    return 0


def _line(row: dict[str, float]) -> str:
    return (
        f"{row['serve_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.2f} s p99 "
        f"{row['ttft_p99_s']:.2f} s, ITL p50 {row['itl_p50_s'] * 1e3:.0f} ms p99 "
        f"{row['itl_p99_s'] * 1e3:.0f} ms"
    )


def _table(report: dict[str, Any]) -> str:
    lines = [f"{name:>8}: {_line(report[name])}" for name in ("unified", "split")]
    lines.append(f"unified / split: {report['unified_vs_split']:.2f}x output tokens/s")
    return "\n".join(lines)
