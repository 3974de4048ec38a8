"""Measure weight-only int8 matmul formulations on XLA CPU (the choice in `models.quant`).

SmolLM2-135M's decode matvec chain (30 layers of fused q/k/v, o, gate/up and down
projections, one token, or 8) with float32 weights against int8 weights + per-output-channel
float32 scales, in the formulations XLA could run:

- `f32`: float32 weights (the reference).
- `dequant`: `einsum(x, w.astype(f32) * scale)`: dequantize in the dot's operand.
- `scale_after`: `einsum(x, w.astype(f32)) * scale`: the scale multiplies the output.
- `int8_dot`: `einsum(x, w, preferred_element_type=f32) * scale` (mixed-dtype dot).
- `qwix`: `qwix.einsum(x, QArray)` (qwix's weight-only dot: int8 operand, scale after).
- `bf16`: bfloat16 weights and activations (for comparison).

Medians of interleaved repeats, in one process:

    python benchmarks/quant_matmul.py [--repeat 30] [--tokens 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import qwix

E, F, KV, C, D, LAYERS = 576, 1536, 3, 5, 64, 30


def weights(rng):
    return [
        dict(
            qkv=rng.normal(0, 0.02, (E, KV, C, D)).astype(np.float32),
            o=rng.normal(0, 0.02, (KV * 3 * D, E)).astype(np.float32),
            gu=rng.normal(0, 0.02, (E, 2, F)).astype(np.float32),
            down=rng.normal(0, 0.02, (F, E)).astype(np.float32),
        )
        for _ in range(LAYERS)
    ]


SPECS = dict(qkv="te,ekcd->tkcd", o="te,ef->tf", gu="te,ecf->tcf", down="tf,fe->te")
CONTRACT = dict(qkv=(0,), o=(0,), gu=(0,), down=(0,))


def chain(x, layers, matmul):
    for layer in layers:
        qkv = matmul("qkv", x, layer["qkv"])
        x = x + matmul("o", qkv[:, :, :3].reshape(x.shape[0], -1), layer["o"])
        gu = matmul("gu", x, layer["gu"])
        x = x + matmul("down", jax.nn.silu(gu[:, 0]) * gu[:, 1], layer["down"])
    return x


def quantized(layers):
    out = []
    for layer in layers:
        q = {}
        for name, w in layer.items():
            qa = qwix.quantize(
                jnp.asarray(w),
                jnp.int8,
                channelwise_axes=[a for a in range(w.ndim) if a not in CONTRACT[name]],
            )
            q[name] = qa
        out.append(q)
    return out


def formulations():
    def f32(name, x, w):
        return jnp.einsum(SPECS[name], x, w)

    def dequant(name, x, w):
        return jnp.einsum(SPECS[name], x, w.qvalue.astype(x.dtype) * w.scale)

    def scale_after(name, x, w):
        return jnp.einsum(SPECS[name], x, w.qvalue.astype(x.dtype)) * w.scale[0]

    def int8_dot(name, x, w):
        y = jnp.einsum(SPECS[name], x, w.qvalue, preferred_element_type=jnp.float32)
        return y * w.scale[0]

    def qwix_einsum(name, x, w):
        return qwix.einsum(SPECS[name], x, w)

    def mul_reduce(name, x, w):
        # x [T, in] against w [in, ...out]: a multiply and a reduction XLA fuses into one
        # loop that reads int8 weights, never a materialised float copy.
        w32 = w.qvalue.astype(x.dtype)
        prod = x.reshape(x.shape + (1,) * (w.ndim - 1)) * w32[None]
        return prod.sum(axis=1) * w.scale[0]

    def bf16(name, x, w):
        return jnp.einsum(SPECS[name], x.astype(jnp.bfloat16), w).astype(jnp.float32)

    return dict(
        f32=f32,
        dequant=dequant,
        scale_after=scale_after,
        int8_dot=int8_dot,
        qwix=qwix_einsum,
        mul_reduce=mul_reduce,
        bf16=bf16,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    fp = weights(rng)
    q = quantized(fp)
    bf = jax.tree.map(lambda w: jnp.asarray(w, jnp.bfloat16), fp)
    x = jnp.asarray(rng.normal(size=(args.tokens, E)).astype(np.float32))
    params = dict(
        f32=jax.tree.map(jnp.asarray, fp),
        bf16=bf,
        **{k: q for k in ("dequant", "scale_after")},
        **{k: q for k in ("int8_dot", "qwix", "mul_reduce")},
    )
    fns = {name: jax.jit(lambda x, p, m=m: chain(x, p, m)) for name, m in formulations().items()}
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn(x, params[name]).block_until_ready()
    ref = np.asarray(fns["f32"](x, params["f32"]))
    for _ in range(args.repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(x, params[name]).block_until_ready()
            times[name].append(time.perf_counter() - t)
    for name in fns:
        err = np.abs(np.asarray(fns[name](x, params[name])) - ref).max()
        print(f"{name:12s} {1e3 * statistics.median(times[name]):7.2f} ms   max|diff| {err:.2e}")


if __name__ == "__main__":
    main()
