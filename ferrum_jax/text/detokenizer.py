"""Incremental detokenisation: text for a stream of token ids, released as it completes.

The technique of vLLM and TGI: keep two offsets into the ids, `prefix` and `read`. Text up to
`read` has been released. For a new id, decode the window `ids[prefix:]` and the already released
part of it, `ids[prefix:read]`; the new text is the difference. Decoding from `prefix` rather than
from `read` gives the decoder the left context it needs (e.g. SentencePiece drops the space of the
first token it sees), and the window stays a few tokens long, so a push costs O(window), not
O(sequence). While the window's text ends in U+FFFD, the last token ends inside a multi-byte
character, so nothing is released until the character completes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[..., str]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids pushed one at a time into text chunks.

    The concatenation of every `push` and the final `flush` equals `decode(all_ids)`. No chunk
    ends in a partial UTF-8 sequence; a U+FFFD inside a chunk is one the full decode has too.
    """

    def __init__(self, decode: Decode, *, skip_special_tokens: bool = False) -> None:
        """`decode(ids, skip_special_tokens=...)` is the tokenizer's decode."""
        self._decode = decode
        self._skip = skip_special_tokens
        # Only the window is kept: ids from `prefix` on; `_read` counts from the window's start.
        self._window_ids: list[int] = []
        self._read = 0
        self._prefix_text = ""  # decode(window[:read]), cached: it changes only on release

    def _text(self, ids: Sequence[int]) -> str:
        return self._decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Adds one id; returns the text it completes (often "", e.g. mid-character)."""
        self._window_ids.append(token_id)
        text = self._text(self._window_ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        delta = text[len(self._prefix_text) :]
        # The ids just released become the left context of the next window.
        del self._window_ids[: self._read]
        self._read = len(self._window_ids)
        self._prefix_text = self._text(self._window_ids)
        return delta

    def flush(self) -> str:
        """Returns the text still held back (a trailing partial character decodes to U+FFFD)."""
        out = self._text(self._window_ids)[len(self._prefix_text) :]
        self._window_ids.clear()
        self._read = 0
        self._prefix_text = ""
        return out
