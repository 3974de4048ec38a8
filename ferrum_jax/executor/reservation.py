"""Ferrum main's KV slot reservation, on the host: requests checked and merged, and the
metadata keys that carry the same bounds on a `UnifiedBatchItem`."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from ferrum_jax.errors import FerrumError
from ferrum_jax.interfaces import KvSlotRequest

ADMISSION_KEY = "ferrum_kv_admission_target_len"
"""Item metadata: prompt + generated length, a bound checked for fit and never allocated."""
CAPACITY_HINT_KEY = "ferrum_kv_capacity_hint"
"""Item metadata: the most tokens the sequence will hold; pre-sizes a new sequence's pages."""


def _length(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise FerrumError.invalid_parameter(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def merge(requests: Sequence[KvSlotRequest]) -> dict[str, tuple[int, int]]:
    """`cache_id -> (target_len, admission_len)`, in first-seen order; duplicates of an id
    merge to the largest of each, as the reference does, and admission is never below target."""
    if isinstance(requests, KvSlotRequest | str | bytes) or not isinstance(requests, Sequence):
        raise FerrumError.invalid_parameter(
            f"reserve_kv_slots takes a sequence of KvSlotRequest, got {type(requests).__name__}"
        )
    merged: dict[str, tuple[int, int]] = {}
    for request in requests:
        if not isinstance(request, KvSlotRequest):
            raise FerrumError.invalid_parameter(f"expected a KvSlotRequest, got {request!r}")
        cache_id = request.cache_id
        if not isinstance(cache_id, str) or not cache_id:
            raise FerrumError.invalid_parameter(
                f"cache_id must be a non-empty string, got {cache_id!r}"
            )
        target = _length(request.target_len, f"target_len of {cache_id!r}")
        admission = target
        if request.admission_target_len is not None:
            admission = max(
                target,
                _length(request.admission_target_len, f"admission_target_len of {cache_id!r}"),
            )
        old_target, old_admission = merged.get(cache_id, (0, 0))
        merged[cache_id] = (max(old_target, target), max(old_admission, admission))
    return merged


def metadata_length(metadata: Mapping[str, Any] | None, key: str, seq_id: str) -> int | None:
    """A length bound from an item's metadata (an integer, or its decimal string as JSON
    metadata may carry it), or None when absent."""
    if not metadata or key not in metadata:
        return None
    value = metadata[key]
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return _length(value, f"metadata {key} of {seq_id!r}")
