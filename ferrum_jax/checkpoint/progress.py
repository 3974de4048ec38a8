"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
from typing import TextIO

_WIDTH = 30


class Progress:
    """Counts `advance()` calls up to `total`; redraws only when the bar visibly changes.

    Silent when the stream is not a TTY, so logs, CI output and notebooks stay clean.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self._label = label
        self._total = max(total, 1)
        self._done = 0
        self._drawn = -1
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty()

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()

    def advance(self) -> None:
        """Marks one more unit done."""
        self._done = min(self._done + 1, self._total)
        self._draw()

    def _draw(self) -> None:
        filled = _WIDTH * self._done // self._total
        if not self._enabled or (filled == self._drawn and self._done != self._total):
            return
        self._drawn = filled
        bar = "#" * filled + "." * (_WIDTH - filled)
        self._stream.write(f"\r{self._label} [{bar}] {self._done}/{self._total}")
        self._stream.flush()
