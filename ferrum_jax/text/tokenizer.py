"""`Tokenizer`: a `tokenizers.Tokenizer` plus the chat template and special tokens around it.

Two sources: an HF tokenizer directory (`from_dir`) and the tokenizer metadata of a GGUF file
(`from_gguf`). A byte-level BPE GGUF (`tokenizer.ggml.model = "gpt2"`) carries the vocabulary,
the merges, the token types and the name of a pre-tokenizer (`tokenizer.ggml.pre`); the
splitting regexes behind each name are llama.cpp's (`src/llama-vocab.cpp`), rebuilt here as
`tokenizers` pre-tokenizers. A SentencePiece GGUF (`"llama"`, Gemma's) carries tokens, scores
and token types but no merges; they are implied by the vocabulary (`_sentencepiece_merges`).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from ferrum_jax.errors import FerrumError
from ferrum_jax.text.chat_template import compile_chat_template, render_chat_template
from ferrum_jax.text.detokenizer import IncrementalDetokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# GPT-2's split. llama.cpp drops the final `\s+`, but its splitter keeps unmatched text as a piece
# of its own, which is what this alternative produces, so the two split identically.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp applies a name's regexes in turn, each splitting the pieces the previous one left.
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for BPE vocabularies that name no pre-tokenizer.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),  # not a llama.cpp name, but what people write for "gpt-2"
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
# llama.cpp sets `ignore_merges` (a whole piece found in the vocabulary is one token, whatever the
# merges say) and BOS for these; Llama 3's own tokenizer.json does the same.
_LLAMA3_NAMES = frozenset({"llama3", "llama-v3", "llama-bpe"})

# `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
_CONTROL = 3
_USER_DEFINED = 4

# Named special tokens that chat templates may read, as in transformers' `special_tokens_map`.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _token_content(value: Any) -> str | None:
    """A special token from a tokenizer config: a string, or a serialised `AddedToken` dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


_KINDS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: (
        isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    ),
}


