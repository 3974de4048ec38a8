"""Ragged paged attention: every implementation against a plain numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax.errors import FerrumError
from ferrum_jax.models import attention as attn


def reference(q, keys, values, q_lens, spec) -> np.ndarray:
    """Per-item causal attention in float64 (`keys[i]: [kv_len_i, kv, d]`)."""
    out = np.zeros(q.shape, np.float64)
    group = spec.num_heads // spec.num_kv_heads
    start = 0
    for k, v, n in zip(keys, values, q_lens, strict=True):
        kv_len = k.shape[0]
        for t in range(n):
            pos = kv_len - n + t
            key_pos = np.arange(kv_len)
            ok = key_pos <= pos
            if spec.window is not None:
                ok &= key_pos > pos - spec.window
            for h in range(spec.num_heads):
                s = (k[:, h // group].astype(np.float64) @ q[start + t, h]) * spec.scale
                if spec.soft_cap is not None:
                    s = spec.soft_cap * np.tanh(s / spec.soft_cap)
                s = np.where(ok, s, -np.inf)
                p = np.exp(s - s.max())
                out[start + t, h] = (p / p.sum()) @ v[:, h // group]
        start += n
    return out


class Batch:
    """A random ragged batch over a pool of randomly scattered pages."""

    def __init__(self, rng, q_lens, kv_lens, *, items, tokens, page_size, kv, group, d):
        self.q_lens, self.kv_lens = q_lens, kv_lens
        pages = sum(-(-n // page_size) for n in kv_lens) + 8
        width = -(-max(kv_lens) // page_size) + 1
        order = rng.permutation(pages)
        table = np.full((items, width), pages - 1, np.int32)
        keys = rng.normal(size=(pages * page_size, kv, d)).astype(np.float32)
        values = rng.normal(size=(pages * page_size, kv, d)).astype(np.float32)
        self.keys, self.values, used = [], [], 0
        for i, n in enumerate(kv_lens):
            count = -(-n // page_size)
            table[i, :count] = order[used : used + count]
            used += count
            slots = (table[i, :count, None] * page_size + np.arange(page_size)).reshape(-1)[:n]
            self.keys.append(keys[slots])
            self.values.append(values[slots])
        cu = np.zeros(items + 1, np.int32)
        cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
        cu[len(q_lens) + 1 :] = cu[len(q_lens)]
        lens = np.zeros(items, np.int32)
        lens[: len(kv_lens)] = kv_lens
        self.meta = attn.metadata(
            jnp.asarray(cu),
            jnp.asarray(lens),
            jnp.asarray(table),
            num_tokens=tokens,
            page_size=page_size,
            num_pages=pages,
        )
        self.q = rng.normal(size=(tokens, kv * group, d)).astype(np.float32)
        self.flat_k = keys.reshape(pages, page_size, kv, d)
        self.flat_v = values.reshape(pages, page_size, kv, d)

    def pool(self, layout: attn.PageLayout) -> attn.Pool:
        if layout is attn.COMBINED:
            both = np.stack([self.flat_k, self.flat_v], axis=3)  # [P, ps, kv, 2, d]
            return (jnp.asarray(both.reshape(*both.shape[:2], -1, both.shape[-1])),)
        return tuple(jnp.asarray(x.transpose(2, 0, 1, 3)) for x in (self.flat_k, self.flat_v))

    def expected(self, spec) -> np.ndarray:
        return reference(self.q, self.keys, self.values, self.q_lens, spec)


# Mixed batches: fresh prompts, decodes at different positions, a chunk at offset 37, an item
# whose length is an exact page multiple, a length-1 item, and padding items with no tokens.
CASES = {
    "mixed": ([5, 1, 1, 12, 1, 3], [5, 40, 17, 49, 32, 3]),
    "decode": ([1] * 6, [130, 1, 16, 77, 64, 9]),
    "prefill": ([48], [48]),
}


def _spec(window=None, soft_cap=None, kv=2, group=3, d=16):
    return attn.AttentionSpec(kv * group, kv, d, d**-0.5, window=window, soft_cap=soft_cap)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("layout", [attn.COMBINED, attn.SPLIT], ids=["combined", "split"])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, None), (None, 5.0)])
def test_xla_matches_reference(case, page_size, layout, window, soft_cap):
    q_lens, kv_lens = CASES[case]
    rng = np.random.default_rng(len(q_lens) * 7 + page_size)
    items = 8 if case != "prefill" else 1
    tokens = 32 if case == "mixed" else (8 if case == "decode" else 64)
    batch = Batch(
        rng,
        q_lens,
        kv_lens,
        items=items,
        tokens=tokens,
        page_size=page_size,
        kv=2,
        group=3,
        d=16,
    )
    spec = _spec(window, soft_cap)
    out = attn._xla_attention(jnp.asarray(batch.q), batch.pool(layout), layout, batch.meta, spec)
    np.testing.assert_allclose(np.asarray(out), batch.expected(spec), atol=2e-5)


def test_blocks_past_the_longest_item_are_never_read():
    """Pages past every item's length hold NaN: they must not reach any output."""
    rng = np.random.default_rng(3)
    batch = Batch(rng, [1, 1], [20, 9], items=2, tokens=2, page_size=4, kv=2, group=3, d=16)
    used = {int(p) for row in np.asarray(batch.meta.page_table) for p in row[:5]}
    poisoned = [i for i in range(batch.flat_k.shape[0]) if i not in used]
    batch.flat_k[poisoned] = np.nan
    batch.flat_v[poisoned] = np.inf
    spec = _spec()
    out = attn._xla_attention(
        jnp.asarray(batch.q), batch.pool(attn.COMBINED), attn.COMBINED, batch.meta, spec
    )
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), batch.expected(spec), atol=2e-5)


