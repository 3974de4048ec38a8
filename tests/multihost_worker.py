"""One process of a 2-process x 4 CPU device job (gloo) for `test_multihost.py`.

    python tests/multihost_worker.py match PID PORT   # global mesh, one-process reference, replicas
    python tests/multihost_worker.py kill PID PORT    # the leader serves until its follower dies
    python tests/multihost_worker.py bench PID PORT TRANSPORT  # tokens/s, plan overheads

Process 0 leads and prints one `RESULT {json}` line (plus `SERVING` once warm, in `kill`);
process 1 follows. Importing this module sets nothing up.
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


def serve(executor) -> tuple[dict[str, list[int]], float]:
    """Tokens by request id, and tokens/s of a second, compiled pass over the same requests."""
    from ferrum_jax.engine_loop import run_unified

    tokens = {}
    for _ in range(2):
        start = time.perf_counter()
        results = asyncio.run(run_unified(executor, requests(), **LOOP))
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
        serve_follower(m, mesh=mesh, multihost=config, **OPTIONS)
        if mode != "kill":
            serve_follower(m, replica=True, mesh=local_mesh, multihost=config, **OPTIONS)
        return
    out: dict = {"processes": jax.process_count(), "devices": len(jax.devices())}
    ex = JaxModelExecutor(m, mesh=mesh, multihost=config, **OPTIONS)
    if mode == "kill":
        serve(ex)
        print("SERVING", flush=True)
        try:
            while True:
                serve(ex)
        except FerrumError as e:
            out.update(raised_at=time.time(), kind=e.kind.name, message=str(e))
        start = time.perf_counter()
        try:  # the next call fails fast too
            serve(ex)
        except FerrumError as e:
            out.update(again_s=time.perf_counter() - start, again=str(e))
        asyncio.run(ex.shutdown())
        print("RESULT " + json.dumps(out), flush=True)
        return
    out["mesh"], out["mesh_tok_s"] = serve(ex)
    out["mesh_plans"] = per_plan_ms(ex._link.stats)
    out["mesh_cache"] = ex.cache_metrics_snapshot()
    asyncio.run(ex.shutdown())
    replicas = ReplicatedExecutor(m, mesh=local_mesh, multihost=config, **OPTIONS)
    out["replicas"], out["replicas_tok_s"] = serve(replicas)
    out["replica_plans"] = per_plan_ms(replicas.link_stats[0])
    out["replica_cache"] = replicas.cache_metrics_snapshot()
    asyncio.run(replicas.shutdown())
    if mode == "match":
        one = JaxModelExecutor(m, **OPTIONS)  # this process's first device alone
        out["one"], out["one_tok_s"] = serve(one)
        asyncio.run(one.shutdown())
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    main(sys.argv[1:])
