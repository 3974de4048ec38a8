"""The `ferrum-jax` command on the embedded SmolLM2: exact vs transformers, streaming, errors."""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY_CONTEXT, require_reference

import ferrum_jax
from ferrum_jax import cli
from ferrum_jax.checkpoint import default_model_path, read_tokenizer
from ferrum_jax.cli import main

PROMPTS = [
    ("The three primary colors are", False),
    ("def fibonacci(n):", False),
    ("Give me one tip for learning to cook.", True),
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def hf_gguf_model():
    torch, transformers = require_reference()
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return torch, model, tokenizer


@pytest.mark.parametrize(("prompt", "chat"), PROMPTS)
def test_greedy_tokens_equal_transformers(capsys, hf_gguf_model, prompt, chat):
    torch, model, tokenizer = hf_gguf_model
    argv = ["generate", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "64"]
    code, out, _ = run_cli(capsys, *argv, *(["--chat"] if chat else []), "--json")
    assert code == 0
    report = json.loads(out)
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    assert report["prompt_token_ids"] == list(ids)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
    assert report["token_ids"] == ref[0, len(ids) :].tolist()
    expected_reason = "stop" if len(report["token_ids"]) < 64 else "length"
    assert report["finish_reason"] == expected_reason
    assert set(report["timings"]) >= {"prefill_s", "decode_s"}


def test_streamed_text_equals_json_text(capsys):
    argv = ["generate", "--prompt", "Write a haiku about rust 🦀:", "--max-new-tokens", "24"]
    code, streamed, _ = run_cli(capsys, *argv)
    assert code == 0
    code, out, _ = run_cli(capsys, *argv, "--json")
    assert streamed == json.loads(out)["text"] + "\n"


def test_sampling_is_seeded(capsys):
    argv = ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "12", "--json"]
    sample = [*argv, "--temperature", "0.9", "--top-p", "0.95", "--top-k", "50"]
    a = json.loads(run_cli(capsys, *sample, "--seed", "1")[1])
    b = json.loads(run_cli(capsys, *sample, "--seed", "1")[1])
    greedy = json.loads(run_cli(capsys, *argv)[1])
    assert a["token_ids"] == b["token_ids"]
    others = [json.loads(run_cli(capsys, *sample, "--seed", str(s))[1]) for s in (2, 3)]
    assert any(o["token_ids"] != a["token_ids"] for o in [*others, greedy])


