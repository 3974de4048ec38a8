"""Operation counters and latency windows of an executor (status, metrics)."""

from __future__ import annotations

import numpy as np

LATENCY_WINDOW = 1000
"""Most recent operations the p95 latencies are computed over."""


class Stats:
    """Counters since the executor started; latencies in milliseconds."""

    def __init__(self) -> None:
        self.prefill_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.prefill_ops = 0
        self.decode_ops = 0
        self.prefill_total_ms = 0.0
        self.decode_total_ms = 0.0
        self.tokens = 0
        self.decode_rows = 0
        self.peak_bytes = 0
        self.steps = 0
        """Ragged forwards run."""
        self.prefill_tokens_computed = 0
        """Prompt tokens that went through the model (prefix-cache hits are not computed)."""
        self.prefill_tokens_reused = 0
        """Prompt tokens not computed: their keys/values came from the prefix cache."""
        self.logits_bytes_to_host = 0
        """Bytes of step results copied to the host: full logits, or greedy token ids."""

    def record(self, kind: str, ms: float, tokens: int, rows: int) -> None:
        window = self.prefill_ms if kind == "prefill" else self.decode_ms
        window.append(ms)
        del window[:-LATENCY_WINDOW]
        if kind == "prefill":
            self.prefill_ops += 1
            self.prefill_total_ms += ms
        else:
            self.decode_ops += 1
            self.decode_total_ms += ms
            self.decode_rows += rows
        self.tokens += tokens


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else 0.0
