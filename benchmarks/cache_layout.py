"""Measures the KV-cache layout choice: [slots, kv_heads, max_len, head_dim] vs
[slots, max_len, kv_heads, head_dim], for one decode step's cache write + attention
(SmolLM2 shapes: 3 KV heads x 3 query groups, head_dim 64).

Run: python benchmarks/cache_layout.py  (prints median microseconds per layer-step).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

KV, G, D = 3, 3, 64


def step(keys, values, q, k, v, pos, heads_first: bool):
    """Writes one token per row at `pos`, then attends over the row (masked softmax)."""
    b = q.shape[0]
    rows = jnp.arange(b)
    if heads_first:  # [b, kv, t, d]
        keys = keys.at[rows, :, pos].set(k)
        values = values.at[rows, :, pos].set(v)
        kk, vv = keys, values
    else:  # [b, t, kv, d]
        keys = keys.at[rows, pos].set(k)
        values = values.at[rows, pos].set(v)
        kk, vv = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
    t = kk.shape[2]
    scores = jnp.sum(q[:, :, :, None, :] * kk[:, :, None], axis=-1)  # [b, kv, g, t]
    scores = jnp.where(jnp.arange(t) <= pos[:, None, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * vv[:, :, None], axis=-2)
    return out, keys, values


def median_us(batch: int, max_len: int, heads_first: bool, repeat: int = 200) -> float:
    shape = (batch, KV, max_len, D) if heads_first else (batch, max_len, KV, D)
    keys, values = jnp.zeros(shape), jnp.zeros(shape)
    q, k, v = jnp.ones((batch, KV, G, D)), jnp.ones((batch, KV, D)), jnp.ones((batch, KV, D))
    pos = jnp.full((batch,), max_len // 2, jnp.int32)
    fn = jax.jit(step, static_argnames="heads_first", donate_argnums=(0, 1))
    out, keys, values = fn(keys, values, q, k, v, pos, heads_first=heads_first)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out, keys, values = fn(keys, values, q, k, v, pos, heads_first=heads_first)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeat // 2] * 1e6


if __name__ == "__main__":
    for batch, max_len in ((1, 256), (8, 256), (8, 2048)):
        first = median_us(batch, max_len, True)
        second = median_us(batch, max_len, False)
        print(
            f"batch {batch}, max_len {max_len}: [slots, kv, len, d] {first:.0f} us, "
            f"[slots, len, kv, d] {second:.0f} us"
        )
