"""Model-side greedy argmax (`ferrum_jax.engine.greedy`) against a host reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax.engine.greedy import MIN_PENALTY_BUCKET, GreedyRows, greedy_argmax, pack_greedy
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.interfaces import GreedyRepetitionPenalty, LogitsReturnPolicy, TokenSelectionMask

VOCAB = 48


def reference(logits: np.ndarray, policy: LogitsReturnPolicy) -> int | None:
    """Host greedy of one row, written from ENGINE-NOTES.md: the penalty once per distinct
    listed id below the vocabulary with a finite logit, then the argmax over finite logits
    the mask allows (lowest index on ties); None when no id qualifies (full logits)."""
    v = logits.astype(np.float32).copy()
    vocab = v.shape[0]
    rep = policy.repetition_penalty
    if rep is not None:
        p = np.float32(rep.penalty)
        for t in set(rep.token_ids):
            if t < vocab and np.isfinite(v[t]):
                with np.errstate(divide="ignore", over="ignore"):
                    v[t] = v[t] / p if v[t] > 0 else v[t] * p
    allowed = np.isfinite(v)
    mask = policy.token_mask
    if mask is not None:
        m = np.zeros(vocab, dtype=bool)
        n = min(len(mask), vocab)
        m[:n] = np.frombuffer(mask.valid_token_mask, dtype=np.int8)[:n] != 0
        allowed &= m
    if not allowed.any():
        return None
    return int(np.flatnonzero(allowed & (v == v[allowed].max()))[0])


def tied_logits(rng: np.random.Generator, rows: int, vocab: int = VOCAB) -> np.ndarray:
    """Logits on a coarse grid (many exact ties, both signs), with some -inf and NaN."""
    logits = np.round(rng.normal(size=(rows, vocab)) * 2) / 2
    logits[rng.random((rows, vocab)) < 0.05] = -np.inf
    logits[rng.random((rows, vocab)) < 0.02] = np.nan
    return logits.astype(np.float32)


def random_policy(
    rng: np.random.Generator, vocab: int = VOCAB, max_ids: int = 12
) -> LogitsReturnPolicy:
    mask = None
    if rng.random() < 0.8:
        # Lengths around the vocabulary: shorter forbids the tail, longer is cut.
        length = int(rng.integers(vocab - 8, vocab + 8))
        density = rng.choice([0.0, 0.05, 0.5, 1.0])
        values = (rng.random(length) < density) * rng.integers(1, 128, length)
        mask = TokenSelectionMask.new(np.where(rng.random(length) < 0.5, values, -values))
    penalty = None
    if rng.random() < 0.8:
        # Duplicates and ids past the vocabulary included.
        ids = rng.integers(0, vocab + 4, int(rng.integers(0, max_ids + 1)))
        value = float(rng.choice([0.5, 1.0, 1.3, 2.0]))
        penalty = GreedyRepetitionPenalty.new(value, ids.tolist())
    return LogitsReturnPolicy.GreedyArgmax(mask, penalty)


def run(logits: np.ndarray, packed: GreedyRows) -> tuple[np.ndarray, np.ndarray]:
    tokens, any_allowed = jax.jit(greedy_argmax)(
        jnp.asarray(logits),
        jnp.asarray(packed.mask),
        jnp.asarray(packed.penalty),
        jnp.asarray(packed.penalty_ids),
    )
    return np.asarray(tokens), np.asarray(any_allowed)


@pytest.mark.parametrize("seed", range(6))
def test_matches_host_reference_on_random_masks_and_penalties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = 16
    policies = [random_policy(rng) for _ in range(rows)]
    logits = tied_logits(rng, rows)
    tokens, any_allowed = run(logits, pack_greedy(policies, VOCAB))
    for r, policy in enumerate(policies):
        expected = reference(logits[r], policy)
        assert bool(any_allowed[r]) == (expected is not None), r
        if expected is not None:
            assert int(tokens[r]) == expected, r


def test_ties_go_to_the_lowest_index() -> None:
    logits = np.zeros((3, 8), dtype=np.float32)
    logits[0, [2, 5, 7]] = 3.0
    logits[1] = -1.0  # all tied and negative
    logits[2, [1, 6]] = 4.0
    mask = TokenSelectionMask.new([1, 0, 1, 1, 1, 1, 1, 1])
    policies = [
        LogitsReturnPolicy.GreedyArgmax(),
        LogitsReturnPolicy.GreedyArgmax(mask),
        # Penalising id 1 (4 -> 2) leaves id 6 as the only max.
        LogitsReturnPolicy.GreedyArgmax(None, GreedyRepetitionPenalty.new(2.0, [1])),
    ]
    tokens, any_allowed = run(logits, pack_greedy(policies, 8))
    assert tokens.tolist() == [2, 0, 6] and any_allowed.all()


def test_penalty_division_is_exact_so_a_penalised_tie_breaks_low() -> None:
    """`v / p` exactly as IEEE (Rust) divides, not XLA's `v * (1 / p)`: for values where the
    two differ, a logit penalised onto a lower id's logit ties with it, and the lower wins."""
    rng = np.random.default_rng(0)
    v = rng.uniform(1, 3, 4096).astype(np.float32)
    p = rng.uniform(1.01, 2, 4096).astype(np.float32)
    differ = np.flatnonzero(v / p != v * (np.float32(1) / p))
    assert differ.size, "no value where division and reciprocal-multiply differ"
    rows = min(differ.size, 16)
    logits = np.full((rows, 8), -5.0, np.float32)
    logits[:, 2] = (v / p)[differ[:rows]]  # the lower id: already the penalised value
    logits[:, 5] = v[differ[:rows]]  # the higher id, penalised onto it
    ids = np.full((rows, 8), -1, np.int32)
    ids[:, 0] = 5
    mask = np.ones((rows, 8), bool)
    got, allowed = jax.jit(greedy_argmax)(logits, mask, p[differ[:rows]], ids)
    assert allowed.all() and np.asarray(got).tolist() == [2] * rows


