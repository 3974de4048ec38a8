"""Progress on stderr: bars on a terminal, lines otherwise, both off when quiet.

Long steps (loading a checkpoint tensor by tensor, `JaxModelExecutor.warmup` compiling its
programs, a JSONL batch, waiting for a first token) report through a `Bar`: a tqdm bar when
stderr is a terminal, otherwise a line on the `ferrum_jax` logger at least every
`LINE_INTERVAL_S` (`warmup: 12/47 programs, 41 s`). Stage messages go to the same logger at
INFO. `stage_lines()` prints those as lines on stderr (the CLI runs every command inside it);
so does any logging set-up that lets the logger's INFO through. Setting the logger above INFO
— `stage_lines(quiet=True)`, what `ferrum-jax --quiet` does — hides the bars and lines too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from tqdm import tqdm

logger = logging.getLogger("ferrum_jax")
"""The package's logger: stage messages at INFO."""

LINE_INTERVAL_S = 5.0
"""Off a terminal, a stage still running prints a line this often: a log silent for minutes
(the README's executor example once printed nothing for 321 s while warmup compiled) looks
hung."""

REDRAW_S = 1.0
"""On a terminal, a bar's elapsed time is redrawn this often, even while one step runs long
(compiling one XLA program can take a minute on a small CPU)."""

_open: list[Bar] = []
"""The bars not yet closed, innermost last: only the innermost reports, so a stage around a
counted bar (loading around its tensor bar) stays quiet while the inner one shows progress."""


def plural(n: int, noun: str) -> str:
    """`1 sequence`, `2 sequences`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def bars_enabled() -> bool:
    """Bars are drawn on a terminal unless the `ferrum_jax` logger was set above INFO."""
    return not _quiet() and sys.stderr.isatty()


def _quiet() -> bool:
    # Only the logger's own level counts: an application's root level (WARNING by default)
    # must not hide the bars a terminal user has always seen.
    return logger.level > logging.INFO


class Bar:
    """Progress of one stage: `total` steps of `unit`, or None for a stage without steps
    (`waiting`). A tqdm bar on a terminal, a line every `LINE_INTERVAL_S` otherwise, nothing
    when quiet; a background thread keeps either going while a single step runs long."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._postfix = ""
        self._start = time.perf_counter()
        self._tqdm: tqdm | None = None
        self._lines = not _quiet() and not sys.stderr.isatty()
        if total is not None and bars_enabled():
            self._tqdm = self._draw()
        self._done = threading.Event()
        _open.append(self)
        self._thread: threading.Thread | None = None
        if bars_enabled() or self._lines:
            self._thread = threading.Thread(target=self._beat, name=f"progress {desc}", daemon=True)
            self._thread.start()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self._postfix = text
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=refresh)

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self in _open:
            _open.remove(self)
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def line(self) -> str:
        """What a line off a terminal says: `warmup: 12/47 programs, 41 s (3.2 tok/s)`."""
        elapsed = f"{time.perf_counter() - self._start:.0f} s"
        if self.total is None:
            text = f"{self.desc}: {elapsed}"
        else:
            text = f"{self.desc}: {self.n}/{plural(self.total, self.unit)}, {elapsed}"
        return f"{text} ({self._postfix})" if self._postfix else text

    def _draw(self) -> tqdm:
        if self.total is None:  # a stage without steps: its name and the time it has taken
            return tqdm(
                desc=self.desc, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False
            )
        return tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr)

    def _beat(self) -> None:
        interval = REDRAW_S if bars_enabled() else LINE_INTERVAL_S
        while not self._done.wait(interval):
            if _open[-1:] != [self]:
                continue  # an inner stage reports
            if not self._lines:
                if self._tqdm is None:
                    self._tqdm = self._draw()
                self._tqdm.refresh()
            else:
                logger.info("%s", self.line())


def bar(total: int, desc: str, unit: str) -> Bar:
    """Progress over `total` steps of `unit` (see `Bar`); close it, or use it in `with`."""
    return Bar(total, desc, unit)


def waiting(desc: str) -> Bar:
    """Progress of a stage without steps (loading an orbax checkpoint, compiling a first
    token): after `REDRAW_S` a timer on a terminal, after `LINE_INTERVAL_S` a line otherwise."""
    return Bar(None, desc, "")


@contextlib.contextmanager
def stage_lines(quiet: bool = False) -> Iterator[None]:
    """While active, the `ferrum_jax` logger's stage messages are lines on stderr.

    `quiet` hides them and the bars instead. Works whatever the application's logging
    set-up (orbax configures the root logger at WARNING on import, so a later
    `logging.basicConfig(level=logging.INFO)` does nothing).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ferrum-jax: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False  # a root handler would print every line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
