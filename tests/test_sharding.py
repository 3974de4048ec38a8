"""Meshes, logical-axis rules, exact head replication/padding, SPMD runs and multi-host.

The pytest process has one CPU device, so everything needing a mesh runs in
`tests/sharding_worker.py` subprocesses with virtual CPU devices: one run covers every mesh
shape (8 devices), and one pair of processes (4 devices each) forms a 2-host (2, 4) mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from ferrum_jax import engine
from ferrum_jax.checkpoint import params_from_checkpoint
from ferrum_jax.errors import ErrorKind, FerrumError
from ferrum_jax.models.attention import COMBINED
from ferrum_jax.sharding import (
    adapt_heads,
    exact_model_sizes,
    head_layout,
    initialize,
    is_primary,
    logical_to_spec,
    make_mesh,
    param_shardings,
    parse_mesh,
)

sys.path.insert(0, str(Path(__file__).parent))
import sharding_worker as worker

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharding_worker.py"
MESH_TIMEOUT_S = 300
HOSTS_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# In-process: parsing, rules and head layout math (one device).


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("data=2,model=4", (2, 4)),
        ("model=8", (1, 8)),
        ("data=8", (8, 1)),
        (" model = 2 , data = 3 ", (3, 2)),
        ("", (1, 1)),
    ],
)
def test_parse_mesh(spec, want):
    assert parse_mesh(spec) == want


@pytest.mark.parametrize(
    "spec", ["data=2;model=4", "tensor=2", "model=x", "model=0", "data=-1", "data=1,data=2", "4"]
)
def test_parse_mesh_rejects(spec):
    with pytest.raises(FerrumError) as e:
        parse_mesh(spec)
    assert e.value.kind is ErrorKind.INVALID_PARAMETER
    assert spec.strip() in str(e.value) or "must be >= 1" in str(e.value)


def test_make_mesh_single_device():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    n = len(jax.devices())
    with pytest.raises(FerrumError, match=f"needs {2 * n} devices, {n} available") as e:
        make_mesh(2, n)
    assert e.value.kind is ErrorKind.DEVICE
    for data, model in [(0, 1), (1, 0), (-2, 1)]:
        with pytest.raises(FerrumError, match="must be >= 1") as e:
            make_mesh(data, model)
        assert e.value.kind is ErrorKind.INVALID_PARAMETER
    assert is_primary()


def test_initialize_after_jax_started_is_a_ferrum_error():
    jax.devices()  # the backend is up in this process
    with pytest.raises(FerrumError, match="before any JAX") as e:
        initialize("localhost:1", num_processes=2, process_id=0, timeout_s=5)
    assert e.value.kind is ErrorKind.DEVICE


def test_collective_parser():
    """The HLO scan the decode check relies on finds sync and async all-gathers."""
    hlo = """
  %all-gather.3 = f32[64,8,8]{2,1,0} all-gather(%fusion.1), channel_id=3, dimensions={1}
  %ag-start = (f32[64,2,8]{2,1,0}, f32[64,8,8]{2,1,0}) all-gather-start(f32[64,2,8]{2,1,0} %p)
  ROOT %all-reduce = f32[4,1,144]{2,1,0} all-reduce(%x), to_apply=%add
  %fusion.2 = f32[8,8]{1,0} fusion(%all-gather.3), kind=kLoop
