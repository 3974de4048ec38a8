"""One process of a 2-process x 4 CPU device job (gloo) for `test_multihost.py`.

    python tests/multihost_worker.py test PID PORT              # for test_multihost.py
    python tests/multihost_worker.py bench PID PORT TRANSPORT   # the same after warmup()

Process 0 leads, process 1 follows. Host-local replicas, then one device alone (process 0),
then one global (2, 4) mesh serve the same 12 requests; the leader prints `RESULT {json}`.
In `test` mode it then prints `SERVING` and keeps serving until the test kills the follower,
and prints `KILLED {json}` (when and how its call failed) before it shuts down and exits.
Importing this module sets nothing up.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

NEW = 8
REQUESTS = 12
TIMEOUT_S = 20.0
"""The leader's follower timeout (`MultihostConfig.timeout_s`) in these jobs."""
OPTIONS = {
    "max_batch_size": 4,
    "max_sequence_length": 160,
    "block_size": 16,
    "max_num_batched_tokens": 32,
    "enable_prefix_caching": True,
}
LOOP = {"token_budget": 32, "decode_chunk": 16, "prefill_chunk": 32}
"""`run_unified` limits: prompts longer than 32 tokens take several chunks."""


def requests():
    """12 mixed requests: a shared 40-token system prompt on half (prefix-cache hits), a third
    longer than one chunk."""
    from ferrum_jax.engine_loop import Request

    rng = random.Random(17)
    system = [rng.randrange(3, 252) for _ in range(40)]
    out = []
    for i in range(REQUESTS):
        length = rng.randrange(33, 90) if i % 3 == 0 else rng.randrange(1, 24)
        prompt = [*(system if i % 2 else []), *(rng.randrange(3, 252) for _ in range(length))]
        out.append(Request(f"r{i}", prompt, rng.randrange(2, NEW + 1)))
    return out


def model():
    from sharding_worker import configs, read_tensor

    from ferrum_jax.checkpoint import params_from_checkpoint
    from ferrum_jax.model import Model

    config = configs()["gqa"]  # 2 layers, hidden 64, 8 heads, 4 KV heads
    graphdef, params = params_from_checkpoint(config, read_tensor)
    return Model(config, graphdef, params)


def serve(executor, n: int = REQUESTS) -> tuple[dict[str, list[int]], float]:
    """Tokens by request id, and tokens/s of one pass over the first `n` requests (compiles
    included unless the executor was warmed up)."""
    from ferrum_jax.engine_loop import run_unified

    start = time.perf_counter()
    results = asyncio.run(run_unified(executor, requests()[:n], **LOOP))
    wall = time.perf_counter() - start
    tokens = {k: r.tokens for k, r in results.items()}
    return tokens, sum(map(len, tokens.values())) / wall


def per_plan_ms(stats: dict[str, float]) -> dict[str, float]:
    n = max(stats["plans"], 1)
    return {
        "plans": stats["plans"],
        "send_ms": 1e3 * stats["send_s"] / n,
        "ack_ms": 1e3 * stats["ack_s"] / n,
    }


def main(argv: list[str]) -> None:
    mode, pid, port = argv[0], int(argv[1]), int(argv[2])
    transport = argv[3] if len(argv) > 3 else "broadcast"
    import jax

    from ferrum_jax.errors import FerrumError
    from ferrum_jax.executor import (
        JaxModelExecutor,
        MultihostConfig,
        ReplicatedExecutor,
        serve_follower,
    )
    from ferrum_jax.sharding import initialize, make_mesh

    initialize(f"localhost:{port}", num_processes=2, process_id=pid, recoverable=True)
    mesh = make_mesh(2, 4)
    local_mesh = make_mesh(1, 4, devices=jax.local_devices())
    config = MultihostConfig(timeout_s=TIMEOUT_S, transport=transport)
    m = model()
    if pid != 0:
        serve_follower(m, replica=True, mesh=local_mesh, multihost=config, **OPTIONS)
        serve_follower(m, mesh=mesh, multihost=config, **OPTIONS)
        return
    measure = mode == "bench"
    out: dict = {"processes": jax.process_count(), "devices": len(jax.devices())}

    start = time.perf_counter()
    replicas = ReplicatedExecutor(m, mesh=local_mesh, multihost=config, **OPTIONS)
    if measure:
        asyncio.run(replicas.warmup())
        replicas.link_stats[0].update(plans=0, send_s=0.0, ack_s=0.0)
    out["replicas"], out["replicas_tok_s"] = serve(replicas)
    out["replica_plans"] = per_plan_ms(replicas.link_stats[0])
    out["replica_cache"] = replicas.cache_metrics_snapshot()
    asyncio.run(replicas.shutdown())
    out["replicas_s"] = time.perf_counter() - start

    start = time.perf_counter()
    one = JaxModelExecutor(m, **OPTIONS)  # this process's first device alone
    if measure:
        asyncio.run(one.warmup())
    out["one"], out["one_tok_s"] = serve(one)
    asyncio.run(one.shutdown())
    out["one_s"] = time.perf_counter() - start

    start = time.perf_counter()
    ex = JaxModelExecutor(m, mesh=mesh, multihost=config, **OPTIONS)
    if measure:
        asyncio.run(ex.warmup())
        ex._link.stats.update(plans=0, send_s=0.0, ack_s=0.0)
    out["mesh"], out["mesh_tok_s"] = serve(ex)
    out["mesh_plans"] = per_plan_ms(ex._link.stats)
    out["mesh_cache"] = ex.cache_metrics_snapshot()
    out["mesh_s"] = time.perf_counter() - start
    print("RESULT " + json.dumps(out), flush=True)
    if measure:
        asyncio.run(ex.shutdown())
        return

    # The test kills the follower once it reads SERVING; the leader serves until it notices.
    print("SERVING", flush=True)
    killed: dict = {}
    try:
        while True:
            serve(ex, 4)
    except FerrumError as e:
        killed.update(raised_at=time.time(), kind=e.kind.name, message=str(e))
    from ferrum_jax.engine_loop import EngineHandle
    from ferrum_jax.interfaces import UnifiedBatch, UnifiedBatchItem

    start = time.perf_counter()
    try:  # the next call (a new sequence) fails fast too
        item = UnifiedBatchItem("again", [5, 6], EngineHandle("again"), 0, True)
        asyncio.run(ex.unified_decode(UnifiedBatch([item])))
    except FerrumError as e:
        killed.update(again_s=time.perf_counter() - start, again=str(e))
    asyncio.run(ex.shutdown())
    print("KILLED " + json.dumps(killed), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    main(sys.argv[1:])
