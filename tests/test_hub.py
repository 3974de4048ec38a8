"""Hub names (`org/name`) resolve offline through a Hugging Face cache laid out in a temp
directory (`HF_HUB_CACHE`, `refs/<revision>`, `snapshots/<commit>/...`, blobs): an HF
safetensors repo at `main`, at a tag and at a commit; a GGUF repo (its single `.gguf`, or
one of several chosen with `gguf_file` / `--gguf-file`); a missing id offline fails with one
error naming both the path and the cache. Downloads (mocked: no network here) never take
pickled weights. A `revision` or `gguf_file` that is not a name, or a cached `refs/` file
leading out of the cache, is one `invalid_parameter` error."""

from __future__ import annotations

import fnmatch
import json
import pathlib

import huggingface_hub.errors
import jax
import numpy as np
import pytest
import safetensors.numpy
from hub_layout import add_snapshot

from ferrum_jax import ErrorKind, FerrumError, JaxModelExecutor, Model, ModelConfig, load_model
from ferrum_jax.checkpoint import default_model_path, hf_state_dict, model_format
from ferrum_jax.checkpoint import hub as hub_module
from ferrum_jax.checkpoint.hf_config import write_config
from ferrum_jax.cli import main

CONFIG = ModelConfig.from_hf(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "eos_token_id": 2,
    }
)
MAIN, V1 = "a" * 40, "b" * 40
"""Commits of the tiny repo: `refs/main` and `refs/v1`."""


