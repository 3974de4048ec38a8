"""Host-local data parallelism: one model replica per process, requests split by the leader.

The alternative to one global mesh (`JaxModelExecutor(multihost=...)`): every process holds a
whole replica on a mesh of its own devices, so a step never crosses hosts. The leader's
`ReplicatedExecutor` is the engine's object. It keeps one executor per replica: its own
(`JaxModelExecutor` on its devices) and, for each follower, a `RemoteReplica`, which decides
pages, prefix cache and records on the leader like any executor but runs each step on its
follower (`serve_follower(replica=True)`) and gets the step's logits back over the
coordination service. A sequence lives on one replica for its life; a new one goes to the
replica with the fewest live sequences. Replicas run their parts of a batch concurrently.

This serves Ferrum 0.7's unified path (`unified_decode`, `release_cache`, `kv_capacity`,
`warmup`, `shutdown`): what the engine loop calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import multihost as mh
from ferrum_jax.executor.executor import JaxModelExecutor
from ferrum_jax.interfaces import UnifiedBatch
from ferrum_jax.model import Model


class RemoteReplica(JaxModelExecutor):
    """An executor whose host-side state lives here and whose devices are another process's.

    Only the device work differs: steps, page copies and pool rebuilds are plans for the
    follower (no pool, no compiled program on the leader), and a step's logits are the
    follower's reply. The follower checks memory; the leader does not compile to measure it.
    """

    def __init__(
        self, model: Model, process: int, config: mh.MultihostConfig, **options: Any
    ) -> None:
        super().__init__(model, **options)
        self.process = process
        self._vocab = model.runtime_config.vocab_size
        self._link = mh.Leader(config, [process], f"replica{process}", transport="kv")
        self._link.send(mh.Op.HELLO, [self.fingerprint()])
        self._link.collect()

    def _new_pool(self) -> tuple:
        return ()

    def _fits(self, tokens: int, items: int, rows: int | None = None) -> bool:
        return True

    def _pool_intact(self) -> bool:
        return self._link is None or self._link.lost is None

    def _run_step(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, None]:
        (reply,) = self._link.collect()
        logits = np.frombuffer(reply, np.float32).reshape(len(arrays[4]), self._vocab)
        return logits, None

    def _run_copy(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Nothing here: the follower copies; its ack is awaited before the next plan."""

    def _fresh_pool(self) -> None:
        """Nothing here: the follower makes the fresh pool."""


class ReplicatedExecutor:
    """One replica per process of a `jax.distributed` job; the engine's object on process 0."""

    def __init__(
        self,
        model: Model,
        *,
        multihost: mh.MultihostConfig | None = None,
        **options: Any,
    ) -> None:
        """`model` on this process's devices (`options["mesh"]`: a mesh of local devices, or
        None); every follower runs `serve_follower(model, replica=True, ...)` with the same
        options on its own devices."""
        if jax.process_index() != 0:
            raise FerrumError.config(
                "ReplicatedExecutor runs on process 0; the others run serve_follower"
            )
        config = multihost or mh.MultihostConfig()
        local = JaxModelExecutor(model, **options)
        # The remote replicas' host side: the local model as adapted to its mesh (the same
        # runtime heads as the followers'), placed nowhere.
        remote = {**options, "mesh": None}
        self.replicas: list[JaxModelExecutor] = [local]
        self.replicas += [
            RemoteReplica(local.model, p, config, **remote) for p in range(1, jax.process_count())
        ]
        self.max_batch_size = sum(r.max_batch_size for r in self.replicas)
        self._owner: dict[str, int] = {}
        """Live sequence id -> the replica holding it."""

    def supports_native_unified_decode(self) -> bool:
        return True

    def kv_capacity(self) -> int | None:
        return self.replicas[0].kv_capacity()

    def _place(self, seq_id: str) -> int:
        """The replica a new sequence goes to: the one with the fewest live sequences."""
        load = [0] * len(self.replicas)
        for r in self._owner.values():
            load[r] += 1
        return min(range(len(self.replicas)), key=lambda r: load[r])

    async def unified_decode(self, batch: UnifiedBatch) -> list[np.ndarray | None]:
        """`JaxModelExecutor.unified_decode` with each item on its sequence's replica; all
        replicas run at once. When a replica fails, the others' parts still commit, the
        failing replica's part changes nothing, and the call raises its error."""
        if not isinstance(batch, UnifiedBatch):
            raise FerrumError.invalid_parameter(f"expected a UnifiedBatch, got {batch!r}")
        parts: list[list[int]] = [[] for _ in self.replicas]
        placed: list[str] = []
        for i, item in enumerate(batch.items):
            replica = self._owner.get(item.seq_id)
            if replica is None:
                replica = self._place(item.seq_id)
                self._owner[item.seq_id] = replica
                placed.append(item.seq_id)
            parts[replica].append(i)
        calls = [
            (r, self.replicas[r].unified_decode(UnifiedBatch([batch.items[i] for i in part])))
            for r, part in enumerate(parts)
            if part
        ]
        results = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
        outputs: list[np.ndarray | None] = [None] * len(batch.items)
        error: BaseException | None = None
        for (r, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                error = error or result
                for seq_id in placed:
                    if self._owner.get(seq_id) == r:
                        del self._owner[seq_id]
                continue
            for i, logits in zip(parts[r], result, strict=True):
                outputs[i] = logits
        if error is not None:
            raise error
        return outputs

    def release_cache(self, cache_id: str) -> None:
        replica = self._owner.pop(cache_id, None)
        if replica is not None:
            self.replicas[replica].release_cache(cache_id)

    async def warmup(self) -> list[dict[str, list]]:
        return list(await asyncio.gather(*(r.warmup() for r in self.replicas)))

    async def shutdown(self) -> None:
        """Shuts every replica down (and so stops every follower)."""
        await asyncio.gather(*(r.shutdown() for r in self.replicas))

    def cache_metrics_snapshot(self) -> list[dict[str, Any] | None]:
        """Per replica, its page pool and prefix cache counters."""
        return [r.cache_metrics_snapshot() for r in self.replicas]

    @property
    def link_stats(self) -> Sequence[dict[str, float]]:
        """Per follower: plans sent, seconds sending and waiting for acks."""
        return [r._link.stats for r in self.replicas[1:]]
