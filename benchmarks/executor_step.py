"""Per-step time of the served decode path: `JaxModelExecutor.batch_decode` on SmolLM2-135M
(fp32) at 1, 8 and 16 rows after 128-token prompts, medians of `--steps` steps.

    python benchmarks/executor_step.py [--steps 20] [--rows 1,8,16] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import numpy as np

import ferrum_jax as fj
from ferrum_jax.interfaces import DecodeInput, PrefillInput


async def measure(model, rows: int, steps: int) -> float:
    executor = fj.JaxModelExecutor(model, max_batch_size=16, max_sequence_length=256)
    rng = np.random.default_rng(0)
    outs = await executor.batch_prefill(
        [PrefillInput(rng.integers(10, 40000, (1, 128)).astype(np.int32)) for _ in range(rows)]
    )
    handles = [o.kv_cache for o in outs]
    tokens = [int(o.last_token_logits().argmax_last_dim_u32()[0]) for o in outs]
    times = []
    for step in range(steps + 1):  # the first step compiles
        start = time.perf_counter()
        outs = await executor.batch_decode(
            [
                DecodeInput(np.asarray([[t]], np.int32), h)
                for t, h in zip(tokens, handles, strict=True)
            ]
        )
        tokens = [int(o.logits.argmax_last_dim_u32()[0]) for o in outs]
        if step:
            times.append(time.perf_counter() - start)
    await executor.shutdown()
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    model = fj.load_model()
    result = {int(r): asyncio.run(measure(model, int(r), args.steps)) for r in args.rows.split(",")}
    print(" ".join(f"{r} rows {ms:.1f} ms/step;" for r, ms in result.items()))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"batch_decode_ms": result}, f, indent=2)


if __name__ == "__main__":
    main()
