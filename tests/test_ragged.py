"""The ragged step: mixed batches against HF, chunked prefill, scattered pages, compile counts."""

from __future__ import annotations

import numpy as np
import pytest
from test_parity import CASES, Case

from ferrum_jax import engine
from ferrum_jax.engine import RaggedItem, pack_ragged, run_ragged

TOL = 1e-4
CHUNK_TOL = 1e-5


class Pool:
    """A page pool with pages handed out in a random order (never consecutive)."""

    def __init__(self, config, *, page_size: int, num_pages: int, seed: int = 0):
        self.config, self.page_size, self.num_pages = config, page_size, num_pages
        self.pages = engine.init_pages(config, num_pages, page_size, attention_impl="xla")
        self.free = list(np.random.default_rng(seed).permutation(num_pages))
        self.width = num_pages  # any sequence may grow to the whole pool

    def take(self, tokens: int) -> list[int]:
        count = -(-tokens // self.page_size)
        taken, self.free = self.free[:count], self.free[count:]
        return [int(p) for p in taken]

    def step(self, case, items: list[RaggedItem]) -> list[np.ndarray]:
        batch = pack_ragged(items, pages_per_item=self.width, num_pages=self.num_pages)
        logits, self.pages = run_ragged(case.graphdef, case.params, self.pages, batch)
        return [np.asarray(x) for x in logits]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, one_torch_thread):
    return Case(request.param)


def test_mixed_ragged_batch_matches_hf(case):
    """Two fresh prompts of different lengths, three decodes at different positions and one
    chunk continuing at offset 37, all in one step, against HF full forwards."""
    rng = np.random.default_rng(7)
    vocab = case.config.vocab_size
    seqs = {
        name: rng.integers(3, vocab, n)
        for name, n in {"a": 9, "b": 23, "c": 6, "d": 31, "e": 18, "f": 49}.items()
    }
    prefix = {"c": 5, "d": 30, "e": 17, "f": 37}
    pool = Pool(case.config, page_size=4, num_pages=64)
    pages = {name: pool.take(len(seq)) for name, seq in seqs.items()}
    pool.step(
        case,
        [RaggedItem(seqs[n][: prefix[n]], 0, pages[n], "none") for n in prefix],
    )
    mixed = [
        RaggedItem(seqs["a"], 0, pages["a"], "all"),
        RaggedItem(seqs["c"][5:], 5, pages["c"], "last"),
        RaggedItem(seqs["b"], 0, pages["b"], "all"),
        RaggedItem(seqs["d"][30:], 30, pages["d"], "last"),
        RaggedItem(seqs["f"][37:], 37, pages["f"], "all"),
        RaggedItem(seqs["e"][17:], 17, pages["e"], "last"),
    ]
    got = pool.step(case, mixed)
    starts = {"a": 0, "c": 5, "b": 0, "d": 30, "f": 37, "e": 17}
    for (name, start), logits in zip(starts.items(), got, strict=True):
        want = case.hf_logits(seqs[name])[start:]
        if len(logits) == 1:
            want = want[-1:]
        np.testing.assert_allclose(logits, want, atol=TOL, err_msg=f"{case.name} item {name}")


@pytest.mark.parametrize("page_size", [16, 128])
def test_chunked_prefill_equals_whole_prefill(case, page_size):
    """Chunks of 1, 7 and 64 tokens over scattered pages give the whole prefill's logits."""
    rng = np.random.default_rng(page_size)
    prompt = rng.integers(3, case.config.vocab_size, 70)
    whole_pool = Pool(case.config, page_size=page_size, num_pages=8, seed=1)
    (whole,) = whole_pool.step(case, [RaggedItem(prompt, 0, whole_pool.take(70), "all")])
    for chunk in (1, 7, 64):
        pool = Pool(case.config, page_size=page_size, num_pages=8, seed=chunk)
        pages = pool.take(70)
        rows = []
        for start in range(0, 70, chunk):
            (logits,) = pool.step(
                case, [RaggedItem(prompt[start : start + chunk], start, pages, "all")]
            )
            rows.append(logits)
        np.testing.assert_allclose(
            np.concatenate(rows), whole, atol=CHUNK_TOL, err_msg=f"chunk {chunk}"
        )


@pytest.fixture(scope="module")
def gqa(one_torch_thread):
    return Case("gqa")


def test_a_serving_mix_compiles_once_per_bucket(gqa):
    """50 steps of varying mixes: only a new (token, item, logits-rows) bucket compiles, and
    replaying the same 50 steps compiles nothing."""
    rng = np.random.default_rng(0)
    pool = Pool(gqa.config, page_size=8, num_pages=256)
    batches = []
    for _ in range(50):
        items = []
        for _ in range(int(rng.integers(1, 7))):
            q, start = int(rng.integers(1, 5)), int(rng.integers(0, 20))
            items.append(RaggedItem(rng.integers(3, 250, q), start, pool.take(start + q), "last"))
        batches.append(pack_ragged(items, pages_per_item=pool.width, num_pages=pool.num_pages))
    shapes = {(len(b.tokens), len(b.kv_lens), len(b.logits_at)) for b in batches}
    before = engine.compile_counts()["ragged"]
    for batch in batches:
        _, pool.pages = run_ragged(gqa.graphdef, gqa.params, pool.pages, batch)
    first = engine.compile_counts()["ragged"] - before
    assert 1 <= first <= len(shapes)
    for batch in batches:
        _, pool.pages = run_ragged(gqa.graphdef, gqa.params, pool.pages, batch)
    assert engine.compile_counts()["ragged"] - before == first
