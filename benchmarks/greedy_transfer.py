"""What `LogitsReturnPolicy.GreedyArgmax` saves per served step: SmolLM2-135M (fp32) decode
steps of `unified_decode` at 1, 8 and 16 rows (128-token prompts), answered with full logits
(the engine takes the argmax on the host) or with token ids picked on the device. Bytes to
the host per step come from the executor's `logits_bytes_to_host`; times are medians of
interleaved steps in one process:

    python benchmarks/greedy_transfer.py [--steps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import numpy as np

import ferrum_jax as fj
from ferrum_jax.engine_loop import EngineHandle

PROMPT = 128


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor()


async def run(rows: int, steps: int, model: fj.Model) -> dict[str, float]:
    executor = fj.JaxModelExecutor(
        model, max_batch_size=2 * rows, max_sequence_length=PROMPT + 2 * steps + 8
    )
    rng = np.random.default_rng(0)
    greedy = fj.LogitsReturnPolicy.GreedyArgmax()
    full = fj.LogitsReturnPolicy.FullLogits
    ids = {policy: [f"{policy.kind.value}{i}" for i in range(rows)] for policy in (full, greedy)}
    tokens: dict[str, int] = {}
    for policy, seqs in ids.items():
        items = [
            fj.UnifiedBatchItem(
                s,
                rng.integers(10, 40000, PROMPT).tolist(),
                EngineHandle(s),
                0,
                True,
                logits_policy=policy,
            )
            for s in seqs
        ]
        outs = await executor.unified_decode(fj.UnifiedBatch(items))
        for s, out in zip(seqs, outs, strict=True):
            tokens[s] = int(np.argmax(out)) if out.size > 1 else int(out[0])
    times: dict[str, list[float]] = {"full": [], "greedy": []}
    sent = {"full": 0, "greedy": 0}
    for step in range(steps + 1):  # the first step of each compiles: not timed
        for name, policy in (("full", full), ("greedy", greedy)):
            seqs = ids[policy]
            items = [
                fj.UnifiedBatchItem(
                    s, [tokens[s]], EngineHandle(s), PROMPT + step, True, logits_policy=policy
                )
                for s in seqs
            ]
            before = executor.cache_metrics_snapshot()["logits_bytes_to_host"]
            start = time.perf_counter()
            outs = await executor.unified_decode(fj.UnifiedBatch(items))
            for s, out in zip(seqs, outs, strict=True):  # what the engine does with the answer
                tokens[s] = int(np.argmax(out)) if out.size > 1 else int(out[0])
            if step:
                times[name].append(time.perf_counter() - start)
                sent[name] += executor.cache_metrics_snapshot()["logits_bytes_to_host"] - before
    await executor.shutdown()
    return {
        "rows": rows,
        "full_ms": 1e3 * statistics.median(times["full"]),
        "greedy_ms": 1e3 * statistics.median(times["greedy"]),
        "full_bytes_per_step": sent["full"] / steps,
        "greedy_bytes_per_step": sent["greedy"] / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    model = fj.load_model()
    results = [asyncio.run(run(int(r), args.steps, model)) for r in args.rows.split(",")]
    for r in results:
        print(
            f"{r['rows']:>3} rows: full logits {r['full_ms']:.1f} ms, "
            f"{r['full_bytes_per_step'] / 1024:.0f} KiB/step; device greedy "
            f"{r['greedy_ms']:.1f} ms, {r['greedy_bytes_per_step']:.0f} B/step"
        )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"cpu": cpu(), "model": "SmolLM2-135M fp32", "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
