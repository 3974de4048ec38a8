"""`JaxModelExecutor`: Ferrum's `ModelExecutor` contract on a pool of KV pages.

`executor.py` holds the executor; `handle.py` its `KvCacheHandle`; `records.py` the host-side
sequence records and a call's undo log; `calls.py` a call's life on the worker thread;
`lazy_logits.py` prefill logits computed on demand; `memory.py` device memory; `stats.py`
counters; across the processes of a `jax.distributed` job, `multihost.py` the leader/follower
link, `follower.py` the followers' loop and `replicas.py` host-local data parallelism.
"""

from ferrum_jax.executor.executor import JaxModelExecutor
from ferrum_jax.executor.follower import serve_follower
from ferrum_jax.executor.handle import JaxKvCacheHandle
from ferrum_jax.executor.lazy_logits import LazyLogits
from ferrum_jax.executor.multihost import MultihostConfig
from ferrum_jax.executor.replicas import ReplicatedExecutor

__all__ = [
    "JaxKvCacheHandle",
    "JaxModelExecutor",
    "LazyLogits",
    "MultihostConfig",
    "ReplicatedExecutor",
    "serve_follower",
]
