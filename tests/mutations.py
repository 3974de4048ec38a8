"""Mutation check: each deliberate bug the suite must catch, applied one at a time to a
temporary copy of the tree, then the tests that guard it; reports caught / NOT CAUGHT.

Run on demand, not in CI (pytest does not collect this file: it is not `test_*.py`):

    python tests/mutations.py            # every mutation
    python tests/mutations.py --list     # names only
    python tests/mutations.py sampling_sort_when_all_rows_filter ...

A mutation is a list of exact `(file, old snippet, new snippet)` edits and the pytest node ids
that guard it. Every snippet must occur exactly once in its file: after a refactor moves the
code, the script stops before running anything and names each snippet it cannot find, so the
mutation is re-targeted rather than silently skipped. The guarding tests first run on the
unmutated copy and must pass there; a mutation counts as caught when they then fail.

The copy imports its own `ferrum_jax` (`PYTHONPATH`), with `ferrum_jax/models` and
`ferrum_jax/sharding` linked to its top-level `models/` and `sharding/` as the package-dir
mapping of the editable install would do for the real tree; the script checks that.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    edits: tuple[tuple[str, str, str], ...]
    """(file relative to the repository root, exact old snippet, new snippet)."""
    tests: tuple[str, ...]
    """pytest node ids (relative to the repository root) that must fail."""


EXECUTOR = "ferrum_jax/executor/executor.py"
LAYERS = "models/layers.py"
RMSNORM_F32 = (LAYERS, "        x32 = x.astype(jnp.float32)\n", "        x32 = x\n")
# The online softmax of paged attention over scores rounded to bf16.
SCORES = '        scores = jnp.einsum("vqkgd,vbkd->vkgqb", q_tiles, keys.astype(jnp.float32))'
SOFTMAX_F32 = ("models/attention.py", SCORES, SCORES + ".astype(jnp.bfloat16)")

MUTATIONS = (
    # ---- the seven of issue 18 -------------------------------------------------------------
    Mutation(
        "1_padding_rows_write_slot_0",
        "executor padding items and tokens written to page 0 instead of dropped",
        (
            (
                "ferrum_jax/engine/ragged.py",
                "    table = np.full((items_bucket, pages_per_item), num_pages, np.int32)\n",
                "    table = np.zeros((items_bucket, pages_per_item), np.int32)\n",
            ),
            (
                "models/attention.py",
                "    ok = real & (index < pages_per_item)",
                "    ok = (index < pages_per_item)",
            ),
        ),
        ("tests/test_executor.py::test_odd_row_batches_next_to_a_live_sequence",),
    ),
    Mutation(
        "2_sampling_sort_when_all_rows_filter",
        'mixed per-row sampling: "any row needs sorting" flipped to "all rows"',
        (
            (
                "ferrum_jax/sampling.py",
                "needs_sort = jnp.any(sampled_rows & ((params.top_k > 0) | (params.top_p < 1)))",
                "needs_sort = jnp.all(sampled_rows & ((params.top_k > 0) | (params.top_p < 1)))",
            ),
        ),
        ("tests/test_sampling.py::test_filtered_and_unfiltered_rows_in_one_batch",),
    ),
    Mutation(
        "3_llama_o_proj_bias_dropped",
        "Llama attention_bias: the o_proj bias dropped",
        (
            (
                LAYERS,
                "        if self.config.o_bias:\n"
                "            y = y + self.o_bias[...].astype(out.dtype)\n",
                "",
            ),
        ),
        (
            "tests/test_parity.py::test_prefill_logits[llama_attention_bias]",
            "tests/test_parity.py::test_decode_logits[llama_attention_bias]",
        ),
    ),
    Mutation(
        "4_qwen2_per_layer_window_ignored",
        "Qwen2 per-layer sliding window (max_window_layers / layer_types) ignored",
        (
            (
                "models/config.py",
                '        if self.layer_types and self.layer_types[layer] != "sliding_attention":\n'
                "            return None\n",
                "",
            ),
        ),
        (
            "tests/test_parity.py::test_prefill_logits[qwen2_window_layers]",
            "tests/test_parity.py::test_decode_logits[qwen2_window_layers]",
        ),
    ),
    Mutation(
        "5_rmsnorm_and_softmax_in_bf16",
        "RMSNorm and softmax computed in bf16 instead of float32",
        (RMSNORM_F32, SOFTMAX_F32),
        (
            "tests/test_parity.py::test_bfloat16_matches_hf_bfloat16",
            "tests/test_parity.py::test_bfloat16_softmax_resolves_what_bf16_cannot",
        ),
    ),
    Mutation(
        "5a_rmsnorm_in_bf16",
        "RMSNorm alone computed in bf16",
        (RMSNORM_F32,),
        ("tests/test_parity.py::test_bfloat16_matches_hf_bfloat16",),
    ),
    Mutation(
        "5b_softmax_in_bf16",
        "softmax alone computed in bf16",
        (SOFTMAX_F32,),
        ("tests/test_parity.py::test_bfloat16_softmax_resolves_what_bf16_cannot",),
    ),
    Mutation(
        "6_speculative_threshold_ignored_in_0_1",
        "speculative acceptance threshold ignored for values in (0, 1)",
        (
            (
                EXECUTOR,
                "if d == probs[i].argmax() or probs[i, d] >= threshold:",
                "if d == probs[i].argmax() or threshold <= 0:",
            ),
        ),
        ("tests/test_executor.py::test_speculative_threshold_between_0_and_1",),
    ),
    Mutation(
        "7a_duplicate_decode_handle_accepted",
        "executor validation removed: the same handle twice in batch_decode",
        (
            (
                EXECUTOR,
                "                    if record.cache_id in seen:\n",
                "                    if False:\n",
            ),
        ),
        ("tests/test_executor.py::test_same_handle_twice_in_batch_decode_is_refused",),
    ),
    Mutation(
        "7b_left_padded_mask_accepted",
        "executor validation removed: left-padded attention masks",
        (
            (
                EXECUTOR,
                "            if np.any(mask != (np.arange(s)[None] < lengths[:, None])):\n"
                '                raise FerrumError.unsupported("attention_mask must be right '
                'padding (1s then 0s)")\n',
                "",
            ),
        ),
        ("tests/test_executor.py::test_attention_masks_other_than_right_padding_are_refused",),
    ),
    Mutation(
        "7c_decode_position_ids_unchecked",
        "executor validation removed: decode position_ids mismatch",
        (
            (
                EXECUTOR,
                "            if positions.shape != (rows,) or np.any(positions != "
                "np.asarray(record.lengths)):",
                "            if False:",
            ),
        ),
        ("tests/test_executor.py::test_position_ids_must_match_what_the_cache_holds",),
    ),
    # ---- the batch_prefill bug and the red-team mechanisms ---------------------------------
    Mutation(
        "bug_duplicate_prefill_handle_accepted",
        "the same handle twice in one batch_prefill accepted (the bug issue 18 found)",
        (
            (
                EXECUTOR,
                "            if cache_id in seen:\n",
                "            if False:\n",
            ),
        ),
        ("tests/test_executor_hostile.py::test_1b_same_handle_twice_in_batch_prefill",),
    ),
    Mutation(
        "rt1_no_recovery_after_device_failure",
        "red team 1: a failed device step no longer restores the pool",
        (
            (
                EXECUTOR,
                "            if not self._pool_intact():\n                self._rebuild()\n",
                "            pass\n",
            ),
        ),
        ("tests/test_executor_hostile.py::test_1f_failed_device_step_fails_alone",),
    ),
    Mutation(
        "rt2_abandoned_call_not_rolled_back",
        "red team 2: a call cancelled after it finished is not rolled back",
        ((EXECUTOR, "            if call.abandon():", "            if call.abandon() and False:"),),
        ("tests/test_executor_hostile.py::test_2c_cancelled_after_finishing_but_before_delivery",),
    ),
    Mutation(
        "rt2_running_call_not_rolled_back",
        "red team 2: a call cancelled while it runs is not rolled back",
        (
            (
                EXECUTOR,
                "            if not call.finish(txn):\n                self._roll_back(txn)\n",
                "            if not call.finish(txn):\n",
            ),
        ),
        (
            "tests/test_executor_hostile.py::test_2a_cancelled_prefills_never_strand_slots",
            "tests/test_executor_hostile.py::test_2b_timed_out_decode_is_rolled_back",
        ),
    ),
    Mutation(
        "rt3_released_slots_not_scrubbed",
        "red team 3: masked values of reused pages reach attention's sum (0 * NaN)",
        (
            (
                "models/attention.py",
                "        values = jnp.where(seen.any(axis=1)[:, :, None, None], "
                "values.astype(jnp.float32), 0.0)\n",
                "        values = values.astype(jnp.float32)\n",
            ),
        ),
        (
            "tests/test_executor_hostile.py::"
            "test_3a_released_slot_values_never_reach_a_later_sequence",
        ),
    ),
    Mutation(
        "rt3_jax_ids_not_range_checked",
        "red team 3: token ids in jax arrays not range-checked",
        (
            (
                "ferrum_jax/engine/batch.py",
                "        _check_range(low, high, vocab, what)\n        return tokens\n",
                "        return tokens\n",
            ),
        ),
        ("tests/test_executor_hostile.py::test_3b_engine_refuses_out_of_range_ids_in_jax_arrays",),
    ),
    Mutation(
        "rt5_decode_past_max_len_unchecked",
        "red team 5: functional decode/extend past max_len no longer refused",
        (
            (
                "ferrum_jax/engine/steps.py",
                "    over = end > cache.max_len\n",
                "    over = end > 10**9\n",
            ),
        ),
        (
            "tests/test_executor_hostile.py::test_5b_engine_decode_and_extend_past_max_len_are_refused",
        ),
    ),
    # ---- issue 25: weight swaps, sequence ids, releases --------------------------------------
    Mutation(
        "25_2_pages_of_old_weights_cached",
        "issue 25 item 2: rows live across a keep_cache swap give their pages to the cache",
        (
            (
                EXECUTOR,
                "        return row.params_version == self.params_version\n",
                "        return True\n",
            ),
        ),
        ("tests/test_unified.py::test_update_params_keep_cache_never_reuses_pages_of_old_weights",),
    ),
    Mutation(
        "25_5_generated_id_takes_a_caller_id",
        "issue 25 item 5: an id the executor makes may be a caller's live seq_id",
        (
            (
                EXECUTOR,
                "            if cache_id not in self._live and cache_id not in taken:\n",
                "            if True:\n",
            ),
        ),
        ("tests/test_unified.py::test_generated_ids_skip_seq_ids_callers_use",),
    ),
    Mutation(
        "25_6_queued_call_outlives_a_release",
        "issue 25 item 6: a call queued before a release creates the sequence anyway",
        (
            (
                EXECUTOR,
                "        if self._released_at.get(record.cache_id, -1) > txn.issued:\n",
                "        if False:\n",
            ),
        ),
        (
            "tests/test_unified.py::"
            "test_release_wins_over_a_queued_call_that_would_create_the_sequence",
        ),
    ),
)
# Not listed, on purpose: removing the pool's memory check. Its guarding test would then
# try to allocate a 94 GB pool on the machine running the script.


def copy_tree(dst: pathlib.Path) -> None:
    """Tracked and untracked-but-not-ignored files of the repository, as git lists them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            (dst / src.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / src.relative_to(ROOT))
    for package in ("models", "sharding"):
        (dst / "ferrum_jax" / package).symlink_to(pathlib.Path("..") / package)