def test_write_then_read_round_trips_both_layouts():
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(5, 2, 8)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(5, 2, 8)).astype(np.float32))
    slots = jnp.asarray([3, 17, 0, 31, 32], jnp.int32)  # 32 is past the pool: dropped
    for layout in (attn.COMBINED, attn.SPLIT):
        pool = tuple(jnp.zeros(s) for s in layout.shapes(8, 4, 2, 8))
        pool = layout.write(pool, k, v, slots)
        keys, values = layout.read(pool, jnp.arange(8)[None])
        np.testing.assert_array_equal(np.asarray(keys[0, slots[:4]]), np.asarray(k[:4]))
        np.testing.assert_array_equal(np.asarray(values[0, slots[:4]]), np.asarray(v[:4]))
        assert float(jnp.abs(keys).sum()) == pytest.approx(float(jnp.abs(k[:4]).sum()), rel=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, None), (None, 5.0)])
def test_tpu_kernel_arguments_match_xla(case, window, soft_cap):
    """What the TPU kernel receives, run through the kernel's own reference implementation
    (Pallas's TPU interpreter in jax 0.10 cannot run the kernel itself)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ref_ragged_paged_attention,
    )

    q_lens, kv_lens = CASES[case]
    rng = np.random.default_rng(11)
    items = 8 if case != "prefill" else 1
    tokens = 32 if case == "mixed" else (8 if case == "decode" else 64)
    batch = Batch(
        rng, q_lens, kv_lens, items=items, tokens=tokens, page_size=16, kv=4, group=2, d=32
    )
    spec = _spec(window, soft_cap, kv=4, group=2, d=32)
    pool = batch.pool(attn.COMBINED)
    want = attn._xla_attention(jnp.asarray(batch.q), pool, attn.COMBINED, batch.meta, spec)
    args, kwargs = attn.tpu_arguments(jnp.asarray(batch.q), pool, batch.meta, spec)
    got = ref_ragged_paged_attention(*args, **kwargs)
    real = sum(q_lens)
    np.testing.assert_allclose(np.asarray(got)[:real], np.asarray(want)[:real], atol=1e-5)


def test_tpu_kernel_off_tpu_is_a_clear_error():
    batch = Batch(
        np.random.default_rng(0), [1], [5], items=1, tokens=1, page_size=4, kv=1, group=2, d=8
    )
    with pytest.raises(FerrumError, match="runs only on TPU"):
        attn.attention(
            jnp.asarray(batch.q),
            batch.pool(attn.COMBINED),
            batch.meta,
            _spec(kv=1, group=2, d=8),
            impl="tpu",
        )


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_gpu_kernel_interpret_matches_xla(case):
    q_lens, kv_lens = CASES[case]
    rng = np.random.default_rng(5)
    tokens = 8 if case == "decode" else 32
    batch = Batch(
        rng,
        q_lens,
        kv_lens,
        items=8,
        tokens=tokens,
        page_size=16,
        kv=2,
        group=8,
        d=64,
    )
    spec = _spec(kv=2, group=8, d=64)
    pool = batch.pool(attn.SPLIT)
    want = attn._xla_attention(jnp.asarray(batch.q), pool, attn.SPLIT, batch.meta, spec)
    got = attn.attention(jnp.asarray(batch.q), pool, batch.meta, spec, impl="gpu")
    real = sum(q_lens)
    np.testing.assert_allclose(np.asarray(got)[:real], np.asarray(want)[:real], atol=1e-5)


def test_unknown_implementation_is_refused():
    with pytest.raises(FerrumError, match="one of auto, xla, tpu, gpu"):
        attn.resolve_implementation("cudnn")
    assert attn.resolve_implementation("auto") == attn.default_implementation(jax.default_backend())
