"""`JaxKvCacheHandle`: names one sequence of a `JaxModelExecutor`; reads its live state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferrum_jax.interfaces import BlockTable, CacheHandleStats, Device, KvCacheHandle, TensorLike

if TYPE_CHECKING:
    from ferrum_jax.executor.executor import JaxModelExecutor
    from ferrum_jax.executor.records import Sequence


class JaxKvCacheHandle(KvCacheHandle):
    """A sequence of the executor's page pool, by `cache_id`; every query reads the record."""

    def __init__(self, executor: JaxModelExecutor, cache_id: str) -> None:
        self._executor = executor
        self._cache_id = cache_id

    @property
    def executor(self) -> JaxModelExecutor:
        return self._executor

    def _record(self) -> Sequence:
        return self._executor._record_of(self)

    def cache_id(self) -> str:
        return self._cache_id

    def is_valid(self) -> bool:
        return self._executor._is_live(self._cache_id)

    def num_rows(self) -> int:
        """Batch rows this handle holds (one per prompt row of the prefill that made it)."""
        return len(self._record().rows)

    def row_lengths(self) -> list[int]:
        """Tokens stored per row."""
        return self._record().lengths

    def num_tokens(self) -> int:
        """Tokens stored in the longest row (all rows, for a single-row handle)."""
        return max(self._record().lengths)

    def block_table(self) -> BlockTable:
        """The real pages of the first row, in order (`block_size` = the page size)."""
        row = self._record().rows[0]
        page = self._executor.block_size
        used = BlockTable.blocks_needed_for_length(len(row), page)
        table = BlockTable.new(page)
        table.add_blocks(row.pages[:used])
        table.sequence_length = len(row)
        return table

    def device(self) -> Device:
        return self._executor.info().device

    def num_layers(self) -> int:
        return self._executor.model.runtime_config.num_layers

    def num_heads(self) -> int:
        return self._executor.model.runtime_config.num_kv_heads

    def head_dim(self) -> int:
        return self._executor.model.runtime_config.head_dim

    def key_cache(self, layer: int) -> TensorLike | None:
        return self._executor._pages_view(self, layer, keys=True)

    def value_cache(self, layer: int) -> TensorLike | None:
        return self._executor._pages_view(self, layer, keys=False)

    def clone_handle(self) -> KvCacheHandle:
        return JaxKvCacheHandle(self._executor, self._cache_id)

    def stats(self) -> CacheHandleStats:
        record = self._record()
        executor = self._executor
        tokens = sum(record.lengths)
        pages = sum(len(row.pages) for row in record.rows)
        return CacheHandleStats(
            memory_bytes=pages * executor.block_size * executor.kv_bytes_per_token,
            blocks_allocated=pages,
            tokens_stored=tokens,
            utilization=tokens / max(pages * executor.block_size, 1),
            last_access=record.last_access,
        )

    def __repr__(self) -> str:
        return f"JaxKvCacheHandle({self._cache_id!r})"