def environment(copy: pathlib.Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(copy), "CI": "true"}


def check_imports(copy: pathlib.Path) -> None:
    probe = (
        "import ferrum_jax, ferrum_jax.models.layers as l, ferrum_jax.sharding as s;"
        "print(ferrum_jax.__file__, l.__file__, s.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=copy,
        env=environment(copy),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    stray = [path for path in out if not pathlib.Path(path).resolve().is_relative_to(copy)]
    if stray:
        sys.exit(f"the copy imports code from outside itself: {stray}")


def missing_snippets(mutations: tuple[Mutation, ...]) -> list[str]:
    problems = []
    for m in mutations:
        for file, old, _ in m.edits:
            count = (ROOT / file).read_text().count(old)
            if count != 1:
                what = "snippet not found" if count == 0 else f"snippet found {count} times"
                problems.append(f"{m.name}: {file}: {what}:\n{old}")
    return problems


def pytest(copy: pathlib.Path, tests: tuple[str, ...], *, first_failure: bool) -> int:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    if first_failure:
        argv.insert(4, "-x")
    return subprocess.run(argv, cwd=copy, env=environment(copy), capture_output=True).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:42s} {m.why}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"unknown mutations: {sorted(unknown)}")
    chosen = tuple(m for m in MUTATIONS if not args.names or m.name in args.names)
    problems = missing_snippets(chosen)
    if problems:
        print("\n\n".join(problems), file=sys.stderr)
        print(
            f"\n{len(problems)} snippet(s) must be re-targeted; nothing was run.", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="ferrum-mutations-") as tmp:
        copy = pathlib.Path(tmp)
        copy_tree(copy)
        check_imports(copy)
        guards = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        start = time.perf_counter()
        if pytest(copy, guards, first_failure=False) != 0:
            print("the guarding tests fail on the unmutated tree; fix that first", file=sys.stderr)
            return 2
        print(f"baseline: {len(guards)} guarding tests pass ({time.perf_counter() - start:.0f} s)")
        missed = 0
        for m in chosen:
            originals = {file: (copy / file).read_text() for file, _, _ in m.edits}
            for file, old, new in m.edits:
                path = copy / file
                path.write_text(path.read_text().replace(old, new, 1))
            start = time.perf_counter()
            code = pytest(copy, m.tests, first_failure=True)
            for file, text in originals.items():
                (copy / file).write_text(text)
            if code == 1:
                verdict = "caught"
            elif code == 0:
                verdict, missed = "NOT CAUGHT", missed + 1
            else:
                verdict, missed = f"ERROR (pytest exit {code})", missed + 1
            seconds = time.perf_counter() - start
            print(f"{verdict:12s} {m.name:42s} {seconds:5.0f} s  {m.why}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
