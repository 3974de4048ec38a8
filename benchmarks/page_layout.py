"""Measure the KV page layouts behind `models.attention.COMBINED` (the choice recorded there).

One layer of SmolLM2-135M's attention (9 query / 3 KV heads, head_dim 64) in the pure-JAX
ragged implementation: write this step's keys, then attend, for decode batches of 1 and 8
sequences holding ~130 tokens in 16-token pages scattered through the pool, at page tables
sized for 512 and 8192 tokens. Medians of interleaved repeats, in one process:

    python benchmarks/page_layout.py [--repeat 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.models import attention as attn

KV, GROUP, HEAD_DIM, PAGE = 3, 3, 64, 16
LIVE = 130


def case(batch: int, context: int, layout: attn.PageLayout, rng):
    per_row = context // PAGE
    num_pages = batch * per_row
    shapes = layout.shapes(num_pages, PAGE, KV, HEAD_DIM)
    pool = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes)
    table = rng.permutation(num_pages).reshape(batch, per_row).astype(np.int32)
    meta = attn.metadata(
        jnp.arange(batch + 1, dtype=jnp.int32),
        jnp.full((batch,), LIVE, jnp.int32),
        jnp.asarray(table),
        num_tokens=batch,
        page_size=PAGE,
        num_pages=num_pages,
    )
    q = jnp.asarray(rng.normal(size=(batch, KV * GROUP, HEAD_DIM)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(batch, KV, HEAD_DIM)).astype(np.float32))
    spec = attn.AttentionSpec(KV * GROUP, KV, HEAD_DIM, HEAD_DIM**-0.5)

    @functools.partial(jax.jit, donate_argnums=0)  # as in the ragged step: written in place
    def step(pool, q, k):
        pool = layout.write(pool, k, k, meta.write_slots)
        return attn._xla_attention(q, pool, layout, meta, spec), pool

    return step, pool, q, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    runs = {}
    for batch in (1, 8):
        for context in (512, 8192):
            for layout in (attn.COMBINED, attn.SPLIT):
                runs[(batch, context, layout.name)] = case(batch, context, layout, rng)
    times: dict = {key: [] for key in runs}
    pools = {}
    for key, (fn, pool, q, k) in runs.items():
        pools[key] = jax.block_until_ready(fn(pool, q, k))[1]
    for _ in range(args.repeat):  # interleaved: a slow patch of the machine hits all alike
        for key, (fn, _, q, k) in runs.items():
            start = time.perf_counter()
            pools[key] = jax.block_until_ready(fn(pools[key], q, k))[1]
            times[key].append(time.perf_counter() - start)
    report = []
    for (batch, context, name), ts in times.items():
        us = statistics.median(ts) * 1e6
        report.append({"batch": batch, "max_context": context, "layout": name, "us": us})
        print(f"batch {batch} context {context:5d} {name:9s} {us:8.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