def _export(model: Model, root: pathlib.Path) -> dict[str, pathlib.Path]:
    """An HF safetensors directory of `model` (what the hub would serve)."""
    root.mkdir(parents=True)
    state = {k: np.ascontiguousarray(v) for k, v in hf_state_dict(CONFIG, model.params).items()}
    safetensors.numpy.save_file(state, root / "model.safetensors")
    write_config(CONFIG, root)
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Model, dict[str, pathlib.Path]]]:
    sources = tmp_path_factory.mktemp("sources")
    out = {}
    for name, seed in (("main", 0), ("v1", 1)):
        model = Model.init(CONFIG, seed=seed)
        out[name] = (model, _export(model, sources / name))
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty hub cache, offline; the working directory has no `org/` folder."""
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return root


def _same_params(a: Model, b: Model) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True)
    )


def test_hf_repo_resolves_offline_by_revision(cache, models):
    main_model, main_files = models["main"]
    v1_model, v1_files = models["v1"]
    main_snapshot = add_snapshot(cache, "org/tiny", main_files, commit=MAIN)
    v1_snapshot = add_snapshot(cache, "org/tiny", v1_files, commit=V1, revision="v1")
    assert hub_module.is_repo_id("org/tiny") and not hub_module.is_repo_id("/org/tiny")

    loaded = load_model("org/tiny")
    assert (loaded.format, loaded.source) == ("hf", str(main_snapshot))
    assert _same_params(loaded, main_model)
    for revision in ("v1", V1):  # a tag, and the commit itself
        assert model_format("org/tiny", revision=revision) == (v1_snapshot, "hf")
    assert _same_params(load_model("org/tiny", revision="v1"), v1_model)
    assert not _same_params(v1_model, main_model)

    executor = JaxModelExecutor.from_pretrained(
        "org/tiny", max_batch_size=1, max_sequence_length=32
    )
    assert executor.model.source == str(main_snapshot)


def test_gguf_repo_single_file_or_chosen(cache, capsys):
    gguf = default_model_path()
    snapshot = add_snapshot(cache, "org/smol-GGUF", {gguf.name: gguf}, commit=MAIN)
    assert model_format("org/smol-GGUF") == (snapshot / gguf.name, "gguf")

    assert main(["info", "--model", "org/smol-GGUF", "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["source"]) == ("gguf", str(snapshot / gguf.name))

    # A repo of several quantizations: one must be chosen.
    two = add_snapshot(
        cache, "org/smol-GGUF", {"q4.gguf": gguf, "sub/q8.gguf": gguf}, commit=V1, revision="two"
    )
    with pytest.raises(FerrumError) as e:
        model_format("org/smol-GGUF", revision="two")
    assert "several .gguf files (q4.gguf, sub/q8.gguf)" in e.value.message
    assert "--gguf-file" in e.value.message
    assert model_format("org/smol-GGUF", revision="two", gguf_file="sub/q8.gguf") == (
        two / "sub" / "q8.gguf",
        "gguf",
    )
    argv = ["info", "--model", "org/smol-GGUF", "--revision", "two", "--gguf-file", "q4.gguf"]
    assert main([*argv, "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == str(two / "q4.gguf")


def test_missing_id_offline_names_path_and_cache(cache, capsys):
    with pytest.raises(FerrumError) as e:
        load_model("org/missing")
    assert e.value.kind is ErrorKind.NOT_FOUND
    message = e.value.message
    assert message.startswith("org/missing: no such file or directory")
    assert f"not in the Hugging Face cache {cache}" in message and "HF_HUB_OFFLINE" in message

    code = main(["generate", "--model", "org/missing", "--prompt", "hi", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("ferrum-jax: error: --model org/missing: no such file or directory")

    # revision / gguf_file mean nothing for a local path.
    with pytest.raises(FerrumError, match="apply to hub names"):
        model_format(default_model_path(), revision="v1")
    code = main(["info", "--gguf-file", "x.gguf", "--quiet"])
    assert code == 2 and "need a hub name" in capsys.readouterr().err


class _FakeHub:
    """`huggingface_hub` as `hub.resolve` uses it, with a repo of `files` "online": nothing
    in the cache, downloads recorded (no network is reached)."""

    errors = huggingface_hub.errors

    def __init__(self, files: list[str], root: pathlib.Path) -> None:
        self.files, self.root, self.calls = files, root, []

    def HfApi(self):  # the library's name
        return self

    def list_repo_files(self, repo_id, revision=None):
        return self.files

    def snapshot_download(self, repo_id, *, local_files_only=False, allow_patterns=(), **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        self.calls.append(("snapshot", list(allow_patterns)))
        return str(self.root)

    def hf_hub_download(self, repo_id, filename, **kw):
        self.calls.append(("file", filename))
        return str(self.root / filename)


@pytest.mark.parametrize(
    ("files", "expect"),
    [
        (["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"], "snapshot"),
        (["README.md", "m-Q4_0.gguf"], "m-Q4_0.gguf"),
        (["config.json", "pytorch_model.bin"], "pickled weights"),
        (["README.md"], "no safetensors or .gguf weights"),
    ],
)
def test_downloads_never_take_pickles(cache, monkeypatch, files, expect):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    root = cache / "models--org--online" / "snapshots" / MAIN
    root.mkdir(parents=True)
    fake = _FakeHub(files, root)
    monkeypatch.setattr(hub_module, "_hub", lambda: fake)
    if expect in ("snapshot", "m-Q4_0.gguf"):
        where = root if expect == "snapshot" else root / expect
        assert hub_module.resolve("org/online") == where
        ((kind, what),) = fake.calls
        if kind == "snapshot":
            fetched = [f for f in files if any(fnmatch.fnmatch(f, p) for p in what)]
            assert fetched == ["config.json", "model.safetensors", "tokenizer.json"]
        else:
            assert what == expect
        return
    with pytest.raises(FerrumError, match=expect):
        hub_module.resolve("org/online")
    assert fake.calls == []


def test_a_failed_download_names_both(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake = _FakeHub([], tmp_path)

    def unreachable(repo_id, revision=None):
        raise OSError("network is unreachable")

    fake.list_repo_files = unreachable
    monkeypatch.setattr(hub_module, "_hub", lambda: fake)
    with pytest.raises(FerrumError) as e:
        load_model("org/online")
    assert e.value.kind is ErrorKind.NOT_FOUND
    assert "org/online: no such file or directory, not in the Hugging Face cache" in e.value.message
    assert "downloading it failed: OSError: network is unreachable" in e.value.message


@pytest.mark.parametrize(
    "revision",
    [
        "../../../evilref",
        "/etc/passwd",
        "",
        "..",
        ".",
        123,
        "a//b",
        "main/",
        ".hidden",
        "a\\b",
        "a\x00b",
        "a b",
        "main.lock",
        "v1.",
        "a@{1}",
        "@",
    ],
)
def test_revision_not_a_ref_name_is_one_invalid_parameter(cache, models, revision):
    add_snapshot(cache, "org/tiny", models["main"][1], commit=MAIN)
    with pytest.raises(FerrumError) as e:
        load_model("org/tiny", revision=revision)
    assert e.value.kind is ErrorKind.INVALID_PARAMETER
    assert "revision" in e.value.message and repr(revision) in e.value.message


def test_revision_names_with_slashes_still_resolve(cache, models):
    snapshot = add_snapshot(cache, "org/tiny", models["v1"][1], commit=V1)
    refs = cache / "models--org--tiny" / "refs"
    for name in ("refs/pr/1", "feature/x-1.2"):
        (refs / name).parent.mkdir(parents=True, exist_ok=True)
        (refs / name).write_text(V1)
        assert model_format("org/tiny", revision=name) == (snapshot, "hf")


def test_cached_ref_leading_out_of_the_cache_is_refused(cache, models, tmp_path):
    """A `refs/main` holding `../` would make the library hand back a folder outside the
    cache (here a complete model next to it)."""
    add_snapshot(cache, "org/tiny", models["main"][1], commit=MAIN)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, source in models["v1"][1].items():
        (outside / name).write_bytes(source.read_bytes())
    (cache / "models--org--tiny" / "refs" / "main").write_text("../../../outside")
    with pytest.raises(FerrumError) as e:
        load_model("org/tiny")
    assert e.value.kind is ErrorKind.INVALID_PARAMETER
    assert "outside" in e.value.message and "refs/" in e.value.message
    # A ref pointing at the snapshots folder itself would glob everything below it.
    (cache / "models--org--tiny" / "refs" / "main").write_text(".")
    with pytest.raises(FerrumError, match="outside"):
        model_format("org/tiny")


def test_failed_download_falling_back_on_a_hostile_ref_is_refused(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake = _FakeHub(["config.json", "model.safetensors"], tmp_path)
    monkeypatch.setattr(hub_module, "_hub", lambda: fake)
    with pytest.raises(FerrumError, match="outside"):
        hub_module.resolve("org/online")


@pytest.mark.parametrize(
    "gguf_file",
    [
        "../x.gguf",
        "sub/../../x.gguf",
        "/etc/passwd",
        "",
        "a\\b.gguf",
        5,
        "model.bin",
        "a//b.gguf",
        "x\n.gguf",
    ],
)
def test_gguf_file_not_a_file_name_is_one_invalid_parameter(cache, gguf_file):
    gguf = default_model_path()
    add_snapshot(cache, "org/smol-GGUF", {gguf.name: gguf}, commit=MAIN)
    with pytest.raises(FerrumError) as e:
        model_format("org/smol-GGUF", gguf_file=gguf_file)
    assert e.value.kind is ErrorKind.INVALID_PARAMETER
    assert "gguf_file" in e.value.message and repr(gguf_file) in e.value.message