def _field(reader: Any, key: str, kind: str, default: Any = None) -> Any:
    """GGUF metadata `key`, which must be of `kind` (a corrupt file may hold anything there)."""
    field = reader.get_field(key)
    if field is None:
        return default
    try:
        value = field.contents()
    except (ValueError, IndexError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise FerrumError.tokenizer(f"GGUF metadata {key!r} cannot be read: {e}") from e
    if not _KINDS[kind](value):
        raise FerrumError.tokenizer(
            f"GGUF metadata {key!r} must be {kind}, got {type(value).__name__} {str(value)[:40]!r}"
        )
    return value


def _unique(ids: Sequence[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None))


class Tokenizer:
    """Text <-> token ids, chat templates, and streaming detokenisation for one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        eos_token_ids: Sequence[int | None] = (),
    ) -> None:
        """`special_tokens` maps `bos_token`/`eos_token`/`unk_token`/`pad_token` to token text.

        `eos_token_ids` lists more ids that end generation (None entries are ignored); the
        `eos_token`'s id always comes first.
        """
        self._tok = backend
        self._chat_template = chat_template
        self._special = {
            k: v for k, v in (special_tokens or {}).items() if k in _NAMED_SPECIAL_TOKENS and v
        }
        eos = self._special.get("eos_token")
        self._eos_ids = _unique([None if eos is None else backend.token_to_id(eos), *eos_token_ids])

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        tokenizer_json: str,
        config: Mapping[str, Any] | None = None,
        *,
        chat_template: str | None = None,
        generation_config: Mapping[str, Any] | None = None,
        source: str = "tokenizer",
    ) -> Tokenizer:
        """Builds a tokenizer from the contents of an HF tokenizer directory's files.

        `tokenizer_json` is `tokenizer.json` (its post-processor decides BOS/EOS insertion, as in
        transformers 5); `config` is `tokenizer_config.json` (special tokens, chat template);
        `chat_template` is `chat_template.jinja` (overrides the config's template);
        `generation_config` holds more end-of-generation ids. `source` names them in errors.
        `ferrum_jax.checkpoint.load_tokenizer` reads the files.
        """
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust parser raises plain `Exception` on malformed files
            raise FerrumError.tokenizer(f"cannot parse {source}/{TOKENIZER_FILE}: {e}") from e
        config = config or {}
        special = {name: _token_content(config.get(name)) for name in _NAMED_SPECIAL_TOKENS}
        template: Any = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):
            # Older configs store several named templates; "default" is the one chats use.
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise FerrumError.tokenizer(
                f"{source}/{TOKENIZER_CONFIG_FILE}: chat_template is not a string"
            )
        eos_ids: list[int | None] = []
        if generation_config is not None:
            gen_eos = generation_config.get("eos_token_id")
            eos_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
            if not all(
                isinstance(i, int) and not isinstance(i, bool) for i in eos_ids if i is not None
            ):
                raise FerrumError.tokenizer(
                    f"{source}/{GENERATION_CONFIG_FILE}: eos_token_id must be ints"
                )
        return cls(backend, chat_template=template, special_tokens=special, eos_token_ids=eos_ids)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads an HF tokenizer directory (same as `ferrum_jax.checkpoint.load_tokenizer`)."""
        from ferrum_jax.checkpoint.tokenizer_files import load_tokenizer

        return load_tokenizer(path)

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """Builds the byte-level BPE tokenizer a GGUF file's metadata describes.

        `reader` is a `gguf.GGUFReader`. Only `tokenizer.ggml.model == "gpt2"` is supported, with
        the pre-tokenizers in `_PRE_TOKENIZER_SPLITS` (a missing `tokenizer.ggml.pre` means
        "default", as in llama.cpp). Control and user-defined tokens are added whole so text is
        never split inside them. BOS is added when `tokenizer.ggml.add_bos_token` says so; without
        the key, llama.cpp's default for the pre-tokenizer applies (on for Llama 3 only).
        """
        model = _field(reader, "tokenizer.ggml.model", "str")
        if model == "llama":
            return cls._from_gguf_sentencepiece(reader)
        if model != "gpt2":
            raise FerrumError.unsupported(
                f"GGUF tokenizer model {model!r} (supported: 'gpt2' BPE, 'llama' SentencePiece)"
            )
        pre = _field(reader, "tokenizer.ggml.pre", "str") or "default"
        if pre not in _PRE_TOKENIZER_SPLITS:
            raise FerrumError.unsupported(
                f"GGUF pre-tokenizer {pre!r}; supported: {sorted(_PRE_TOKENIZER_SPLITS)}"
            )
        tokens: list[str] = _field(reader, "tokenizer.ggml.tokens", "list[str]")
        raw_merges: list[str] | None = _field(reader, "tokenizer.ggml.merges", "list[str]")
        if not tokens or raw_merges is None:
            raise FerrumError.tokenizer(
                "GGUF has no tokenizer.ggml.tokens or tokenizer.ggml.merges"
            )
        types: list[int] = _field(reader, "tokenizer.ggml.token_type", "list[int]")
        types = types or [1] * len(tokens)
        if len(types) != len(tokens):
            raise FerrumError.tokenizer(
                f"GGUF has {len(tokens)} tokens but {len(types)} tokenizer.ggml.token_type entries"
            )

        spelling = bytes_to_unicode()
        alphabet = frozenset(spelling.values())
        spelled: list[str] = []  # each id's vocabulary key
        added: list[AddedToken] = []
        for text, kind in zip(tokens, types, strict=True):
            if kind in (_CONTROL, _USER_DEFINED):
                # Matched whole on the raw text, so the vocabulary must hold the raw text too.
                added.append(AddedToken(text, special=kind == _CONTROL, normalized=False))
            elif not set(text) <= alphabet:
                # Some converters store a normal token as plain text; respell it as its bytes.
                text = "".join(spelling[b] for b in text.encode("utf-8"))
            spelled.append(text)
        vocab: dict[str, int] = {}
        for i, text in enumerate(spelled):
            vocab.setdefault(text, i)
        merges = []
        for merge in raw_merges:
            # llama.cpp splits at the first space after the first character.
            cut = merge.find(" ", 1)
            if cut < 0:
                raise FerrumError.tokenizer(f"GGUF merge {merge!r} is not two tokens")
            merges.append((merge[:cut], merge[cut + 1 :]))

        try:
            bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_NAMES)
        # The Rust library raises a bare Exception for merges naming unknown tokens.
        except Exception as e:
            raise FerrumError.tokenizer(
                f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}"
            ) from e
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r), behavior="isolated")
                for r in _PRE_TOKENIZER_SPLITS[pre]
            ]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens(added)

        def token(key: str) -> str | None:
            idx = _field(reader, f"tokenizer.ggml.{key}", "int")
            return spelled[idx] if idx is not None and 0 <= idx < len(spelled) else None

        special = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
        }
        return cls._from_gguf_parts(reader, backend, special, add_bos=pre in _LLAMA3_NAMES)

    @classmethod
    def _from_gguf_sentencepiece(cls, reader: Any) -> Tokenizer:
        """SentencePiece BPE from GGUF metadata (Gemma's vocabulary), as transformers builds it.

        Spaces become `▁` (no prefix space), unknown characters fall back to their `<0xNN>`
        byte tokens, and merges come from the vocabulary (`_sentencepiece_merges`). Control
        tokens are matched whole as special tokens, user-defined ones (`\\n`, `</div>`) as
        plain added tokens. BOS is added unless `tokenizer.ggml.add_bos_token` is false
        (llama.cpp's default for SentencePiece vocabularies).
        """
        tokens: list[str] = _field(reader, "tokenizer.ggml.tokens", "list[str]")
        if not tokens:
            raise FerrumError.tokenizer("GGUF has no tokenizer.ggml.tokens")
        types: list[int] = _field(reader, "tokenizer.ggml.token_type", "list[int]")
        scores = reader.get_field("tokenizer.ggml.scores")
        types = types or [1] * len(tokens)
        for key, values in (("token_type", types), ("scores", scores and scores.contents())):
            if values is not None and len(values) != len(tokens):
                raise FerrumError.tokenizer(
                    f"GGUF has {len(tokens)} tokens but {len(values)} tokenizer.ggml.{key} entries"
                )
        # Whitespace-run tokens are stored with real spaces; text reaches the model as `▁`s.
        spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {text: i for i, text in enumerate(spelled)}

        def token(key: str) -> str | None:
            idx = _field(reader, f"tokenizer.ggml.{key}", "int")
            return spelled[idx] if idx is not None and 0 <= idx < len(spelled) else None

        unk = token("unknown_token_id")
        bpe = models.BPE(
            vocab=vocab,
            merges=_sentencepiece_merges(vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
        backend = tokenizers.Tokenizer(bpe)
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        backend.add_special_tokens(
            [
                AddedToken(text, special=True, normalized=False)
                for text, kind in zip(tokens, types, strict=True)
                if kind == _CONTROL
            ]
        )
        # As stored: a whitespace run was respelled above, so it is merged, never matched.
        backend.add_tokens(
            [
                AddedToken(text, special=False, normalized=False)
                for text, kind in zip(tokens, types, strict=True)
                if kind == _USER_DEFINED and text in vocab
            ]
        )
        special = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": unk,
            "pad_token": token("padding_token_id"),
        }
        return cls._from_gguf_parts(reader, backend, special, add_bos=True)

    @classmethod
    def _from_gguf_parts(
        cls, reader, backend: tokenizers.Tokenizer, special: dict, *, add_bos: bool
    ) -> Tokenizer:
        """The tokenizer of a GGUF file's vocabulary `backend`: BOS/EOS added as its metadata
        says (`add_bos` when it is silent), its chat template and end-of-generation ids."""
        add_bos = _field(reader, "tokenizer.ggml.add_bos_token", "bool", add_bos)
        add_eos = _field(reader, "tokenizer.ggml.add_eos_token", "bool", False)
        backend.post_processor = _template_processor(
            special["bos_token"] if add_bos else None,
            special["eos_token"] if add_eos else None,
            backend,
        )
        # End-of-turn / end-of-message ids are llama.cpp's other end-of-generation markers.
        extra_eos = [_field(reader, f"tokenizer.ggml.{k}_token_id", "int") for k in ("eot", "eom")]
        return cls(
            backend,
            chat_template=_field(reader, "tokenizer.chat_template", "str"),
            special_tokens=special,
            eos_token_ids=extra_eos,
        )

    def with_chat_template(self, template: str) -> Tokenizer:
        """This tokenizer with `template` (Jinja, rendered by the same sandbox) as its chat
        template: for a model that ships none, or to replace the one it ships."""
        compile_chat_template(template)  # a broken template fails here, not at the first chat
        copy = Tokenizer(self._tok, chat_template=template, special_tokens=self._special)
        copy._eos_ids = self._eos_ids
        return copy

    def to_files(self) -> dict[str, str]:
        """The contents of `tokenizer.json` and `tokenizer_config.json` that `from_files` reads.

        End-of-generation ids beyond the `eos_token` are returned under `generation_config.json`
        (as `{"eos_token_id": [...]}`), which is where `from_files` and transformers look.
        """
        config: dict[str, Any] = {
            **self._special,
            "add_bos_token": self.add_bos_token,
            "chat_template": self._chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        files = {
            TOKENIZER_FILE: self._tok.to_str(pretty=True),
            TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        }
        eos = self._special.get("eos_token")
        if self._eos_ids != _unique([None if eos is None else self._tok.token_to_id(eos)]):
            files[GENERATION_CONFIG_FILE] = json.dumps({"eos_token_id": list(self._eos_ids)})
        return files

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the tokenizer files (same as `ferrum_jax.checkpoint.save_tokenizer`)."""
        from ferrum_jax.checkpoint.tokenizer_files import save_tokenizer

        save_tokenizer(self, path)

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids.

        `add_special_tokens` adds what the post-processor adds (BOS when the model wants it).
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; incomplete UTF-8 sequences decode to U+FFFD.

        Ids past the vocabulary decode to nothing, as in the Rust library (models often pad
        their logits beyond the tokenizer); an id that is not a non-negative integer is
        refused (the library raised a raw OverflowError for -1).
        """
        ids = list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < 2**32:
                raise FerrumError.invalid_parameter(f"token id {i!r} is not an integer >= 0")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A detokenizer that turns ids pushed one at a time into text as it completes."""
        return IncrementalDetokenizer(self.decode, skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, as transformers' `apply_chat_template(tokenize=False)`.

        `kwargs` become template variables (e.g. `enable_thinking`, `documents`) and override the
        special-token variables.
        """
        if self._chat_template is None:
            raise FerrumError.tokenizer("this tokenizer has no chat template")
        return render_chat_template(
            self._chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self._special,
            **kwargs,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat; no BOS is added, as the template writes its own."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the size of the model's logits at least)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        bos = self._special.get("bos_token")
        return None if bos is None else self._tok.token_to_id(bos)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the `eos_token`, then any the config/metadata adds.

        From a directory the extra ids come from `generation_config.json`'s `eos_token_id`; from a
        GGUF, from `tokenizer.ggml.eot_token_id`/`eom_token_id`. Nothing is inferred from the
        chat template.
        """
        return self._eos_ids

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` puts BOS first."""
        bos = self.bos_token_id
        return bos is not None and self._tok.encode("", add_special_tokens=True).ids[:1] == [bos]

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (`bos_token`, `eos_token`, ...) that are set."""
        return dict(self._special)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token as spelled in the vocabulary (byte-level spelling, e.g. `Ġthe`)."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok


def _sentencepiece_merges(vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two
    tokens, ranked by the merged token's id (SentencePiece merges the best-scored piece first,
    and Gemma's ids are its merge order: its normal tokens' scores fall with the id, while its
    whitespace runs score -1000 yet sit near the top, as transformers' GGUF tokenizer ranks
    them), longer left part first."""
    merges = []
    for text, _ in sorted(vocab.items(), key=lambda item: item[1]):
        for cut in range(len(text) - 1, 0, -1):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def _template_processor(
    bos: str | None, eos: str | None, backend: tokenizers.Tokenizer
) -> processors.TemplateProcessing:
    """BOS/EOS insertion in the form transformers 5 builds (`update_post_processor`)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join(
        [single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    )
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