def test_info_reports_the_model(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["layers"] == 30 and info["kv_heads"] == 3 and info["vocab_size"] == 49152
    assert info["parameter_bytes"] == info["parameters"] * 4
    assert info["devices"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-inputs")
    (root / "long.txt").write_text("hello " * 10_000)  # 10,001 tokens: past SmolLM2's 8,192
    (root / "bad.gguf").write_bytes(b"not a gguf file at all, just some bytes" * 4)
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("not a checkpoint")
    (root / "out").mkdir()
    (root / "out" / "ferrum_jax.json").write_text("{}")  # looks like a checkpoint
    (root / "in.jsonl").write_text('{"id": 1, "prompt": "the sea"}\n')
    os.link(root / "in.jsonl", root / "in-link.jsonl")
    return root


# argv ({root} is the `files` folder), stdin, exit code, words the one error line contains.
# FIFOs and /dev/zero are in test_cli_hostile.py: in a child process, under a time and memory
# limit, since a regression would hang or fill the memory of the test process.
BAD_INPUTS = [
    ("top-p", "generate --prompt x --top-p 2", None, 2, "--top-p must be in (0, 1] (got 2)"),
    (
        "temperature",
        "generate --prompt x --temperature -1",
        None,
        2,
        "--temperature must be >= 0 (got -1)",
    ),
    (
        "temperature-nan",
        "generate --prompt x --temperature nan",
        None,
        2,
        "--temperature must be a number",
    ),
    (
        "top-k",
        "generate --prompt x --top-k -3",
        None,
        2,
        "--top-k must be an integer in [0, 2147483647], got -3",
    ),
    (
        "top-k-past-int32",  # used to overflow at the first sampled step, after loading
        "generate --prompt x --top-k 1099511627776 --temperature 1",
        None,
        2,
        "--top-k must be an integer in [0, 2147483647], got 1099511627776",
    ),
    (
        "seed-negative",  # the JSONL lines refuse it: one rule
        "generate --prompt x --seed -1",
        None,
        2,
        "--seed must be an integer in [0, 9223372036854775807], got -1",
    ),
    ("prompt-not-utf8", ["generate", "--prompt", "caf\udce9"], None, 2, "--prompt is not UTF-8"),
    (
        "output-not-results",
        "generate --input-file {root}/in.jsonl --output {root}/notes/keep.txt",
        None,
        2,
        "line 1 is not a result line of this command",
    ),
    (
        "output-hard-link-to-input",
        "generate --input-file {root}/in.jsonl --output {root}/in-link.jsonl",
        None,
        2,
        "--output {root}/in-link.jsonl is the --input-file",
    ),
    (
        "output-no-folder",
        "generate --input-file {root}/in.jsonl --output {root}/missing/out.jsonl",
        None,
        2,
        "its folder {root}/missing does not exist",
    ),
    ("min-p", "generate --prompt x --min-p 1.5", None, 2, "--min-p must be in [0, 1] (got 1.5)"),
    ("seed", "generate --prompt x --seed abc", None, 2, "--seed must be an integer (got 'abc')"),
    (
        "max-new-negative",
        "generate --prompt x --max-new-tokens -1",
        None,
        2,
        "--max-new-tokens must be an integer >= 1 or 'max' (got '-1')",
    ),
    (
        "max-new-zero",
        "generate --prompt x --max-new-tokens 0",
        None,
        2,
        "--max-new-tokens must be an integer >= 1",
    ),
    (
        "max-new-huge",
        "generate --prompt x --max-new-tokens 100000",
        None,
        2,
        "--max-new-tokens is 100000: 100001 tokens exceed the model's context of 8192 tokens; "
        "use --max-new-tokens 8191 or less",
    ),
    (
        "prompt-too-long",
        "generate --prompt-file {root}/long.txt",
        None,
        2,
        "is 10001 tokens, more than fit the model's context of 8192 tokens",
    ),
    ("prompt-empty", ["generate", "--prompt", ""], None, 2, "--prompt is empty"),
    ("stdin-empty", "generate --prompt -", "", 2, "--prompt -: standard input is empty"),
    (
        "prompt-file-missing",
        "generate --prompt-file {root}/missing.txt",
        None,
        2,
        "--prompt-file {root}/missing.txt: no such file",
    ),
    ("prompt-file-dir", "generate --prompt-file {root}/notes", None, 2, "is a directory"),
    ("prompt-twice", "generate --prompt x --prompt-file {root}/long.txt", None, 2, "not both"),
    ("no-prompt", "generate", None, 2, "give a prompt: --prompt TEXT"),
    ("prompt-no-value", "generate --prompt", None, 2, "--prompt needs a value"),
    (
        "stop-empty",
        ["generate", "--prompt", "x", "--stop", ""],
        None,
        2,
        "--stop must not be empty",
    ),
    ("system-without-chat", "generate --prompt x --system hi", None, 2, "--system needs --chat"),
    (
        "dtype",
        "generate --prompt x --dtype float16",
        None,
        2,
        "--dtype must be one of float32, bfloat16 (got 'float16')",
    ),
    (
        "model-missing",
        "generate --prompt x --model /nonexistent/model",
        None,
        2,
        "--model /nonexistent/model: no such file or directory",
    ),
    (
        "model-kind",
        "generate --prompt x --model {root}/long.txt",
        None,
        2,
        "--model {root}/long.txt: expected an HF directory",
    ),
    ("model-corrupt", "generate --prompt x --model {root}/bad.gguf", None, 1, "not a GGUF file"),
    (
        "mesh-devices",
        "generate --prompt x --mesh data=2,model=8",
        None,
        2,
        "--mesh data=2,model=8 needs 16 devices, 1 available",
    ),
    (
        "mesh-syntax",
        "generate --prompt x --mesh model=two",
        None,
        2,
        "--mesh must be data=N,model=M",
    ),
    (
        "attention-unknown",
        "generate --prompt x --attention flash",
        None,
        2,
        "--attention: attention implementation must be one of auto, xla, tpu, gpu; got 'flash'",
    ),
    (
        "attention-platform",
        "generate --prompt x --attention tpu",
        None,
        2,
        "--attention tpu needs a TPU backend; JAX's backend here is cpu (use auto or xla)",
    ),
    ("bench-attention", "bench --attention gpu", None, 2, "--attention gpu needs a GPU backend"),
    ("typo-input", "generate --input x", None, 2, "unknown option --input; did you mean --prompt?"),
    (
        "typo-underscores",
        "generate --prompt x --max_new_tokens 5",
        None,
        2,
        "did you mean --max-new-tokens?",
    ),
    ("typo-positional", "generate hello", None, 2, "unexpected argument 'hello'"),
    ("command", "gen --prompt x", None, 2, "unknown command 'gen'; did you mean generate?"),
    ("chat-temperature", "chat --temperature -1", None, 2, "--temperature must be >= 0 (got -1)"),
    ("chat-system-empty", ["chat", "--system", ""], None, 2, "--system is empty"),
    (
        "info-model",
        "info --model /nonexistent.gguf",
        None,
        2,
        "--model /nonexistent.gguf: no such file",
    ),
    (
        "convert-src",
        "convert /nonexistent {root}/new",
        None,
        2,
        "SRC /nonexistent: no such file or directory",
    ),
    (
        "convert-dst-exists",
        "convert {root}/bad.gguf {root}/out",
        None,
        2,
        "DST {root}/out already exists; pass --force to replace it",
    ),
    (
        "convert-force-not-checkpoint",
        "convert {root}/bad.gguf {root}/notes --force",
        None,
        2,
        "not a ferrum-jax orbax checkpoint",
    ),
    (
        "convert-under-a-file",
        "convert {root}/bad.gguf {root}/long.txt/orbax",
        None,
        2,
        "long.txt is a file, not a directory",
    ),
    (
        "bench-batch",
        "bench --batch 0",
        None,
        2,
        "--batch must be batch sizes >= 1 like 1,8 (got '0')",
    ),
    ("bench-new-tokens", "bench --new-tokens 1", None, 2, "--new-tokens must be >= 2 (got 1)"),
    ("bench-json-dir", "bench --json {root}/notes", None, 2, "--json {root}/notes: is a directory"),
    (
        "bench-serve-json-dir",
        "bench --serve --json {root}/notes",
        None,
        2,
        "--json {root}/notes: is a directory",
    ),
    (
        "bench-plot-no-folder",
        "bench --plot {root}/missing/p.png",
        None,
        2,
        "--plot {root}/missing/p.png: its folder {root}/missing does not exist",
    ),
    (
        "revision-escapes-the-cache",  # loaded a model from outside the HF cache
        "generate --prompt x --model org/name --revision ../../evilref",
        None,
        2,
        "--model revision '../../evilref' is not a branch, tag or commit name",
    ),
    (
        "gguf-file-escapes-the-repo",
        "generate --prompt x --model org/name --gguf-file ../x.gguf",
        None,
        2,
        "--model gguf_file must be the name of a .gguf file inside the repo",
    ),
    (
        "bench-context",
        "bench --prompt-len 9000",
        None,
        2,
        "is 9000 tokens, more than fit the model's context of 8192",
    ),
]


@pytest.mark.parametrize(
    ("argv", "stdin", "code", "words"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS],
)
def test_bad_input_is_one_line_error_before_loading(
    capsys, monkeypatch, no_load, files, argv, stdin, code, words
):
    argv = argv.split() if isinstance(argv, str) else argv
    argv = [a.replace("{root}", str(files)) for a in argv]
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    got, out, err = run_cli(capsys, *argv)
    assert (got, out) == (code, "")
    assert err.count("\n") == 1 and err.startswith("ferrum-jax: error: "), err
    assert "Traceback" not in err and "invalid_parameter" not in err
    assert words.replace("{root}", str(files)) in err


def test_the_bad_input_table_is_broad():
    assert len(BAD_INPUTS) >= 20 and len({row[0] for row in BAD_INPUTS}) == len(BAD_INPUTS)


def test_console_script_exit_codes_and_debug_traceback(tmp_path):
    """End to end in real processes: 2 for argument errors, 1 at run time, one line each."""
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file" * 8)
    cases = [
        (["--prompt", "x", "--model", str(tmp_path / "missing")], 2, "no such file"),
        (["--prompt", "x", "--max-new-tokens", "100000"], 2, "context of 8192 tokens"),
        (["--prompt", "x", "--model", str(tmp_path / "bad.gguf")], 1, "not a GGUF file"),
    ]
    for argv, code, words in cases:
        cmd = [sys.executable, "-m", "ferrum_jax.cli", "generate", *argv]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == code and done.stdout == "", done.stderr
        assert done.stderr.startswith("ferrum-jax: error: ") and done.stderr.count("\n") == 1
        assert words in done.stderr and "Traceback" not in done.stderr
    loud = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_convert_then_generate_from_orbax(capsys, tmp_path):
    dst = tmp_path / "smollm2-orbax"
    code, out, _ = run_cli(capsys, "convert", str(default_model_path()), str(dst))
    assert code == 0 and "orbax" in out
    argv = ["generate", "--prompt", "The three primary colors are", "--max-new-tokens", "8"]
    from_gguf = json.loads(run_cli(capsys, *argv, "--json")[1])
    from_orbax = json.loads(run_cli(capsys, *argv, "--model", str(dst), "--json")[1])
    assert from_orbax["token_ids"] == from_gguf["token_ids"]
    info = json.loads(run_cli(capsys, "info", "--model", str(dst), "--json")[1])
    assert info["format"] == "orbax"
    np.testing.assert_equal(info["parameters"], 134515008)


def test_generate_on_a_mesh_matches_one_device(capsys):
    """`--mesh model=2` on 2 virtual devices: SmolLM2's 9/3 heads padded/replicated, loaded
    straight into shards; greedy tokens equal the single-device run."""
    argv = ["generate", "--prompt", "The three primary colors are", "--max-new-tokens", "16"]
    single = json.loads(run_cli(capsys, *argv, "--json")[1])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run(
        [sys.executable, "-m", "ferrum_jax.cli", *argv, "--json", "--mesh", "data=1,model=2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["token_ids"] == single["token_ids"]


def tiny_json(capsys, model, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "generate", "--model", str(model), "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def test_max_new_tokens_max_fills_the_context(capsys, tiny_chat_model):
    report = tiny_json(capsys, tiny_chat_model, "--prompt", "hello", "--max-new-tokens", "max")
    assert report["finish_reason"] == "length"
    assert len(report["prompt_token_ids"]) + len(report["token_ids"]) == TINY_CONTEXT
    too_many = ["--prompt", "hello", "--max-new-tokens", str(TINY_CONTEXT)]
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_chat_model), *too_many)
    assert code == 2 and f"use --max-new-tokens {TINY_CONTEXT - 1} or less" in err


def test_attention_flag_picks_the_implementation(capsys, monkeypatch, tiny_chat_model):
    """`--attention xla` reaches the cache the stream runs on (here, auto is xla too)."""
    from ferrum_jax import streaming

    seen = []
    real = streaming.init_cache

    def spy(*args, **kwargs):
        cache = real(*args, **kwargs)
        seen.append(cache.attention_impl)
        return cache

    monkeypatch.setattr(streaming, "init_cache", spy)
    argv = ["--prompt", "hello", "--max-new-tokens", "6"]
    picked = tiny_json(capsys, tiny_chat_model, *argv, "--attention", "xla")
    default = tiny_json(capsys, tiny_chat_model, *argv)
    assert (default["token_ids"], default["text"]) == (picked["token_ids"], picked["text"])
    assert seen == ["xla", "xla"]


def test_stop_strings_cut_the_text_and_end_the_tokens(capsys, tiny_chat_model):
    """`text` ends before the stop string; `token_ids` end with the token that completed it."""
    argv = ["--prompt", "hello", "--max-new-tokens", "40"]
    free = tiny_json(capsys, tiny_chat_model, *argv)
    stop = free["text"][20:24]
    cut = tiny_json(capsys, tiny_chat_model, *argv, "--stop", stop, "--stop", "never seen")
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == free["text"][: free["text"].index(stop)]
    assert cut["token_ids"] == free["token_ids"][: len(cut["token_ids"])]
    tokenizer = read_tokenizer()
    assert stop in tokenizer.decode(cut["token_ids"])
    assert stop not in tokenizer.decode(cut["token_ids"][:-1])


def test_prompt_from_flag_file_and_stdin_agree(capsys, monkeypatch, tmp_path, tiny_chat_model):
    prompt = "Tell me about the sea."
    (tmp_path / "prompt.txt").write_text(prompt + "\n")  # the file's final newline is dropped
    argv = ["--max-new-tokens", "2", "--chat", "--system", "Be brief."]
    by_flag = tiny_json(capsys, tiny_chat_model, *argv, "--prompt", prompt)
    by_file = tiny_json(
        capsys, tiny_chat_model, *argv, "--prompt-file", str(tmp_path / "prompt.txt")
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))
    by_stdin = tiny_json(capsys, tiny_chat_model, *argv, "--prompt", "-")
    assert (
        by_flag["prompt_token_ids"] == by_file["prompt_token_ids"] == by_stdin["prompt_token_ids"]
    )
    text = read_tokenizer().decode(by_flag["prompt_token_ids"])
    assert "Be brief." in text and prompt in text


def test_progress_lines_quiet_and_the_stopped_notice(capsys, tiny_chat_model):
    argv = ["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "3"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.endswith("\n")
    lines = err.splitlines()
    assert lines[0].startswith("ferrum-jax: loading orbax") or "loading" in lines[0]
    assert any(line.startswith("ferrum-jax: loaded in") for line in lines)
    assert lines[-1] == "[stopped: max-new-tokens 3 reached]"
    code, quiet_out, quiet_err = run_cli(capsys, *argv, "--quiet")
    assert code == 0 and quiet_out == out
    assert quiet_err == "[stopped: max-new-tokens 3 reached]\n"
    _, _, json_err = run_cli(capsys, *argv, "--quiet", "--json")
    assert json_err == ""  # --json carries finish_reason instead


def test_generate_reports_compile_time_apart_from_decoding(capsys, tiny_chat_model):
    """The decode tokens/s leaves out compiling: the issue's cold run said "first after
    6.78 s, then 1.2 tokens/s" with the decode step's compile counted as decoding."""
    import jax

    jax.clear_caches()  # this process compiles the tiny model's programs afresh
    argv = ["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "5"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0
    speed = next(line for line in err.splitlines() if "first token after" in line)
    assert re.fullmatch(
        r"ferrum-jax: 5 tokens: first token after \d+\.\d\d s \(compile \d+\.\d\d s\), "
        r"then \d+\.\d tokens/s( \(decode compile \d+\.\d\d s excluded\))?",
        speed,
    ), speed
    jax.clear_caches()
    code, out, _ = run_cli(capsys, *argv, "--json")
    timings = json.loads(out)["timings"]
    assert 0 < timings["compile_s"] <= timings["prefill_s"]
    assert 0 < timings["decode_compile_s"] < timings["decode_s"]  # the first decode step compiles
    running = timings["decode_s"] - timings["decode_compile_s"]
    assert timings["decode_tok_s"] == pytest.approx(4 / running)


def test_the_wait_for_a_first_token_prints_a_line_off_a_terminal(
    capsys, monkeypatch, tiny_chat_model
):
    from ferrum_jax import progress, streaming

    stream = streaming.stream_tokens

    def slow_first_token(*args, **kwargs):
        time.sleep(0.3)  # stands for compiling the prefill: 5-10 s on a 2-core CPU
        yield from stream(*args, **kwargs)

    monkeypatch.setattr(streaming, "stream_tokens", slow_first_token)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.1)
    argv = ["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "2"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0
    assert re.search(r"^ferrum-jax: prefill: \d+ s$", err, re.MULTILINE), err
    assert "prefill:" not in run_cli(capsys, *argv, "--quiet")[2]


def test_stop_token_ends_generation_with_real_timings(capsys):
    """SmolLM2 answers this chat prompt and emits its end-of-turn token."""
    argv = ["generate", "--chat", "--prompt", "What is the capital of France?", "--json"]
    code, out, _ = run_cli(capsys, *argv)
    report = json.loads(out)
    assert code == 0 and report["finish_reason"] == "stop" and "Paris" in report["text"]
    # token_ids include the stop token; the text does not show it.
    assert report["token_ids"][-1] in read_tokenizer().eos_token_ids
    assert "<|im_end|>" not in report["text"]
    timings = report["timings"]
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0 and timings["decode_tok_s"] > 0


def test_convert_force_replaces_a_checkpoint(capsys, tmp_path, tiny_chat_model):
    dst = str(tmp_path / "copy")
    assert run_cli(capsys, "convert", str(tiny_chat_model), dst)[0] == 0
    code, _, err = run_cli(capsys, "convert", str(tiny_chat_model), dst)
    assert code == 2 and "pass --force" in err
    assert run_cli(capsys, "convert", str(tiny_chat_model), dst, "--force")[0] == 0
    assert json.loads(run_cli(capsys, "info", "--model", dst, "--json")[1])["format"] == "orbax"


# ---- help, version, usage ---------------------------------------------------------------------


def test_bare_command_prints_usage_and_the_commands(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: ferrum-jax")
    for command in ("generate", "chat", "convert", "info", "bench"):
        assert f"    {command} " in err


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"ferrum-jax {ferrum_jax.__version__}\n"


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "info", "bench"])
def test_every_option_has_help_and_its_default(command):
    _, subparsers = cli._parser()
    parser = subparsers[command]
    text = parser.format_help()
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        shown = action.default not in (None, False, []) and action.default is not argparse.SUPPRESS
        if shown and action.option_strings:
            assert f"(default: {action.default})" in " ".join(text.split()), action.dest


def test_readme_command_block_matches_help():
    """Each command's usage in the README is the one `--help` prints."""
    readme = " ".join((pathlib.Path(__file__).parents[1] / "README.md").read_text().split())
    _, subparsers = cli._parser()
    for command, parser in subparsers.items():
        usage = " ".join(parser.format_usage().split())
        assert usage in readme, f"README lacks the current usage of {command}: {usage}"


# ---------------------------------------------------------------------------------------------
# --chat-template: a user's template for any model.


def test_chat_template_flag_replaces_the_models(capsys, tiny_chat_model, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("[{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}]")
    argv = ["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--chat"]
    code = main([*argv, "--chat-template", str(template), "--max-new-tokens", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    want = read_tokenizer(tiny_chat_model).encode("[user: hi]", add_special_tokens=False)
    assert json.loads(out)["prompt_token_ids"] == want
    template.write_text("{% for m in messages %}")  # does not compile: one line, no traceback
    code = main([*argv, "--chat-template", str(template)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "chat template" in err, err
    code = main([*argv, "--chat-template", str(tmp_path / "missing.jinja")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--chat-template" in err and "no such file" in err, err
