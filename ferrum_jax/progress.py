"""Progress on stderr: bars on a terminal, stage lines through logging, both off when quiet.

Long steps (loading a checkpoint tensor by tensor, `JaxModelExecutor.warmup` compiling its
programs) draw a tqdm bar when stderr is a terminal, and report their stages to the
`ferrum_jax` logger at INFO. `stage_lines()` prints those as lines on stderr (the CLI runs
every command inside it); so does any logging set-up that lets the logger's INFO through.
Setting the logger above INFO — `stage_lines(quiet=True)`, what `ferrum-jax --quiet` does —
hides the bars too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from tqdm import tqdm

logger = logging.getLogger("ferrum_jax")
"""The package's logger: stage messages at INFO."""


def bars_enabled() -> bool:
    """Bars are drawn on a terminal unless the `ferrum_jax` logger was set above INFO."""
    # Only the logger's own level counts: an application's root level (WARNING by default)
    # must not hide the bars a terminal user has always seen.
    quiet = logger.level > logging.INFO
    return not quiet and sys.stderr.isatty()


def bar(total: int, desc: str, unit: str) -> tqdm:
    """A tqdm bar on stderr, drawn only when `bars_enabled()`."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not bars_enabled(), file=sys.stderr)


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