def test_penalty_divides_positive_and_multiplies_negative_logits_once_per_id() -> None:
    logits = np.array(
        [
            [4.0, 3.0, -9.0, -9.0],  # divided: 2.0 < 3.0 (multiplied, 8.0 would win)
            [-1.0, -1.5, -9.0, -9.0],  # multiplied: -2.0 < -1.5 (divided, -0.5 would win)
            [4.0, 1.9, -9.0, -9.0],  # listed thrice, once: 2.0 > 1.9 (thrice, 0.5 would lose)
            [-1.0, -2.5, -9.0, -9.0],  # listed thrice, once: -2.0 > -2.5 (thrice, -8.0)
        ],
        dtype=np.float32,
    )
    penalty = np.full(4, 2.0, dtype=np.float32)
    ids = np.array([[0, -1, -1], [0, -1, -1], [0, 0, 0], [0, 0, 0]], dtype=np.int32)
    mask = np.ones((4, 4), dtype=bool)
    tokens, any_allowed = jax.jit(greedy_argmax)(logits, mask, penalty, ids)
    assert np.asarray(tokens).tolist() == [1, 1, 0, 0] and np.asarray(any_allowed).all()


def test_finiteness_is_checked_after_the_penalty() -> None:
    # A penalty of 0 sends id 0's 5.0 to +inf: no longer finite, so not chosen. Non-finite
    # logits (id 2 +inf, id 3 NaN) stay out whatever the penalty does to them.
    logits = np.array([[5.0, 1.0, np.inf, np.nan], [5.0, 1.0, np.inf, np.nan]], np.float32)
    rep = GreedyRepetitionPenalty.new(0.0, [0, 2, 3])
    policies = [LogitsReturnPolicy.GreedyArgmax(None, rep)] * 2
    tokens, any_allowed = run(logits, pack_greedy(policies, 4))
    assert tokens.tolist() == [1, 1] and any_allowed.all()
    assert reference(logits[0], policies[0]) == 1


