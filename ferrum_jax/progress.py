"""Progress on stderr: bars on a terminal, stage lines through logging, both off when quiet.

Long steps (loading a checkpoint tensor by tensor, `JaxModelExecutor.warmup` compiling its
programs) draw a tqdm bar when stderr is a terminal, and report their stages to the
`ferrum_jax` logger at INFO. The logger prints nothing until the application configures
logging (`logging.basicConfig(level=logging.INFO)`; the CLI does it for its own lines).
Setting the logger above INFO — `logging.getLogger("ferrum_jax").setLevel(logging.WARNING)`,
which is what `ferrum-jax --quiet` does — hides the bars too.
"""

from __future__ import annotations

import logging
import sys

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
