"""Orbax: HF -> orbax -> back is bit-identical (params, config, tokenizer); dtype and
shardings on restore; an interrupted save (SIGKILL) never leaves a loadable directory."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import tiny_hf_model
from flax import nnx
from test_checkpoint_hf import write_tokenizer

import ferrum_jax.checkpoint.orbax as orbax_module
from ferrum_jax.checkpoint import load_hf, load_model, load_orbax, save_orbax
from ferrum_jax.errors import ErrorKind, FerrumError

# Runs save_orbax in a child that stalls once params, config.json and the tokenizer are
# written (the marker and the rename still to come), so the parent can SIGKILL it there.
KILLED_SAVE = r"""
import sys, time
import ferrum_jax.checkpoint.orbax as orbax_module
from ferrum_jax.checkpoint import load_hf

def stall(root):
    print("stalled", flush=True)
    time.sleep(600)

orbax_module._fsync_tree = stall
orbax_module.save_orbax(load_hf(sys.argv[1]), sys.argv[2])
"""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    tiny_hf_model("llama").save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def saved(hf_dir, tmp_path_factory):
    """(model loaded from HF, the orbax directory it was saved to)."""
    loaded = load_hf(hf_dir)
    dst = tmp_path_factory.mktemp("orbax") / "ckpt"
    save_orbax(loaded, dst)
    return loaded, dst


def flat_arrays(params) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)}


def test_round_trip_is_bit_identical(saved):
    original, dst = saved
    restored = load_model(dst)
    assert restored.format == "orbax" and restored.source == str(dst)
    assert restored.config == original.config
    want, got = flat_arrays(original.params), flat_arrays(restored.params)
    assert want.keys() == got.keys()
    for path, array in want.items():
        assert got[path].dtype == array.dtype, path
        np.testing.assert_array_equal(got[path], array, err_msg=str(path))
    tok, restored_tok = original.tokenizer, restored.tokenizer
    assert restored_tok is not None
    assert restored_tok.encode("hello world") == tok.encode("hello world")
    assert restored_tok.eos_token_ids == tok.eos_token_ids
    assert restored_tok.chat_template == tok.chat_template


def test_a_relative_path_saves_and_loads(saved, tmp_path, monkeypatch):
    """Orbax wants absolute paths: `convert tiny.gguf out` then `--model out` from the same
    folder must work (it said "the saved params hold 0 layers")."""
    original, _ = saved
    monkeypatch.chdir(tmp_path)
    save_orbax(original, "relative")
    restored = load_model("relative")
    want, got = flat_arrays(original.params), flat_arrays(restored.params)
    for path, array in want.items():
        np.testing.assert_array_equal(got[path], array, err_msg=str(path))


def test_load_model_places_each_param(saved):
    original, dst = saved
    seen = []

    def place(path, array):
        seen.append(path)
        return jax.device_put(array)

    restored = load_model(dst, place=place)
    want = flat_arrays(original.params)
    assert set(seen) == set(want)
    for path, array in flat_arrays(restored.params).items():
        np.testing.assert_array_equal(array, want[path])


def test_restore_to_bfloat16(saved):
    original, dst = saved
    restored = load_orbax(dst, dtype="bfloat16")
    want = flat_arrays(original.params)
    for path, array in flat_arrays(restored.params).items():
        assert array.dtype == jax.numpy.bfloat16, path
        np.testing.assert_array_equal(array, want[path].astype(jax.numpy.bfloat16))
    assert nnx.merge(restored.graphdef, restored.params).dtype == "bfloat16"


def test_restore_into_given_shardings(saved):
    original, dst = saved
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    seen = []

    def by_path(path):
        seen.append(path)
        return sharding

    for shardings in (by_path, jax.tree.map(lambda _: sharding, nnx.to_pure_dict(original.params))):
        restored = load_orbax(dst, shardings=shardings)
        assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(restored.params))
    assert set(seen) == set(flat_arrays(original.params))


def test_never_overwrites(saved):
    original, dst = saved
    with pytest.raises(FerrumError) as e:
        save_orbax(original, dst)
    assert e.value.kind is ErrorKind.ALREADY_EXISTS and str(dst) in e.value.message


def test_failed_save_cleans_up(saved, tmp_path, monkeypatch):
    original, _ = saved

    def fail(root):
        raise OSError("disk full")

    monkeypatch.setattr(orbax_module, "_fsync_tree", fail)
    with pytest.raises(OSError, match="disk full"):
        save_orbax(original, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_killed_save_leaves_nothing_loadable(hf_dir, tmp_path):
    dst = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(hf_dir), str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 300)
        assert ready and child.stdout.readline().strip() == "stalled"
    finally:
        child.kill()  # SIGKILL: no cleanup handler runs
        child.wait()
    assert not dst.exists()
    with pytest.raises(FerrumError) as e:
        load_orbax(dst)
    assert e.value.kind is ErrorKind.NOT_FOUND
    partial = list(tmp_path.iterdir())
    assert partial and all(p.name.startswith(".ckpt.partial-") for p in partial)
    assert (partial[0] / "params").is_dir() and (partial[0] / "config.json").is_file()
    for path in partial:
        for load in (load_orbax, load_model):
            with pytest.raises(FerrumError):
                load(path)


def test_version_1_checkpoints_still_load(saved, tmp_path):
    """A version-1 save (q/k/v and gate/up as separate params) loads into the fused params."""
    import json

    import orbax.checkpoint as ocp

    from ferrum_jax.checkpoint import hf_state_dict

    original, dst = saved
    config = original.config
    e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    state = hf_state_dict(config, original.params)
    pure = nnx.to_pure_dict(original.params)
    for i, layer in pure["layers"].items():
        p = f"model.layers.{i}."
        attn, mlp = layer["attn"], layer["mlp"]
        del attn["qkv_proj"], mlp["gate_up_proj"]
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            attn[f"{name}_proj"] = state[p + f"self_attn.{name}_proj.weight"].T.reshape(e, heads, d)
        for name in ("gate", "up"):
            mlp[f"{name}_proj"] = state[p + f"mlp.{name}_proj.weight"].T
    old = tmp_path / "v1"
    old.mkdir()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(old / "params", pure)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (old / "config.json").write_text((dst / "config.json").read_text())
    marker = json.loads((dst / orbax_module.ORBAX_MARKER).read_text())
    (old / orbax_module.ORBAX_MARKER).write_text(json.dumps({**marker, "version": 1}))
    restored = load_orbax(old)
    want, got = flat_arrays(original.params), flat_arrays(restored.params)
    assert want.keys() == got.keys()
    for path, array in want.items():
        np.testing.assert_array_equal(got[path], array, err_msg=str(path))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"num_hidden_layers": 10**6}, ["num_hidden_layers is 1000000", "hold 2 layers"]),
        ({"num_hidden_layers": 1}, ["num_hidden_layers is 1", "hold 2 layers"]),
        ({"intermediate_size": 96}, ["do not match config.json", "mlp"]),
    ],
    ids=["a_million_layers", "too_few_layers", "other_shapes"],
)
def test_config_contradicting_the_saved_params(saved, tmp_path, changes, words):
    """A `config.json` edited after the save is refused from the params' metadata, before
    anything is built: a million layers used to run for over 10 minutes."""
    _, src = saved
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(FerrumError) as e:
        load_orbax(dst)
    assert e.value.kind is ErrorKind.MODEL, e.value
    for word in words:
        assert word in str(e.value), (word, str(e.value))
