"""Host-side records of the executor's sequences, and the undo log of one call.

The host is the source of truth: a row's `tokens` are every token its pages hold (the
ledger the pool is rebuilt from after a device failure), its `pages` the page ids in order.
Device pages only ever hold what some record says, or stale values past a row's length that
attention never reads.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Row:
    """One sequence row: its tokens and the pages holding their keys/values."""

    tokens: list[int]
    """Every token the row's pages hold, in order."""
    pages: list[int]
    """Page ids, one reference each; enough for `tokens` (possibly more after a rollback)."""
    shared: int = 0
    """Leading pages borrowed from the prefix cache: full, and never written by this row."""
    params_version: int = -1
    """The params version the row's first token was computed under. A row that outlives an
    `update_params(keep_cache=True)` holds KV of older weights, so it neither borrows from
    nor gives to the prefix cache again (-1: never)."""

    def copy(self) -> Row:
        return Row(list(self.tokens), list(self.pages), self.shared, self.params_version)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class Sequence:
    """A live sequence (one `KvCacheHandle`): one or more rows, keyed by `cache_id`."""

    cache_id: str
    rows: list[Row]
    last_access: float
    version: int = 0
    """Bumped by every committed change; an undo applies only to the version it made."""

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.rows]

    def copy(self) -> Sequence:
        return Sequence(
            self.cache_id, [r.copy() for r in self.rows], self.last_access, self.version
        )


class Txn:
    """The undo log of one call: each sequence it changes as it was before (None: the call
    created it) and the version the call's commit left."""

    def __init__(self, issued: int) -> None:
        self.issued = issued
        """When the call was issued, on the executor's clock of calls and releases."""
        self.before: dict[str, Sequence | None] = {}
        self.after: dict[str, int] = {}

    def touch(self, cache_id: str, record: Sequence | None) -> None:
        """Records `record` (the sequence `cache_id` before this call changes it)."""
        if cache_id not in self.before:
            self.before[cache_id] = None if record is None else record.copy()

    def committed(self, record: Sequence) -> None:
        self.after[record.cache_id] = record.version
