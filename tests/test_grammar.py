"""Constrained decoding (`ferrum_jax.text.grammar`, `GenerationRequest.constraint`): the masks
that reach the device are llguidance's, step by step, and bad grammars fail before any work."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import pytest

from ferrum_jax import Constraint, FerrumError, JaxModelExecutor, load_model
from ferrum_jax import batch_generation as batch_module
from ferrum_jax.batch_generation import GenerationRequest, generate_batch
from ferrum_jax.checkpoint import load as checkpoint_load
from ferrum_jax.cli import main
from ferrum_jax.executor import executor as executor_module

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
    "required": ["a", "b"],
}
REGEX = r"[a-z]{2,5}-\d{1,3}"


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    return load_model(tiny_chat_model)


def test_device_masks_equal_library_masks(model, monkeypatch):
    """One sequence at a time, so each step's device mask has one row to compare: the
    prefill's and sampled rows' masks go into the jitted sampler, constrained greedy decode
    rows' into the executor's on-device argmax."""
    executor = JaxModelExecutor(model, max_batch_size=1, max_sequence_length=64)
    recorded: list[tuple[str, np.ndarray]] = []
    sample_rows, greedy_argmax = batch_module._sample_rows, executor_module._greedy_argmax

    def recording_sample_rows(logits, sampling, keys, steps, mask=None):
        recorded.append(("sampler", np.asarray(mask)[0]))
        return sample_rows(logits, sampling, keys, steps, mask)

    def recording_greedy_argmax(logits, mask, penalty, penalty_ids):
        recorded.append(("argmax", np.asarray(mask)[0]))
        return greedy_argmax(logits, mask, penalty, penalty_ids)

    monkeypatch.setattr(batch_module, "_sample_rows", recording_sample_rows)
    monkeypatch.setattr(executor_module, "_greedy_argmax", recording_greedy_argmax)
    tokenizer, vocab = model.tokenizer, model.config.vocab_size
    prompt = tokenizer.encode("Answer:")
    library_vocabulary = llguidance.LLTokenizer(
        tokenizer.backend.to_str(), eos_token=list(tokenizer.eos_token_ids)
    )
    bits = llg_numpy.allocate_token_bitmask(1, library_vocabulary.vocab_size)
    ids = np.arange(vocab)
    paths = set()
    for constraint in (Constraint.json_schema(SCHEMA), Constraint.regex(REGEX)):
        for temperature in (0.0, 1.0):
            recorded.clear()
            request = GenerationRequest(
                prompt, max_new_tokens=12, temperature=temperature, seed=3, constraint=constraint
            )
            (result,) = generate_batch(executor, [request])
            assert len(recorded) == len(result.token_ids)
            # llguidance's own matcher and bitmask, decoded here independently of grammar.py.
            replay = llguidance.LLMatcher(library_vocabulary, constraint.grammar)
            for step, (token, (path, mask)) in enumerate(
                zip(result.token_ids, recorded, strict=True)
            ):
                paths.add((temperature > 0, step > 0, path))
                llg_numpy.fill_next_token_bitmask(replay, bits, 0)
                expected = (bits[0][ids >> 5] >> (ids & 31)) & 1 == 1
                np.testing.assert_array_equal(mask, expected, err_msg=f"step {step}")
                assert mask[token], step
                assert replay.consume_token(token), step
    # Prefill on the sampler for both; decode on the device argmax when greedy.
    assert paths == {
        (False, False, "sampler"),
        (False, True, "argmax"),
        (True, False, "sampler"),
        (True, True, "sampler"),
    }


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Constraint.regex("a(b"), "invalid regex 'a(b': unclosed group"),
        (lambda: Constraint.regex(""), "regex must be a non-empty string"),
        (lambda: Constraint.json_schema("{bad"), "JSON schema is not valid JSON"),
        (lambda: Constraint.json_schema({"type": "objectx"}), "invalid JSON schema"),
        (lambda: Constraint.json_schema("[1]"), "a JSON schema must be a JSON object"),
        (lambda: Constraint.json_schema({"x-guidance": 3}), "x-guidance must be a JSON object"),
        (lambda: Constraint.json_schema({"type": {1, 2}}), "JSON schema is not JSON data"),
        (lambda: Constraint.regex("a\ud800"), "is not valid Unicode"),
    ],
)
def test_bad_grammars_are_one_clear_error(build, message):
    with pytest.raises(FerrumError, match=message.replace("(", r"\(")):
        build()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", "--quiet", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--regex", "a(b"], "--regex: invalid regex 'a(b': unclosed group"),
        (["--json-schema", "{root}/not-json.json"], "--json-schema: JSON schema is not valid JSON"),
        (["--json-schema", "{root}/bad-type.json"], "--json-schema: invalid JSON schema"),
        (["--json-schema", "{root}/missing.json"], "--json-schema {root}/missing.json"),
        (["--regex", "x", "--json-schema", "{root}/bad-type.json"], "not allowed with argument"),
    ],
)
def test_cli_bad_grammar_is_one_line_before_loading(capsys, monkeypatch, tmp_path, flags, words):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for reader in ("load_gguf", "load_hf", "load_orbax"):
        monkeypatch.setattr(checkpoint_load, reader, fail)
    (tmp_path / "not-json.json").write_text("{bad")
    (tmp_path / "bad-type.json").write_text('{"type": "objectx"}')
    flags = [f.replace("{root}", str(tmp_path)) for f in flags]
    for mode in (["--prompt", "x"], ["--input-file", str(tmp_path / "in.jsonl")]):
        if mode[0] == "--input-file":
            (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
            mode = [*mode, "--output", str(tmp_path / "out.jsonl")]
        code, out, err = run(capsys, *mode, *flags)
        assert (code, out) == (2, "")
        assert err.count("\n") == 1 and err.startswith("ferrum-jax: error: "), err
        assert words.replace("{root}", str(tmp_path)) in err, err


def test_cli_one_prompt_matches_its_regex(capsys, tiny_chat_model):
    argv = ["--model", str(tiny_chat_model), "--prompt", "the sea", "--max-new-tokens", "8"]
    for sampling in ([], ["--temperature", "1", "--seed", "5"]):
        code, out, _ = run(capsys, *argv, *sampling, "--regex", "(yes|no|maybe)", "--json")
        report = json.loads(out)
        assert code == 0 and report["text"] in ("yes", "no", "maybe"), report
        assert report["finish_reason"] == "stop"


def test_jsonl_lines_with_bad_grammars_are_skipped_by_number(capsys, tmp_path, tiny_chat_model):
    rows = [
        {"id": 1, "prompt": "the sea", "regex": "(yes|no)"},
        {"id": 2, "prompt": "the sea", "json_schema": {"type": "objectx"}},
        {"id": 3, "prompt": "the sea", "regex": "a(b"},
        {"id": 4, "prompt": "the sea", "json_schema": "not an object"},
        {"id": 5, "prompt": "the sea", "regex": "x", "json_schema": {}},
        {"id": 6, "prompt": "the sea", "json_schema": SCHEMA, "max_new_tokens": 6},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out.jsonl"
    argv = ["--model", str(tiny_chat_model), "--input-file", str(tmp_path / "in.jsonl")]
    code, out, err = run(capsys, *argv, "--output", str(output), "--max-new-tokens", "4")
    assert code == 1 and out == ""
    reported = [line for line in err.splitlines() if ": skipped: " in line]
    assert [line.split("in.jsonl:")[1].split(":")[0] for line in reported] == ["2", "3", "4", "5"]
    assert "invalid JSON schema" in reported[0]
    assert "invalid regex 'a(b'" in reported[1]
    assert "json_schema must be a JSON object, got str" in reported[2]
    assert "at most one of json_schema and regex" in reported[3]
    results = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert sorted(results) == [1, 6]
    assert results[1]["text"] in ("yes", "no"), results[1]


SMOL_SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"}},
        "required": ["colour", "bright"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 100},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["scores"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "rain": {"type": "boolean"},
            "level": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["city", "rain", "level"],
        "additionalProperties": False,
    },
]
# [0-9], not \d: llguidance's \d is Unicode's (as Python's `re` is), and SmolLM2 answers the
# date with U+1FBF8 SEGMENTED DIGIT EIGHT, 26 tokens for 10 characters.
SMOL_REGEXES = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no|maybe), [A-Z][a-z]{2,8}"]
SMOL_PROMPTS = [
    "Describe a person as JSON.",
    "Reply in JSON about a colour.",
    "Give some test scores as JSON.",
    "Report the weather as JSON.",
    "What is today's date?",
    "Will it rain tomorrow? Answer and name a city.",
]


@pytest.mark.slow
def test_embedded_model_outputs_always_validate():
    """20 answers of the embedded SmolLM2 against 4 JSON schemas and 2 regexes, greedy and
    sampled rows in one batch: every answer parses and matches."""
    model = load_model()
    tokenizer = model.tokenizer
    constraints = [Constraint.json_schema(s) for s in SMOL_SCHEMAS]
    constraints += [Constraint.regex(r) for r in SMOL_REGEXES]
    requests = []
    for i in range(20):
        kind = i % 6
        prompt = tokenizer.encode_chat([{"role": "user", "content": SMOL_PROMPTS[kind]}])
        requests.append(
            GenerationRequest(
                prompt,
                max_new_tokens=40,
                temperature=0.0 if i % 2 == 0 else 0.9,
                top_p=1.0 if i % 4 < 2 else 0.9,
                seed=i,
                constraint=constraints[kind],
                key=kind,
            )
        )
    executor = JaxModelExecutor(model, max_batch_size=20, max_sequence_length=128)
    results = list(generate_batch(executor, requests))
    assert len(results) == 20
    for result in results:
        assert result.finish_reason == "stop", result
        if result.key < len(SMOL_SCHEMAS):
            jsonschema.validate(json.loads(result.text), SMOL_SCHEMAS[result.key])
        else:
            assert re.fullmatch(SMOL_REGEXES[result.key - len(SMOL_SCHEMAS)], result.text), result
