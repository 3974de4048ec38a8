"""`JaxModelExecutor`: Ferrum's `ModelExecutor` contract on a pool of KV pages.

`executor.py` holds the executor; `handle.py` its `KvCacheHandle`; `records.py` the host-side
sequence records and a call's undo log; `calls.py` a call's life on the worker thread;
`lazy_logits.py` prefill logits computed on demand; `memory.py` device memory; `stats.py`
counters.
"""

from ferrum_jax.executor.executor import JaxModelExecutor
from ferrum_jax.executor.handle import JaxKvCacheHandle
from ferrum_jax.executor.lazy_logits import LazyLogits

__all__ = ["JaxKvCacheHandle", "JaxModelExecutor", "LazyLogits"]
