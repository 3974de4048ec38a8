"""Files a user (or an attacker) points the CLI at: FIFOs, devices, directories, hard links,
files that are not results. Each is one `FerrumError` before anything is read without bound,
written, or loaded, and a refused file is left byte for byte as it was."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

from ferrum_jax import jsonl_batch
from ferrum_jax.checkpoint import text_files
from ferrum_jax.checkpoint.text_files import check_output, read_text_file, same_file
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.jsonl_batch import Resume, read_done

RESULT = {"id": 1, "text": "the sea", "token_ids": [5, 6], "finish_reason": "length"}


def result_line(**fields) -> bytes:
    return (json.dumps({**RESULT, **fields}) + "\n").encode()


@pytest.fixture
def fifo(tmp_path) -> pathlib.Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def refused(call, *args, words: str) -> None:
    with pytest.raises(FerrumError) as info:
        call(*args)
    assert info.value.kind is ErrorKind.INVALID_PARAMETER
    assert words in info.value.message, info.value.message


# ---------------------------------------------------------------------------------------------
# Reading: regular files only, within TEXT_FILE_LIMIT.


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("fifo", "not a regular file"),  # opening one for reading would wait for a writer
        ("/dev/zero", "not a regular file"),  # never ends
        ("dir", "is a directory"),
        ("missing", "no such file"),
    ],
)
def test_text_files_are_regular_files_only(tmp_path, fifo, name, words):
    (tmp_path / "dir").mkdir()
    path = name if name.startswith("/") else tmp_path / name
    refused(read_text_file, path, "--prompt-file", words=f"--prompt-file {path}: {words}")


def test_text_files_are_read_within_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(text_files, "TEXT_FILE_LIMIT", 8)
    (tmp_path / "eight").write_text("12345678")
    (tmp_path / "nine").write_text("123456789")
    assert read_text_file(tmp_path / "eight", "--input-file") == "12345678"
    refused(read_text_file, tmp_path / "nine", "--input-file", words="larger than the")
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    refused(read_text_file, tmp_path / "latin1", "--input-file", words="not UTF-8 text")


def test_the_limit_is_documented():
    from ferrum_jax.cli import _parser

    _, commands = _parser()
    help_text = " ".join(commands["generate"].format_help().split())
    assert f"at most {text_files.TEXT_FILE_LIMIT // 2**20} MiB" in help_text
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert f"{text_files.TEXT_FILE_LIMIT // 2**20} MiB" in " ".join(readme.split())


# ---------------------------------------------------------------------------------------------
# Output paths: checked before any work.


def test_output_paths_are_checked_before_any_work(tmp_path, fifo):
    assert check_output(tmp_path / "new.json", "--json") is False
    (tmp_path / "old.json").write_text("{}")
    assert check_output(tmp_path / "old.json", "--json") is True
    refused(check_output, tmp_path, "--json", words="is a directory")
    refused(check_output, tmp_path / "no" / "r.json", "--json", words="does not exist")
    refused(check_output, fifo, "--output", words="not a regular file")
    refused(check_output, "/dev/zero", "--output", words="not a regular file")


def test_same_file_sees_hard_links_and_symlinks(tmp_path):
    (tmp_path / "in.jsonl").write_text("{}\n")
    os.link(tmp_path / "in.jsonl", tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(tmp_path / "in.jsonl")
    (tmp_path / "other.jsonl").write_text("{}\n")
    assert same_file(tmp_path / "hard.jsonl", tmp_path / "in.jsonl")
    assert same_file(tmp_path / "soft.jsonl", tmp_path / "in.jsonl")
    assert not same_file(tmp_path / "other.jsonl", tmp_path / "in.jsonl")
    assert not same_file(tmp_path / "missing.jsonl", tmp_path / "in.jsonl")


# ---------------------------------------------------------------------------------------------
# Resuming: every line of an existing output is checked before anything is written.


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b"notes\nlast line, no newline", 1),
        (b'{"a": 1}', 1),  # a one-line config.json without a newline
        (b'{"id": 1, "prompt": "x"}', 1),  # an input file, not results
        (result_line() + b"a note\n" + result_line(id=2), 2),
        (result_line() + b"\n", 2),
        (result_line(finish_reason="eos"), 1),
        (result_line(token_ids=[1, True]), 1),
        (result_line()[:-1] + b" and more", 1),
        (result_line() + b'{"a": 1}', 2),  # valid JSON, not a result: no kill left it
        (result_line() + b"last words", 2),
    ],
)
def test_a_file_that_is_not_results_is_refused_and_left_as_it_was(tmp_path, content, line):
    output, input_file = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    output.write_bytes(content)
    input_file.write_text('{"prompt": "x"}\n')
    refused(read_done, output, input_file, words=f"line {line} is not a result line")
    assert output.read_bytes() == content


def test_a_hard_link_to_the_input_is_refused(tmp_path):
    input_file = tmp_path / "in.jsonl"
    input_file.write_bytes(b'{"id": 1, "prompt": "the sea"}')  # no newline: nothing to cut
    os.link(input_file, tmp_path / "out.jsonl")
    refused(read_done, tmp_path / "out.jsonl", input_file, words="is the --input-file")
    assert input_file.read_bytes() == b'{"id": 1, "prompt": "the sea"}'


def test_only_a_kill_cut_last_line_of_results_is_dropped(tmp_path):
    output, input_file = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    input_file.write_text('{"prompt": "x"}\n')
    whole = result_line() + result_line(id="b")
    tails = [
        b'{"id": 3, "text": "cut sho',
        b'{"id": 3, "text": "the", "token_ids": [5, 6',
        b'{"id": 3, "text": "a\\u00',  # inside an escape
        b'{"id": 3, "text": "\xe2',  # inside a UTF-8 character
        result_line(id=3)[:-1],  # all but the newline
    ]
    for tail in tails:
        output.write_bytes(whole + tail)
        resume = read_done(output, input_file)
        assert resume == Resume(frozenset({"1", '"b"'}), len(whole), len(whole + tail)), tail
        assert output.read_bytes() == whole + tail  # cut by the run, not by the check
    output.write_bytes(whole)
    assert read_done(output, input_file) == Resume(frozenset({"1", '"b"'}))
    output.write_bytes(b"")
    assert read_done(output, input_file) == Resume(frozenset())
    assert read_done(tmp_path / "new.jsonl", input_file) == Resume(frozenset())


# Run in a child under a time and memory limit: before the fix each of these hung on the
# FIFO or read /dev/zero until the memory ran out.
ENDLESS_INPUTS = [
    ("generate --prompt-file /dev/zero", "--prompt-file /dev/zero: not a regular file"),
    ("generate --prompt-file {fifo}", "--prompt-file {fifo}: not a regular file"),
    ("generate --prompt x --chat-template /dev/zero", "--chat-template /dev/zero: not a regular"),
    ("chat --chat-template {fifo}", "--chat-template {fifo}: not a regular file"),
    ("generate --input-file /dev/zero --output {new}", "--input-file /dev/zero: not a regular"),
    ("generate --input-file {fifo} --output {new}", "--input-file {fifo}: not a regular file"),
    ("generate --input-file {input} --output {fifo}", "--output {fifo}: not a regular file"),
    # `--output /dev/stdout | cat`: the child's stdout is a pipe, as under `| cat`.
    ("generate --input-file {input} --output /dev/stdout", "--output /dev/stdout: not a regular"),
    ("bench --json /dev/stdout", "--json /dev/stdout: not a regular file"),
]

CHILD = """
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from ferrum_jax.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append((main(argv), err.getvalue()))
sys.stdout.write(json.dumps(results))
"""


def test_endless_files_are_refused_without_reading_them(tmp_path, fifo):
    """FIFOs, /dev/zero and /dev/stdout behind a pipe: one error line each, no hang."""
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    names = {"fifo": fifo, "input": tmp_path / "in.jsonl", "new": tmp_path / "new.jsonl"}
    cases = [
        ([a.format(**names) for a in argv.split()], words.format(**names))
        for argv, words in ENDLESS_INPUTS
    ]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([argv for argv, _ in cases])],
        capture_output=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    for (code, err), (argv, words) in zip(json.loads(done.stdout), cases, strict=True):
        assert code == 2 and err.count("\n") == 1, (argv, err)
        assert err.startswith("ferrum-jax: error: ") and words in err, (argv, err)


def test_standard_input_is_read_within_the_limit(capsys, monkeypatch):
    from ferrum_jax import cli

    monkeypatch.setattr(cli, "TEXT_FILE_LIMIT", 4)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello"))
    assert cli.main(["generate", "--prompt", "-"]) == 2
    assert capsys.readouterr().err == (
        "ferrum-jax: error: --prompt -: standard input is longer than 4 characters\n"
    )


def test_a_run_cuts_nothing_from_an_output_that_changed_since_its_check(tmp_path):
    """Another writer appended between the check and the run: cutting at the checked offset
    would delete its lines."""
    output, input_file = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    input_file.write_text('{"prompt": "x"}\n')
    output.write_bytes(result_line() + b'{"id": 2, "text": "cu')
    resume = read_done(output, input_file)
    with output.open("ab") as f:
        f.write(b"t short\n" + result_line(id=3))
    changed = output.read_bytes()
    with pytest.raises(FerrumError, match="changed since it was checked"):
        jsonl_batch.run(None, [], output, tokenizer=None, resume=resume)
    assert output.read_bytes() == changed