def test_rows_with_no_allowed_id_report_it() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1.0, -np.inf, np.nan], [1.0, 2.0, 3.0]], np.float32)
    policies = [
        LogitsReturnPolicy.GreedyArgmax(TokenSelectionMask.new([0, 0, 0])),
        LogitsReturnPolicy.GreedyArgmax(TokenSelectionMask.new([0, 1, 1])),  # only non-finite
        LogitsReturnPolicy.GreedyArgmax(TokenSelectionMask.new([])),  # empty: nothing allowed
    ]
    _, any_allowed = run(logits, pack_greedy(policies, 3))
    assert any_allowed.tolist() == [False, False, False]
    assert all(reference(logits[r], p) is None for r, p in enumerate(policies))


def test_pack_greedy_layout() -> None:
    mask = TokenSelectionMask.new([1, 0, 1])  # shorter than the vocabulary
    long_mask = TokenSelectionMask.new([0, 1, 0, 1, 1, 1, 1])  # longer: cut
    policies = [
        LogitsReturnPolicy.FullLogits,
        LogitsReturnPolicy.GreedyArgmax(mask, GreedyRepetitionPenalty.new(1.5, [4, 2, 4, 9])),
        LogitsReturnPolicy.GreedyArgmax(long_mask, GreedyRepetitionPenalty.new(1.0, [1])),
    ]
    packed = pack_greedy(policies, 5, rows=4)
    assert packed.mask.tolist() == [
        [True] * 5,
        [True, False, True, False, False],
        [False, True, False, True, True],
        [True] * 5,
    ]
    assert packed.penalty.dtype == np.float32 and packed.penalty.tolist() == [1.0, 1.5, 1.0, 1.0]
    assert packed.penalty_ids.dtype == np.int32
    assert packed.penalty_ids.shape == (4, MIN_PENALTY_BUCKET)
    # Distinct, in order, below the vocabulary; a penalty of 1 lists nothing.
    assert packed.penalty_ids[1, :3].tolist() == [4, 2, -1]
    assert (packed.penalty_ids[[0, 2, 3]] == -1).all()
    assert packed.mask_key == (None, mask.fingerprint, long_mask.fingerprint, None, 5)
    assert not packed.mask.flags.writeable
    with pytest.raises(FerrumError) as exc:
        pack_greedy(policies, 5, rows=2)
    assert exc.value.kind is ErrorKind.INVALID_PARAMETER


def test_pack_greedy_buckets_penalty_ids_and_reuses_masks() -> None:
    def with_ids(n: int) -> LogitsReturnPolicy:
        return LogitsReturnPolicy.GreedyArgmax(
            None, GreedyRepetitionPenalty.new(1.2, list(range(n)))
        )

    widths = [pack_greedy([with_ids(n)], 64).penalty_ids.shape[1] for n in (0, 3, 8, 9, 17)]
    assert widths == [8, 8, 8, 16, 32]
    mask = TokenSelectionMask.new([1, 0] * 32)
    first = pack_greedy([LogitsReturnPolicy.GreedyArgmax(mask)] * 2, 64)
    # A fresh but equal mask object (as the engine builds each step) hits the cache.
    fresh = TokenSelectionMask.new([1, 0] * 32)
    again = pack_greedy([LogitsReturnPolicy.GreedyArgmax(fresh)] * 2, 64)
    assert again.mask is first.mask and again.mask_key == first.mask_key


def test_new_masks_and_penalties_do_not_recompile() -> None:
    traces = 0

    def counted(*args: jax.Array) -> tuple[jax.Array, jax.Array]:
        nonlocal traces
        traces += 1
        return greedy_argmax(*args)

    step = jax.jit(counted)
    rng = np.random.default_rng(7)
    rows = 8
    for _ in range(6):
        # Any requests, masks and penalties within one penalty-id bucket share the program.
        count = int(rng.integers(1, rows + 1))
        policies = [random_policy(rng, max_ids=MIN_PENALTY_BUCKET) for _ in range(count)]
        packed = pack_greedy(policies, VOCAB, rows=rows)
        logits = tied_logits(rng, rows)
        tokens, any_allowed = step(logits, packed.mask, packed.penalty, packed.penalty_ids)
        for r, policy in enumerate(policies):
            expected = reference(logits[r], policy)
            assert bool(any_allowed[r]) == (expected is not None)
            if expected is not None:
                assert int(tokens[r]) == expected
    assert traces == 1 and step._cache_size() == 1
