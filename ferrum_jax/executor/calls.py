"""One async call's life between the event loop and the executor's worker thread.

Device work runs on one worker thread per executor, in call order. An `asyncio` caller can
be cancelled at any time; `Call` tells the worker whether its result will still be wanted,
so a call abandoned before it starts never runs, and one abandoned while it runs (or after
it finished but before the caller got the result) is rolled back.
"""

from __future__ import annotations

import threading

from ferrum_jax.executor.records import Txn


class Call:
    """Three state flips under a lock that is never held while device work runs, so the
    event loop may take it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "queued"
        self.txn: Txn | None = None

    def begin(self) -> bool:
        """Worker: False when the caller gave up before the call started (it must not run)."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "running"
            return True

    def finish(self, txn: Txn) -> bool:
        """Worker: False when the caller gave up while the call ran (it must be rolled back)."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state, self.txn = "finished", txn
            return True

    def abandon(self) -> bool:
        """Event loop, on cancellation: True when the call had finished, so its result will
        never reach the caller and its effects must be rolled back."""
        with self._lock:
            finished = self._state == "finished"
            self._state = "abandoned"
            return finished
