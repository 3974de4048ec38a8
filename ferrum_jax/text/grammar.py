"""Constrained decoding: the tokens a JSON schema or a regex allows next, from llguidance.

A `Constraint` is a checked grammar (no tokenizer needed, so a bad schema or regex is one
`FerrumError` before any weights load). `Constraint.matcher(tokenizer, vocab_size)` starts one
sequence's `Matcher`: `allowed()` is the `[vocab_size]` bool mask of the next token, `accept`
advances by the token picked. When the grammar is complete the mask allows the tokenizer's EOS
ids (and only them once nothing may follow), so an answer that stops is a whole match.

Why llguidance (`benchmarks/grammar_masks.py`, SmolLM2-135M's 49152-id tokenizer, 2-core CPU;
a 5-property nested JSON schema replayed over a 51-token answer, a date/e-mail regex over 20):

    library        deps                       compile json/regex  mask per step json/regex
                                                                  (mean, first step incl.)
    llguidance     none                       1.0 / 1.2 ms        154 / 283 us
    xgrammar       torch, transformers, triton 15 / 45 ms          7 / 69 us
    outlines-core  none                       326 / 127 ms        25 / 12 us

Every library's mask costs well under a decode step (tens of ms here), so the request's total
is what differs: llguidance's compile plus 51 masks is 9 ms against xgrammar's 16 ms and
outlines-core's 327 ms (outlines-core builds the whole token automaton up front), and it needs
no extra package while xgrammar pulls in torch and triton (gigabytes) for its bitmask tensors.
Wrapping the tokenizer costs about 300 ms with llguidance, once per tokenizer (cached here).
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Mapping
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from ferrum_jax.errors import FerrumError
from ferrum_jax.text.tokenizer import Tokenizer

# The separators `json.dumps` writes, and no other whitespace. With llguidance's default (any
# whitespace between items), SmolLM2-135M on the 4 schemas of tests/test_grammar.py took 14-29
# tokens instead of 12-21, and its greedy "scores" answer spent all 40 tokens on blank lines
# inside the array (8 answers, greedy and sampled). A schema's own "x-guidance" overrides this.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A checked grammar for generated text: a JSON schema or a regex (full match)."""

    kind: str
    """`"json_schema"` or `"regex"`."""
    source: str
    """The schema as compact JSON, or the regex."""
    grammar: str = dataclasses.field(repr=False)
    """llguidance's grammar text."""

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        """From a schema object or its JSON text; raises `FerrumError` if it is not one."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise FerrumError.invalid_parameter(f"JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, Mapping):
            raise FerrumError.invalid_parameter(
                f"a JSON schema must be a JSON object, got {type(schema).__name__}"
            )
        options = schema.get("x-guidance", {})
        if not isinstance(options, Mapping):
            raise FerrumError.invalid_parameter(
                f"x-guidance must be a JSON object, got {type(options).__name__}"
            )
        schema = {**schema, "x-guidance": {**_JSON_LAYOUT, **options}}
        try:
            source = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
            source.encode("utf-8")
        except (TypeError, ValueError) as e:  # not JSON data, a lone surrogate
            raise FerrumError.invalid_parameter(f"JSON schema is not JSON data: {e}") from None
        return cls._checked("json_schema", source, llguidance.LLMatcher.grammar_from_json_schema)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """From a regex the whole answer must match; raises `FerrumError` if it is not one."""
        if not isinstance(pattern, str) or not pattern:
            raise FerrumError.invalid_parameter(
                f"regex must be a non-empty string, got {pattern!r}"
            )
        try:
            pattern.encode("utf-8")
        except UnicodeEncodeError:
            raise FerrumError.invalid_parameter(
                f"regex {pattern!a} is not valid Unicode (a lone surrogate)"
            ) from None
        return cls._checked("regex", pattern, llguidance.LLMatcher.grammar_from_regex)

    @classmethod
    def _checked(cls, kind: str, source: str, build: Any) -> Constraint:
        grammar = build(source)
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            what = "JSON schema" if kind == "json_schema" else f"regex {source!r}"
            # A regex error is a caret diagram; its "error: ..." line is the reason.
            lines = [line.strip() for line in error.strip().splitlines()]
            reason = next((line for line in lines if line.startswith("error:")), lines[0])
            raise FerrumError.invalid_parameter(f"invalid {what}: {reason.removeprefix('error: ')}")
        return cls(kind, source, grammar)

    def matcher(self, tokenizer: Tokenizer, vocab_size: int) -> Matcher:
        """A fresh matcher for one sequence; `vocab_size` is the model's (ids past the
        tokenizer's are never allowed)."""
        return Matcher(self, _vocabulary(tokenizer, vocab_size), vocab_size)


class Matcher:
    """One sequence's position in its constraint."""

    def __init__(
        self, constraint: Constraint, vocabulary: llguidance.LLTokenizer, vocab_size: int
    ) -> None:
        self.constraint = constraint
        self._vocab_size = vocab_size
        self._matcher = llguidance.LLMatcher(vocabulary, constraint.grammar)
        self._bits = llg_numpy.allocate_token_bitmask(1, vocabulary.vocab_size)

    def allowed(self) -> np.ndarray:
        """`[vocab_size]` bool: True for the ids that may come next."""
        llg_numpy.fill_next_token_bitmask(self._matcher, self._bits, 0)
        self._check()
        bits = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little").astype(np.bool_)
        mask = np.zeros(self._vocab_size, np.bool_)
        n = min(self._vocab_size, bits.size)
        mask[:n] = bits[:n]
        if not mask.any():
            raise FerrumError.internal(f"the {self.constraint.kind} constraint allows no token")
        return mask

    def accept(self, token: int) -> None:
        """Advance by `token`, which `allowed()` must have allowed."""
        if not self._matcher.consume_token(token):
            self._check()
            raise FerrumError.internal(f"token {token} breaks the {self.constraint.kind}")

    def is_stopped(self) -> bool:
        """True once the grammar took its EOS (or nothing may follow)."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise FerrumError.internal(f"grammar matcher: {self._matcher.get_error()}")


# Wrapping a tokenizer serialises its vocabulary and indexes it: ~300 ms for SmolLM2's 49152
# ids, so once per (tokenizer, vocab size) for the life of the tokenizer.
_vocabularies: weakref.WeakKeyDictionary[Tokenizer, dict[int, llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)


def _vocabulary(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    per_size = _vocabularies.setdefault(tokenizer, {})
    if vocab_size not in per_size:
        per_size[vocab_size] = _wrap(tokenizer, vocab_size)
    return per_size[vocab_size]


def _wrap(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    if not tokenizer.eos_token_ids:
        raise FerrumError.tokenizer("constrained decoding needs a tokenizer with an EOS token")
    return llguidance.LLTokenizer(
        tokenizer.backend.to_str(),
        n_vocab=max(vocab_size, tokenizer.vocab_size),
        eos_token=list(tokenizer.eos_token_ids),
    )
