"""Stop strings: the first of several strings found in streamed text, nothing shown past it."""

from __future__ import annotations

from collections.abc import Sequence

from ferrum_jax.errors import FerrumError


class StopStrings:
    """Scans text as it streams for the first occurrence of any stop string.

    `push` releases only text that cannot be the start of a stop string; a possible start
    is held back until the following text settles it. Once a stop string is found, the
    text before it is released and `matched` names it; everything after it is dropped.
    The concatenation of the released pieces and `flush` is therefore the whole text cut
    just before the first stop string (or the whole text when none occurs).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise FerrumError.invalid_parameter("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._held = ""
        self.matched: str | None = None
        """The stop string that ended the text, once one has."""

    def push(self, text: str) -> str:
        """Adds streamed text; returns the part that is safe to show."""
        if self.matched is not None:
            return ""
        held = self._held + text
        hits = [(at, stop) for stop in self._stops if (at := held.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self._held = ""
            return held[:at]
        keep = max((self._partial(held, stop) for stop in self._stops), default=0)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        """The text held back at the end of the stream (no stop string completed)."""
        out, self._held = self._held, ""
        return out

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                return n
        return 0