"""
    assert worker.collective_shapes(hlo, "all-gather") == [
        [(64, 8, 8)],
        [(64, 2, 8), (64, 8, 8), (64, 2, 8)],
    ]
    assert worker.collective_shapes(hlo, "all-reduce") == [[(4, 1, 144)]]


def test_logical_rules():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    spec = lambda axes, shape: logical_to_spec(axes, shape, mesh)
    assert spec(("embed", "heads", "head_dim"), (64, 8, 8)) == PartitionSpec(None, "model", None)
    assert spec(("heads", "head_dim", "embed"), (8, 8, 64)) == PartitionSpec("model", None, None)
    assert spec(("embed", "mlp"), (64, 128)) == PartitionSpec(None, "model")
    assert spec(("mlp", "embed"), (128, 64)) == PartitionSpec("model", None)
    assert spec(("vocab", "embed"), (256, 64)) == PartitionSpec("model", None)
    assert spec(("embed",), (64,)) == PartitionSpec(None)
    (pages,) = COMBINED.axes  # [pages, page_size, 2 * kv_heads, head_dim]
    assert spec(pages, (8, 16, 4, 16)) == PartitionSpec("data", None, "model", None)
    # Not divisible -> replicated (exact), never split unevenly; head_dim is never split.
    assert spec(("vocab", "embed"), (250, 64)) == PartitionSpec(None, None)
    assert spec(pages, (3, 16, 6, 16)) == PartitionSpec(None, None, None, None)
    assert spec(("kv_heads", "head_dim"), (2, 64)) == PartitionSpec(None, None)
    # One mesh axis shards one dim at most; unknown names are replicated.
    assert spec(("heads", "mlp"), (8, 8)) == PartitionSpec("model", None)
    assert spec(("whatever", "batch"), (4, 4)) == PartitionSpec(None, "data")


def test_param_shardings_cover_every_param():
    config = worker.configs()["smol"]
    mesh = make_mesh()
    _, params = params_from_checkpoint(config, worker.read_tensor)
    shardings = param_shardings(params, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    placed = jax.device_put(params, shardings)
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(placed))


@pytest.mark.parametrize("model", range(1, 13))
def test_head_layout_keeps_gqa_groups(model):
    config = worker.configs()["smol"]  # SmolLM2: 9 query heads, 3 KV heads
    layout = head_layout(config, model)
    assert layout.kv_heads % model == 0 and layout.heads % model == 0
    assert layout.kv_heads % config.num_kv_heads == 0  # whole copies of every KV head
    assert layout.heads % layout.kv_heads == 0
    old_group = config.num_heads // config.num_kv_heads
    q, kv = layout.q_source(), layout.kv_source()
    real = q[q >= 0]
    assert sorted(real.tolist()) == list(range(config.num_heads))  # each head exactly once
    for j in np.flatnonzero(q >= 0):
        # New query head j attends to new KV head j // group, a copy of its old KV head.
        assert kv[j // layout.group] == q[j] // old_group
    if model in (1, 3):
        assert layout.is_identity


def test_head_layout_sizes():
    config = worker.configs()["smol"]
    got = {m: (head_layout(config, m).heads, head_layout(config, m).kv_heads) for m in (2, 4, 8)}
    assert got == {2: (12, 6), 4: (12, 12), 8: (24, 24)}
    assert exact_model_sizes(config, 9) == [1, 3, 9]
    gqa = worker.configs()["gqa"]
    assert (head_layout(gqa, 8).heads, head_layout(gqa, 8).kv_heads) == (8, 8)  # no padding
    assert exact_model_sizes(gqa, 8) == [1, 2, 4, 8]


def test_adapt_heads_is_exact_on_one_device():
    """Replicated KV heads + zero-padded query heads give the same logits, no mesh needed."""
    config = worker.configs()["smol"]
    graphdef, params = params_from_checkpoint(config, worker.read_tensor)
    tokens, lengths = worker.prompts(config.vocab_size)
    ref = np.asarray(engine.forward(graphdef, params, tokens[:2], lengths[:2]))
    cfg8, g8, p8 = adapt_heads(config, graphdef, params, 8)  # 9/3 -> 24/24: 15 pad heads
    assert (cfg8.num_heads, cfg8.num_kv_heads, cfg8.head_dim) == (24, 24, config.head_dim)
    out = np.asarray(engine.forward(g8, p8, tokens[:2], lengths[:2]))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    qkv = np.asarray(p8["layers"][0]["attn"]["qkv_proj"].get_value())  # [e, kv, group + 2, d]
    q = qkv[:, :, :-2]  # each KV head's query slots
    assert np.count_nonzero(np.abs(q).sum(axis=(0, 3)) == 0) == 15
    with pytest.raises(FerrumError, match="config says"):
        adapt_heads(cfg8, graphdef, params, 8)


# ---------------------------------------------------------------------------------------------
# Subprocesses with virtual devices.


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _result(stdout: str, stderr: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(
        f"worker printed no result.\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    )


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
    proc.wait()


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "mesh"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=MESH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"mesh worker did not finish in {MESH_TIMEOUT_S} s")
    finally:
        _kill(proc)
    assert proc.returncode == 0, f"mesh worker failed:\n{stderr[-5000:]}"
    return _result(stdout, stderr)


CASES = [(name, f"{d}x{m}") for name, meshes in worker.MESHES.items() for d, m in meshes]


@pytest.mark.parametrize(("config", "mesh"), CASES)
def test_mesh_matches_single_device(mesh_results, config, mesh):
    assert mesh_results["devices"] == 8
    r = mesh_results["configs"][config]["meshes"][mesh]
    assert r["prefill_err"] <= 1e-5, r
    assert r["decode_err"] <= 1e-5, r
    assert r["decode_tokens_equal"], r
    if r["generate_equal"] is not None:
        assert r["generate_equal"], r
    assert r["load_equal"], r  # load_for_mesh (placer) == prepare_for_mesh, values and shardings


@pytest.mark.parametrize(("config", "mesh"), CASES)
def test_mesh_shardings_and_collectives(mesh_results, config, mesh):
    r = mesh_results["configs"][config]["meshes"][mesh]
    data, model = map(int, mesh.split("x"))
    # The compiled decode step never all-gathers a whole weight matrix.
    assert r["weight_all_gathers"] == [], r
    if data == 1:
        assert r["all_gathers"] == 0, r
    # Cache shardings are the same after prefill and every decode (no resharding between
    # steps), and donation reuses the buffers.
    assert r["cache_sharding_stable"], r
    assert r["donation_warnings"] == [], r
    heads, kv_heads = r["heads"]
    assert heads % model == 0 and kv_heads % model == 0
    # Pages [pages, page_size, 2 * kv_heads, head_dim]: a cache's rows (pages) on data.
    want_kv = ["data" if data > 1 else "None", "None", "model" if model > 1 else "None", "None"]
    assert r["kv_spec"] == want_kv  # KV cache sharded on kv_heads like the heads writing it


def test_mesh_head_counts(mesh_results):
    smol = mesh_results["configs"]["smol"]["meshes"]
    assert {m: smol[m]["heads"] for m in smol} == {"1x2": [12, 6], "2x4": [12, 12], "1x8": [24, 24]}
    gqa = mesh_results["configs"]["gqa"]["meshes"]
    assert gqa["1x8"]["heads"] == [8, 8] and gqa["2x4"]["heads"] == [8, 4]
    assert gqa["1x8"]["embed_spec"] == ["None", "None"]  # vocab 252: replicated at model=8
    assert gqa["2x4"]["embed_spec"] == ["model", "None"]


def test_bad_meshes(mesh_results):
    errors = mesh_results["bad_meshes"]
    assert set(errors) >= {"too_many_devices", "zero", "negative", "unpaddable"}
    for case, message in errors.items():
        assert message is not None, f"{case} did not raise"
        assert not message.startswith("NOT FERRUM"), message
    assert errors["too_many_devices"].startswith("DEVICE")
    assert "needs 16 devices, 8 available" in errors["too_many_devices"]
    assert "needs 9 devices, 8 available" in errors["too_many_model"]
    assert "must be >= 1" in errors["zero"] and "must be >= 1" in errors["negative"]
    assert "model sizes that work: [1, 2, 4, 8" in errors["unpaddable"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(mesh_results, tmp_path):
    """2 processes x 4 CPU devices, one global (2, 4) mesh, gloo collectives, both loading the
    same safetensors checkpoint into their shards: same greedy tokens and prefill logits as
    the single-device run."""
    worker.save_checkpoint(tmp_path)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "host", str(i), str(port), str(tmp_path)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for i in range(2)
    ]
    outputs = []
    deadline = time.monotonic() + HOSTS_TIMEOUT_S
    try:
        for proc in procs:
            try:
                left = max(deadline - time.monotonic(), 1.0)
                outputs.append(proc.communicate(timeout=left))
            except subprocess.TimeoutExpired:
                pytest.fail(f"multi-host workers did not finish in {HOSTS_TIMEOUT_S} s")
    finally:
        for proc in procs:
            _kill(proc)
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"host worker failed:\n{stderr[-5000:]}"
    results = [_result(*out) for out in outputs]
    ref = mesh_results["configs"]["smol"]
    for i, r in enumerate(results):
        assert r["process"] == i and r["primary"] == (i == 0)
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 8, 4)
        assert not r["params_addressable"]  # each process holds only its shards
        assert r["heads"] == [12, 12]
        assert r["generate"] == ref["generate"]
        np.testing.assert_allclose(np.array(r["prefill"]), np.array(ref["prefill"]), atol=1e-5)
