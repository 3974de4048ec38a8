"""Families on the (2, 4) virtual mesh, in a fresh process (driven by test_families.py).

    python tests/families_worker.py JOBS.json

`JOBS.json` lists `{"name", "dir", "prompt", "steps", "rules"}`: each HF checkpoint is loaded
with `load_model`, sharded on a data=2,model=4 mesh by `rules` (`"default"` or
`"expert_tp"`), and decoded greedily through `engine.prefill`/`engine.decode` on a sharded
cache. Prints one `RESULT {...}` line: per job its tokens and how its expert weights were
split.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(jobs_file: str) -> None:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ferrum_jax import engine, sharding
    from ferrum_jax.cache import init_cache
    from ferrum_jax.checkpoint import load_model

    rules = {"default": None, "expert_tp": sharding.EXPERT_TENSOR_PARALLEL_RULES}
    mesh = sharding.make_mesh(data=2, model=4)
    out = {}
    with open(jobs_file) as f:
        jobs = json.load(f)
    for job in jobs:
        model = load_model(job["dir"]).on_mesh(mesh, rules=rules[job["rules"]])
        config = model.runtime_config
        cache = sharding.shard_cache(init_cache(config, 2, 64), mesh)
        prompt = np.asarray([job["prompt"]] * 2, np.int32)  # two rows: the data axis splits them
        logits, cache = engine.prefill(model.graphdef, model.params, cache, prompt)
        tokens = [int(np.argmax(sharding.to_host(logits)[0]))]
        for _ in range(job["steps"] - 1):
            step = jnp.asarray([tokens[-1]] * 2, jnp.int32)
            logits, cache = engine.decode(model.graphdef, model.params, cache, step)
            tokens.append(int(np.argmax(sharding.to_host(logits)[0])))
        specs = {
            ".".join(map(str, path)): str(var.get_value().sharding.spec)
            for path, var in nnx.to_flat_state(model.params)
            if path[-1] in ("gate_up_proj", "down_proj") and "mlp" in path
        }
        out[f"{job['name']}/{job['rules']}"] = {"tokens": tokens, "specs": specs}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
