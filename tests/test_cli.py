"""The `ferrum-jax` command on the embedded SmolLM2: exact vs transformers, streaming, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import require_reference

from ferrum_jax.checkpoint import default_model_path
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


@pytest.mark.parametrize(
    ("argv", "kind", "words"),
    [
        (["generate", "--prompt", "x", "--top-p", "2"], "invalid_parameter", "top_p"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "invalid_parameter", "temperature"),
        (
            ["generate", "--prompt", "x", "--model", "/nonexistent/model"],
            "not_found",
            "/nonexistent",
        ),
        (["generate", "--prompt", "x", "--dtype", "float16"], "invalid_parameter", "--dtype"),
        (["generate"], "invalid_parameter", "--prompt"),
        (["info", "--model", "/nonexistent.gguf"], "not_found", "/nonexistent.gguf"),
        (["convert", "/nonexistent", "/tmp/out"], "not_found", "/nonexistent"),
        (["convert", "{gguf}", "{file}/orbax"], "io", "is a file, not a directory"),
        (["generate", "--prompt", "x", "--mesh", "data=2,model=8"], "device", "16 devices"),
        (["generate", "--prompt", "x", "--mesh", "model=two"], "invalid_parameter", "model=two"),
    ],
)
def test_bad_input_is_one_line_error(capsys, tmp_path, argv, kind, words):
    """Each bad invocation exits non-zero with one line naming the error's kind and cause."""
    file = tmp_path / "a_file"
    file.write_text("")
    argv = [a.format(gguf=default_model_path(), file=file) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == (2 if kind == "invalid_parameter" else 1)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"ferrum-jax: error: {kind}: "), err
    assert words in err and "Traceback" not in err


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    argv = [sys.executable, "-m", "ferrum_jax.cli", "generate", "--prompt", "x", "--model"]
    quiet = subprocess.run([*argv, str(tmp_path / "missing")], capture_output=True, text=True)
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr
    loud = subprocess.run(
        [*argv, str(tmp_path / "missing"), "--debug"], capture_output=True, text=True
    )
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
