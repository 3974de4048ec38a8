"""`serve_follower`: what every process but the leader runs in a multi-host job.

The follower builds the same `JaxModelExecutor` as the leader (same model, mesh and options:
the same pool, page geometry and compiled programs) and then only obeys: each plan the leader
sends (`mh.Op`) is run on this process's devices with the plan's arrays as inputs, and
acked. It keeps no sequences, pages or prefix cache of its own. A plan it cannot run is
refused to the leader (whose call then fails) and ends the loop with a `FerrumError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ferrum_jax import progress
from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import multihost as mh
from ferrum_jax.executor.executor import JaxModelExecutor
from ferrum_jax.model import Model


def serve_follower(
    model: Model,
    *,
    multihost: mh.MultihostConfig | None = None,
    replica: bool = False,
    params_for_version: Callable[[int], nnx.State] | None = None,
    **options: Any,
) -> int:
    """Serves the leader's plans until it shuts down; returns the plans served.

    `model` and `options` (`mesh`, `max_batch_size`, ...) must be the leader's (the first
    plan compares their fingerprint). With `replica`, this process is one host-local replica
    of a `ReplicatedExecutor`: `options["mesh"]` is a mesh of its own devices (or None: one
    device), and each step's logits go back to the leader. `params_for_version(v)` gives the
    weights of the leader's `update_params` number `v` (the same arrays the leader's training
    loop made on this host); without it, an `update_params` stops the follower.
    """
    config = multihost or mh.MultihostConfig()
    if jax.process_index() == 0:
        raise FerrumError.config("process 0 leads: build the JaxModelExecutor there instead")
    if replica:
        executor = JaxModelExecutor(model, **options)
        link = _replica_link(config)
    else:
        executor = JaxModelExecutor(model, multihost=config, **options)
        link = executor._link
    return _Follower(executor, link, replica, params_for_version).run()


def _replica_link(config: mh.MultihostConfig) -> mh.FollowerLink:
    return mh.FollowerLink(config, f"replica{jax.process_index()}", transport="kv")


class _Follower:
    def __init__(
        self,
        executor: JaxModelExecutor,
        link: mh.FollowerLink,
        replica: bool,
        params_for_version: Callable[[int], nnx.State] | None,
    ) -> None:
        self.executor = executor
        self.link = link
        self.replica = replica
        self.params_for_version = params_for_version

    def run(self) -> int:
        served = 0
        while True:
            plan = self.link.receive()
            try:
                reply = self._apply(plan)
            except Exception as e:
                self.link.refuse(plan.serial, f"{type(e).__name__}: {e}")
                if isinstance(e, FerrumError):
                    raise
                raise FerrumError.device(f"follower failed plan {plan.serial}: {e}") from e
            self.link.ack(plan.serial, reply)
            served += 1
            if plan.op is mh.Op.SHUTDOWN:
                return served

    def _apply(self, plan: mh.Plan) -> bytes:
        ex = self.executor
        op = plan.op
        if op is mh.Op.HELLO:
            mine = ex.fingerprint()
            (theirs,) = plan.arrays
            if not np.array_equal(mine, theirs):
                raise FerrumError.config(
                    f"this follower's executor differs from the leader's (fingerprint "
                    f"{mine.tolist()} vs {theirs.tolist()}): give both the same model, mesh "
                    "and options"
                )
        elif op is mh.Op.STEP:
            logits, _ = ex._run_step(plan.arrays)
            if self.replica:
                return np.ascontiguousarray(logits, np.float32).tobytes()
        elif op is mh.Op.COPY:
            ex._run_copy(*plan.arrays)
            jax.block_until_ready(ex._pages)
        elif op is mh.Op.POOL:
            ex._fresh_pool()
        elif op is mh.Op.PARAMS:
            if self.params_for_version is None:
                raise FerrumError.unsupported(
                    f"the leader swapped in params version {plan.aux}; this follower was "
                    "started without params_for_version"
                )
            params = self.params_for_version(plan.aux)
            jax.tree.map(_check_like, ex._params, params)
            ex._params = params
            ex.params_version = plan.aux
        elif op is mh.Op.SHUTDOWN:
            for x in jax.tree.leaves(ex._pages):
                if not x.is_deleted():
                    x.delete()
            ex._worker.shutdown(wait=False)
            progress.logger.info("follower: the leader shut down")
        return b""


def _check_like(old: jax.Array, new: Any) -> None:
    if not isinstance(new, jax.Array) or (new.shape, new.dtype) != (old.shape, old.dtype):
        raise FerrumError.invalid_parameter(
            f"params_for_version gave {getattr(new, 'dtype', type(new).__name__)}"
            f"{list(getattr(new, 'shape', []))}, expected {old.dtype}{list(old.shape)}"
        )
