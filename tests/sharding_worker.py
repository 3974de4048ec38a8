"""Mesh checks run in a fresh process with virtual CPU devices (driven by test_sharding.py).

`XLA_FLAGS=--xla_force_host_platform_device_count=N` only works before JAX is imported, and
the pytest process has already imported it with one device, so the tests run this script:

    python tests/sharding_worker.py mesh                      # 8 devices, every mesh shape
    python tests/sharding_worker.py host PID PORT CKPT_DIR    # 1 of 2 processes, 4 devices each

Each prints one JSON line prefixed with `RESULT ` that the test parses. Importing this module
(as the test does, for the configs) sets nothing up.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
import zlib

import numpy as np

PROMPT_SLOTS = 8
MAX_LEN = 32
DECODE_STEPS = 3
NEW_TOKENS = 6
MESHES = {
    "gqa": [(1, 1), (1, 2), (2, 4), (1, 8), (8, 1)],
    "smol": [(1, 2), (2, 4), (1, 8)],
}
"""Mesh shapes run per config; greedy decoding is checked on all of them."""
GENERATE_MESHES = {(2, 4)}
"""Meshes that also run `engine.generate` (its while-loop program is slow to compile on CPU)."""


def configs():
    """Tiny test configs: name -> ModelConfig."""
    from ferrum_jax.models.config import ModelConfig

    gqa = ModelConfig(
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=252,  # not a multiple of 8: vocab replicated at model=8
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        head_dim=8,
        eos_token_ids=(),
    )
    # SmolLM2-135M's head shape (9 query heads, 3 KV heads), tied embeddings, with q/k/v
    # biases so that bias copying is exercised too.
    smol = ModelConfig(
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        vocab_size=256,
        hidden_size=144,
        intermediate_size=256,
        num_layers=2,
        num_heads=9,
        num_kv_heads=3,
        head_dim=16,
        qkv_bias=True,
        tie_word_embeddings=True,
        eos_token_ids=(),
    )
    return {"gqa": gqa, "smol": smol}


def read_tensor(tensor) -> np.ndarray:
    """Deterministic weights by tensor name (same in every process), wide enough that greedy
    argmax has clear winners."""
    rng = np.random.default_rng(zlib.crc32(tensor.name.encode()))
    w = rng.normal(0.0, 0.1, tensor.shape).astype(np.float32)
    return 1.0 + w if tensor.name.endswith("norm.weight") else w


def save_checkpoint(path) -> None:
    """Writes the "smol" config with `read_tensor` weights as an HF safetensors directory."""
    import json
    import pathlib

    from safetensors.numpy import save_file

    from ferrum_jax.checkpoint import checkpoint_layout

    config = configs()["smol"]
    root = pathlib.Path(path)
    (root / "config.json").write_text(json.dumps(config.to_hf()))
    tensors = {t.name: read_tensor(t) for t in checkpoint_layout(config)}
    save_file(tensors, str(root / "model.safetensors"))


def prompts(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, vocab, (PROMPT_SLOTS, 12)).astype(np.int32)
    lengths = np.array([12, 5, 9, 12, 1, 7, 3, 10], np.int32)
    return tokens, lengths


def _setup(devices: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def _emit(result) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Single-process runs of one config.


def _run(engine, graphdef, params, cache, tokens, lengths, to_host, generate=True):
    """Prefill, DECODE_STEPS greedy decode steps (and a whole `generate`), on host arrays."""
    import jax
    import jax.numpy as jnp

    out = {"shardings": [], "donation": []}
    record = lambda c: [x.sharding for x in (*jax.tree.leaves(c.pages), c.lengths)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["shardings"].append(record(cache))
        logits, cache = engine.prefill(graphdef, params, cache, tokens, lengths)
        out["shardings"].append(record(cache))
        out["prefill"] = to_host(logits)
        step_logits, step_tokens = [], []
        token = jnp.asarray(out["prefill"].argmax(-1), jnp.int32)
        active = jnp.asarray(np.arange(PROMPT_SLOTS) != 2)  # one idle row
        for _ in range(DECODE_STEPS):
            logits, cache = engine.decode(graphdef, params, cache, token, active=active)
            out["shardings"].append(record(cache))
            host = to_host(logits)
            step_logits.append(host)
            step_tokens.append(host.argmax(-1))
            token = jnp.asarray(step_tokens[-1], jnp.int32)
        out["decode"] = np.stack(step_logits)
        out["decode_tokens"] = np.stack(step_tokens)
        out["cache"] = cache
        if generate:
            gen = engine.generate(
                graphdef, params, tokens[:4], lengths[:4], max_new_tokens=NEW_TOKENS
            )
            out["generate"] = to_host(gen.tokens)
    out["donation"] = [str(w.message) for w in caught if "donat" in str(w.message).lower()]
    return out


_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_shapes(hlo: str, op: str) -> list[list[tuple[int, ...]]]:
    """For each `op` instruction of compiled HLO text: the shapes of its result and operands."""
    found = []
    for line in hlo.splitlines():
        match = re.match(
            rf"\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s{re.escape(op)}(?:-start)?\((.*)", line
        )
        if match is None:
            continue
        result, rest = match.group(1), match.group(2).split(")", 1)[0]
        shapes = [
            tuple(int(d) for d in dims.split(",") if d)
            for _, dims in _SHAPE.findall(result + " " + rest)
        ]
        found.append(shapes)
    return found


def _mesh_checks() -> dict:
    import jax
    import jax.numpy as jnp

    from ferrum_jax import engine
    from ferrum_jax.cache import init_cache
    from ferrum_jax.checkpoint import load_for_mesh, params_from_checkpoint
    from ferrum_jax.errors import FerrumError
    from ferrum_jax.sharding import (
        make_mesh,
        parse_mesh,
        prepare_for_mesh,
        shard_cache,
        to_host,
    )

    result: dict = {"devices": len(jax.devices()), "configs": {}}
    for name, config in configs().items():
        graphdef, params = params_from_checkpoint(config, read_tensor)
        tokens, lengths = prompts(config.vocab_size)
        ref = _run(
            engine,
            graphdef,
            params,
            init_cache(config, PROMPT_SLOTS, MAX_LEN),
            tokens,
            lengths,
            to_host,
        )
        per_mesh = {}
        for data, model in MESHES[name]:
            t0 = time.perf_counter()
            mesh = make_mesh(data, model)
            cfg2, g2, p2 = prepare_for_mesh(config, graphdef, params, mesh)
            cache = shard_cache(init_cache(cfg2, PROMPT_SLOTS, MAX_LEN), mesh)
            # The checkpoint path: sharded while loading; must equal prepare_for_mesh's.
            cfg3, _, p3 = load_for_mesh(config, read_tensor, mesh)
            same_load = cfg3 == cfg2 and all(
                np.array_equal(np.asarray(a), np.asarray(b))
                and a.sharding.is_equivalent_to(b.sharding, a.ndim)
                for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p3), strict=True)
            )
            generate = (data, model) in GENERATE_MESHES
            run = _run(engine, g2, p2, cache, tokens, lengths, to_host, generate)
            first = run["shardings"][0]
            stable = all(
                a.is_equivalent_to(b, 4 if i < len(first) - 1 else 1)
                for later in run["shardings"][1:]
                for i, (a, b) in enumerate(zip(first, later, strict=True))
            )
            kv_spec = list(first[0].spec) + [None] * (4 - len(first[0].spec))
            # Compiled decode step: no all-gather may move a whole weight matrix.
            weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(p2) if x.ndim >= 2}
            weight_shapes |= {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim >= 2}
            token = jnp.zeros((PROMPT_SLOTS,), jnp.int32)
            hlo = (
                engine.decode_step.lower(
                    g2, p2, run["cache"], token, None, jnp.ones((PROMPT_SLOTS,), bool)
                )
                .compile()
                .as_text()
            )
            gathers = collective_shapes(hlo, "all-gather")
            per_mesh[f"{data}x{model}"] = {
                "heads": [cfg2.num_heads, cfg2.num_kv_heads],
                "kv_spec": [str(s) for s in kv_spec],
                "embed_spec": [str(s) for s in p2["embed"].get_value().sharding.spec],
                "prefill_err": float(np.abs(run["prefill"] - ref["prefill"]).max()),
                "decode_err": float(np.abs(run["decode"] - ref["decode"]).max()),
                "decode_tokens_equal": bool(
                    np.array_equal(run["decode_tokens"], ref["decode_tokens"])
                ),
                "generate_equal": (
                    bool(np.array_equal(run["generate"], ref["generate"])) if generate else None
                ),
                "load_equal": bool(same_load),
                "cache_sharding_stable": bool(stable),
                "donation_warnings": run["donation"],
                "all_gathers": len(gathers),
                "all_reduces": len(collective_shapes(hlo, "all-reduce")),
                "weight_all_gathers": [
                    s for shapes in gathers for s in shapes if tuple(s) in weight_shapes
                ],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            print(name, data, model, per_mesh[f"{data}x{model}"]["seconds"], file=sys.stderr)
        result["configs"][name] = {
            "generate": ref["generate"].tolist(),
            "prefill": ref["prefill"].tolist() if name == "smol" else None,
            "meshes": per_mesh,
        }

    # Bad meshes: each must raise a FerrumError with a clear message.
    gqa = configs()["gqa"]
    g, p = params_from_checkpoint(gqa, read_tensor)
    bad = {
        "too_many_devices": lambda: make_mesh(2, 8),
        "too_many_model": lambda: make_mesh(1, 9),
        "zero": lambda: make_mesh(0, 2),
        "negative": lambda: make_mesh(1, -4),
        "not_int": lambda: make_mesh(1, 2.0),
        "parse_axis": lambda: parse_mesh("data=2,tensor=4"),
        "parse_value": lambda: parse_mesh("model=four"),
        "parse_zero": lambda: parse_mesh("data=0,model=2"),
        "unpaddable": lambda: prepare_for_mesh(gqa, g, p, make_mesh(1, 3), pad_heads=False),
    }
    errors = {}
    for case, fn in bad.items():
        try:
            fn()
            errors[case] = None
        except FerrumError as e:
            errors[case] = f"{e.kind.name}: {e}"
        except Exception as e:  # a non-Ferrum error is a failure the test reports
            errors[case] = f"NOT FERRUM {type(e).__name__}: {e}"
    result["bad_meshes"] = errors
    return result


def _host_checks(process_id: int, port: int, checkpoint: str) -> dict:
    import jax

    from ferrum_jax import engine
    from ferrum_jax.cache import init_cache
    from ferrum_jax.checkpoint import load_model
    from ferrum_jax.sharding import initialize, is_primary, make_mesh, shard_cache, to_host

    initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    mesh = make_mesh(2, 4)
    config = configs()["smol"]
    # Every process reads the same checkpoint straight into its own shards.
    loaded = load_model(checkpoint, mesh=mesh)
    assert loaded.model_config == config
    cfg2, g2, p2 = loaded.runtime_config, loaded.graphdef, loaded.params
    tokens, lengths = prompts(config.vocab_size)
    cache = shard_cache(init_cache(cfg2, PROMPT_SLOTS, MAX_LEN), mesh)
    logits, cache = engine.prefill(g2, p2, cache, tokens, lengths)
    gen = engine.generate(g2, p2, tokens[:4], lengths[:4], max_new_tokens=NEW_TOKENS)
    prefill, generated = to_host(logits), to_host(gen.tokens)
    return {
        "process": jax.process_index(),
        "primary": is_primary(),
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "heads": [cfg2.num_heads, cfg2.num_kv_heads],
        "params_addressable": all(x.is_fully_addressable for x in jax.tree.leaves(p2)),
        "generate": generated.tolist(),
        "prefill": prefill.tolist(),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["mesh"]:
        _setup(8)
        _emit(_mesh_checks())
    elif argv[:1] == ["host"]:
        _setup(4)
        _emit(_host_checks(int(argv[1]), int(argv[2]), argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
