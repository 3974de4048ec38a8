"""`ferrum-jax generate --input-file --output`: offline batch generation from JSONL, on the
tiny chat model (SmolLM2's tokenizer, random weights): each line's result equals a one-prompt
stream, bad lines are reported by line number, a killed run resumes without duplicates."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_CONTEXT

from ferrum_jax import (
    JaxModelExecutor,
    LineDefaults,
    SamplingParams,
    generate_jsonl,
    load_model,
    stream_tokens,
)
from ferrum_jax.cli import main
from ferrum_jax.errors import FerrumError
from ferrum_jax.text.answer import AnswerText

WORDS = [
    "the",
    "sea",
    "is",
    "calm",
    "tonight",
    "and",
    "the",
    "tide",
    "is",
    "full",
    "the",
    "moon",
    "lies",
    "fair",
    "upon",
    "the",
    "straits",
]


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    return load_model(tiny_chat_model)


def run(capsys, tiny_chat_model, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", "--model", str(tiny_chat_model), "--quiet", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def lines(n: int) -> list[dict]:
    """Prompts of 1 to ~60 tokens, some as chats, some with their own settings."""
    out = []
    for i in range(n):
        text = " ".join(WORDS[: 1 + (i * 7) % len(WORDS)] * (1 + i % 3))
        line: dict = {"id": f"q{i}"}
        if i % 4 == 1:
            line["messages"] = [{"role": "user", "content": text}]
        else:
            line["prompt"] = text
        if i % 5 == 2:
            line["max_new_tokens"] = 3
        if i % 6 == 3:
            line.update(temperature=0.8, top_p=0.9, seed=40 + i)
        out.append(line)
    return out


def write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def expected(model, line: dict, max_new: int, stops=()) -> dict:
    """One `stream_tokens` run (what `ferrum-jax generate` streams) for one line."""
    tokenizer = model.tokenizer
    if "messages" in line:
        ids = tokenizer.encode_chat(line["messages"])
    else:
        ids = tokenizer.encode(line["prompt"])
    sampling = SamplingParams.make(
        1, temperature=line.get("temperature", 0.0), top_p=line.get("top_p", 1.0)
    )
    answer = AnswerText(tokenizer, line.get("stop", stops))
    tokens, finish = [], "length"
    for t in stream_tokens(
        model,
        ids,
        max_new_tokens=line.get("max_new_tokens", max_new),
        sampling=sampling,
        seed=line.get("seed", 0),
        stop_tokens=tokenizer.eos_token_ids,
    ):
        tokens.append(t.token_id)
        if t.stop:
            finish = "stop"
            break
        answer.push(t.token_id)
        if answer.matched is not None:
            finish = "stop"
            break
    answer.finish()
    return {"id": line["id"], "text": answer.text, "token_ids": tokens, "finish_reason": finish}


def read(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_line_equals_a_single_run(capsys, tmp_path, tiny_chat_model, model):
    rows = lines(12)
    rows[0]["stop"] = ["sea"]
    write(tmp_path / "in.jsonl", rows)
    code, out, err = run(
        capsys,
        tiny_chat_model,
        "--input-file",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "out.jsonl"),
        "--max-new-tokens",
        "10",
        "--batch-size",
        "4",
    )
    assert (code, out, err) == (0, "", "")
    got = {r["id"]: r for r in read(tmp_path / "out.jsonl")}
    assert sorted(got) == sorted(r["id"] for r in rows)
    for row in rows:
        assert got[row["id"]] == expected(model, row, 10), row


def test_api_reports_bad_lines_and_resumes(tmp_path, model, caplog):
    """`fj.generate_jsonl`: the command's behaviour from Python, on an executor of one's own."""
    rows = [
        {"id": "a", "prompt": "the sea is calm"},
        "not json",
        {"id": "b", "messages": [{"role": "user", "content": "the tide"}], "max_new_tokens": 3},
        {"id": "c", "prompt": "the moon lies fair", "stop": "e"},
    ]
    write(tmp_path / "in.jsonl", rows)
    executor = JaxModelExecutor(model, max_batch_size=2, max_sequence_length=64)
    argv = (executor, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    with caplog.at_level("WARNING", logger="ferrum_jax"):
        report = generate_jsonl(*argv, defaults=LineDefaults(max_new_tokens=6))
    assert (report.generated, report.skipped) == (3, 0)
    assert [(e.line, e.message.split(" (")[0]) for e in report.errors] == [(2, "not valid JSON")]
    assert "in.jsonl:2: skipped: not valid JSON" in caplog.text
    got = {r["id"]: r for r in read(tmp_path / "out.jsonl")}
    assert report.tokens == sum(len(r["token_ids"]) for r in got.values())
    for row in (rows[0], rows[2], rows[3]):
        assert got[row["id"]] == expected(model, row, 6), row
    before = (tmp_path / "out.jsonl").read_text()
    again = generate_jsonl(*argv, defaults=LineDefaults(max_new_tokens=6))
    assert (again.generated, again.tokens, again.skipped) == (0, 0, 3)
    assert (tmp_path / "out.jsonl").read_text() == before


def test_bad_lines_are_reported_by_number_and_skipped(capsys, tmp_path, tiny_chat_model):
    long_prompt = " ".join(["word"] * (TINY_CONTEXT + 5))
    rows = [
        {"id": 1, "prompt": "the sea"},
        '{"id": 2, "prompt": "unterminated',
        {"id": 3, "prompt": long_prompt},
        {"id": 4, "prompt": "fine", "max_tokens": 3},
        {"id": 1, "prompt": "again"},
        {"id": 6, "prompt": "tide", "top_p": 0},
        {"id": 7, "messages": "not a list"},
        {"id": 8, "prompt": "the moon", "max_new_tokens": 4},
        {"id": 9, "prompt": "\ud800"},  # a lone surrogate, spelled as a JSON escape
        {"id": 10, "prompt": "the sea", "top_k": 2**40, "temperature": 1.0},  # past int32
    ]
    write(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    argv = ["--input-file", str(tmp_path / "in.jsonl"), "--output", str(output)]
    code, out, err = run(capsys, tiny_chat_model, *argv, "--max-new-tokens", "4")
    assert code == 1 and out == ""
    reported = [line for line in err.splitlines() if ": skipped: " in line]
    where = f"{tmp_path / 'in.jsonl'}:"
    assert [line.split(where)[1].split(":")[0] for line in reported] == [
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "9",
        "10",
    ]
    assert "not valid JSON" in reported[0]
    assert "more than fit the model's context of 96 tokens" in reported[1]
    assert "unknown field(s) max_tokens" in reported[2]
    assert "duplicate id 1" in reported[3]
    assert "top_p must be in (0, 1]" in reported[4]
    assert "messages must be a non-empty list" in reported[5]
    assert "'\\ud800' is not valid Unicode" in reported[6]
    assert "top_k must be an integer in [0, 2147483647]" in reported[7]
    assert err.splitlines()[-1].endswith(
        "8 lines of " + str(tmp_path / "in.jsonl") + " skipped (see above)"
    )
    assert sorted(r["id"] for r in read(output)) == [1, 8]  # the good lines still ran


def test_arguments_are_checked_before_loading(capsys, tmp_path, tiny_chat_model):
    write(tmp_path / "in.jsonl", [{"prompt": "x"}])
    (tmp_path / "junk.jsonl").write_text("this is not output of ferrum-jax\n")
    cases = [
        (["--input-file", str(tmp_path / "in.jsonl")], "--input-file and --output go together"),
        (["--input-file", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "no such file"),
        (
            ["--input-file", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"), "--chat"],
            "--chat does not go with --input-file",
        ),
        (
            ["--input-file", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "junk.jsonl")],
            "line 1 is not a result line",
        ),
    ]
    for argv, words in cases:
        code, out, err = run(capsys, tiny_chat_model, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert words in err and err.startswith("ferrum-jax: error: ")


def test_a_killed_run_resumes_without_duplicates(capsys, tmp_path, tiny_chat_model, model):
    rows = [{"id": i, "prompt": " ".join(WORDS[: 1 + i % 15])} for i in range(40)]
    write(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    argv = [
        "generate",
        "--model",
        str(tiny_chat_model),
        "--input-file",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(output),
        "--max-new-tokens",
        "40",
        "--batch-size",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-m", "ferrum_jax.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Kill it once a few lines are out: a polling wait, bounded (never a timing assert).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            if output.exists() and output.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        assert child.poll() is None, child.stderr.read().decode()
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    written = output.read_text().count("\n")
    assert 3 <= written < 40
    with output.open("a") as f:
        f.write('{"id": 39, "text": "cut sho')  # a line the kill interrupted
    code, _, err = run(capsys, tiny_chat_model, *argv[3:])
    assert code == 0, err
    results = read(output)
    ids = [r["id"] for r in results]
    assert sorted(ids) == list(range(40)) and len(set(ids)) == 40
    for result in results[written - 1 :: 9]:  # lines from both runs equal single runs
        assert result == expected(model, rows[result["id"]], 40)


# ---------------------------------------------------------------------------------------------
# Hostile files and lines (issue 25): nothing lost, one bad line never kills the batch.

HOSTILE_LINES = [
    # JSON escapes spell lone surrogates, which no tokenizer encodes.
    ('{"id": "s1", "prompt": "\\ud800"}', "'\\ud800' is not valid Unicode"),
    ('{"id": "s2", "messages": [{"role": "user", "content": "a\\udfff"}]}', "not valid Unicode"),
    ('{"id": "s3\\udc00", "prompt": "the sea"}', "not valid Unicode"),
    ('{"id": "k1", "prompt": "the sea", "top_k": 1e23}', "top_k must be an integer in"),
    # Passed every check, then overflowed int32 at the first sampled step.
    (
        '{"id": "k2", "prompt": "the sea", "top_k": 1099511627776, "temperature": 1.0}',
        "top_k must be an integer in [0, 2147483647], got 1099511627776",
    ),
    ('{"id": "k3", "prompt": "the sea", "top_k": true}', "top_k must be an integer in"),
    ('{"id": "n1", "prompt": "the sea", "seed": -1}', "seed must be an integer in"),
    ('{"id": "k4", "prompt": "the sea", "top_k": [1, 2]}', "top_k must be an integer in"),
    ('{"id": "n2", "prompt": "the sea", "seed": [7]}', "seed must be an integer in"),
]


def test_hostile_lines_are_skipped_and_the_rest_runs_and_resumes(tmp_path, model):
    good = [{"id": "a", "prompt": "the sea is calm"}, {"id": "b", "prompt": "the tide"}]
    rows = [good[0], *(line for line, _ in HOSTILE_LINES), good[1]]
    write(tmp_path / "in.jsonl", rows)
    executor = JaxModelExecutor(model, max_batch_size=2, max_sequence_length=64)
    argv = (executor, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    report = generate_jsonl(*argv, defaults=LineDefaults(max_new_tokens=2))
    assert [e.line for e in report.errors] == list(range(2, 2 + len(HOSTILE_LINES)))
    for error, (_, words) in zip(report.errors, HOSTILE_LINES, strict=True):
        assert words in error.message, error
    assert report.generated == 2
    assert sorted(r["id"] for r in read(tmp_path / "out.jsonl")) == ["a", "b"]
    # A kill cut the last result short; a resume drops it and appends a new line's result.
    with (tmp_path / "out.jsonl").open("a") as f:
        f.write('{"id": "c", "text": "cut sho')
    write(tmp_path / "in.jsonl", [*rows, {"id": "c", "prompt": "the moon"}])
    again = generate_jsonl(*argv, defaults=LineDefaults(max_new_tokens=2))
    assert (again.generated, again.skipped, len(again.errors)) == (1, 2, len(HOSTILE_LINES))
    assert sorted(r["id"] for r in read(tmp_path / "out.jsonl")) == ["a", "b", "c"]


NOT_RESULTS = pytest.mark.parametrize(
    ("output", "words"),
    [
        ("notes.txt", "line 1 is not a result line"),  # its last line has no newline
        ("config.json", "line 1 is not a result line"),  # one line, no newline
        ("link.jsonl", "is the --input-file"),  # a hard link to the input
        ("dir", "is a directory"),
    ],
)


def not_results(tmp_path, output: str) -> tuple[pathlib.Path, dict[str, bytes]]:
    """The input file and `output` next to it; returns the input and every file's bytes."""
    input_file = tmp_path / "in.jsonl"
    input_file.write_bytes(b'{"id": 1, "prompt": "the sea"}\n{"id": 2, "prompt": "tide"}')
    if output == "link.jsonl":
        os.link(input_file, tmp_path / output)
    elif output == "dir":
        (tmp_path / output).mkdir()
    else:
        notes = {"notes.txt": b"shopping\nmilk, no newline", "config.json": b'{"vocab_size": 32}'}
        (tmp_path / output).write_bytes(notes[output])
    return input_file, files(tmp_path)


def files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@NOT_RESULTS
def test_an_output_that_is_not_results_is_refused_untouched(
    capsys, tmp_path, tiny_chat_model, no_load, output, words
):
    """Resume used to cut the unterminated last line before checking what the file was."""
    input_file, before = not_results(tmp_path, output)
    argv = ["--input-file", str(input_file), "--output", str(tmp_path / output)]
    code, out, err = run(capsys, tiny_chat_model, *argv)
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith("ferrum-jax: error: --output ") and words in err, err
    assert files(tmp_path) == before


@NOT_RESULTS
def test_the_api_refuses_an_output_that_is_not_results_untouched(tmp_path, model, output, words):
    input_file, before = not_results(tmp_path, output)
    executor = JaxModelExecutor(model, max_batch_size=1, max_sequence_length=64)
    with pytest.raises(FerrumError, match=words):
        generate_jsonl(executor, input_file, tmp_path / output)
    assert files(tmp_path) == before
