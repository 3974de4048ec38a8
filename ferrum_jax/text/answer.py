"""`AnswerText`: the text of a generated answer as its tokens arrive, cut at the first stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ferrum_jax.text.stops import StopStrings

if TYPE_CHECKING:
    from ferrum_jax.text.tokenizer import Tokenizer


class AnswerText:
    """Detokenises generated ids one at a time (special tokens skipped) and watches for stop
    strings: `push` returns the text that became safe to show, `matched` names the stop
    string once one completed (the answer then ends before it).

    `text` after `finish` is the whole answer: what the CLI streams, what batch generation
    writes.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self._detokenizer = tokenizer.stream_decoder(skip_special_tokens=True)
        self._stops = StopStrings(stops)
        self._parts: list[str] = []

    @property
    def matched(self) -> str | None:
        """The stop string that ended the answer, or None."""
        return self._stops.matched

    @property
    def text(self) -> str:
        """The text released so far (all of it, after `finish`)."""
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        """Adds a generated id; returns the text it released (often "")."""
        return self._emit(self._stops.push(self._detokenizer.push(token_id)))

    def finish(self) -> str:
        """Releases what was held back (a possible start of a stop string, a partial
        character) when generation ends without a stop string."""
        if self._stops.matched is not None:
            return ""
        tail = self._stops.push(self._detokenizer.flush())
        return self._emit(tail + self._stops.flush())

    def _emit(self, piece: str) -> str:
        if piece:
            self._parts.append(piece)
        return piece
