"""Shared test helpers: HF reference models (torch CPU fp32) copied into our params."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import tempfile

# Tests compile afresh: `cli.main` run in-process turns on the CLI's on-disk compilation
# cache for the whole process, which would then leak into every later test and into other
# processes reading the same directory.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import numpy as np
import pytest

from ferrum_jax.checkpoint import params_from_checkpoint
from ferrum_jax.models.config import ModelConfig

_RUNNER = os.environ.get("PYTEST_XDIST_WORKER", "main")
"""This test process: an xdist worker's id, or "main"."""
FAULT_LOG = os.environ.get(
    "FERRUM_FAULT_LOG",
    os.path.join(
        tempfile.gettempdir(),
        "ferrum-jax-faults.log" if _RUNNER == "main" else f"ferrum-jax-faults-{_RUNNER}.log",
    ),
)
"""Where a hard crash (segfault) leaves the test that was running and the crashing thread's
stack; `.ci/run` prints it. pytest's own faulthandler (off: `-p no:faulthandler`) dumps every
thread to stderr, and the executors' idle worker threads bury the one that crashed."""
_fault_log = None
# A pytest that a test runs in a subprocess inherits its runner's mark and leaves the log be.
if os.environ.get("FERRUM_FAULT_LOG_OWNER") != _RUNNER:
    os.environ["FERRUM_FAULT_LOG_OWNER"] = _RUNNER
    _fault_log = open(FAULT_LOG, "w")  # noqa: SIM115 - open for the whole session, by design
    faulthandler.enable(file=_fault_log, all_threads=False)


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _fault_log is not None:
        _fault_log.write(f"running {nodeid}\n")
        _fault_log.flush()


def _memory_mappings() -> int | None:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


MAX_MAPPINGS_AFTER_MODULE = 20_000
"""Memory mappings this process may hold once a test module's programs are released: Linux
refuses mappings past `vm.max_map_count` (65,530 by default) and XLA then segfaults."""


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drops every compiled XLA program after each test module. Each holds ~14 memory
    mappings (its code and constants) while JAX's caches keep it, and the suite compiles well
    over 5,000 programs (53k mappings 40% of the way through): the process reached the
    kernel's 65,530 and CI died with a segfault (exit 139) in whatever compiled next."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    held = _memory_mappings()
    assert held is None or held < MAX_MAPPINGS_AFTER_MODULE, (
        f"{held} memory mappings held after the module's programs were released: something "
        "keeps compiled programs alive (see release_compiled_programs)"
    )


def require_reference():
    """Imports torch + transformers; under CI=true their absence fails instead of skipping."""
    try:
        import torch
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        if os.environ.get("CI") == "true":
            pytest.fail(f"reference tests need torch and transformers under CI: {e}")
        pytest.skip(f"torch/transformers not installed: {e}")
    return torch, transformers


@pytest.fixture(scope="module")
def one_torch_thread():
    """The HF references are tiny: torch's thread pool would only fight XLA for the cores."""
    torch, _ = require_reference()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params_from_hf(hf_model, *, param_dtype=np.float32, dtype=None):
    """`(config, graphdef, params)` holding the weights of an HF `*ForCausalLM`."""
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    graphdef, params = params_from_checkpoint(
        config, lambda t: state[t.name], param_dtype=param_dtype, dtype=dtype
    )
    return config, graphdef, params


TINY_SIZES = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
"""HF config sizes of every tiny reference model; weights spread wide enough (0.1) that greedy
argmax is unambiguous."""


def tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random HF model of `TINY_SIZES` (with `overrides`)."""
    torch, transformers = require_reference()
    base = {**TINY_SIZES, **overrides}
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**base)).eval()
    if arch == "qwen2" or base.get("attention_bias"):
        with torch.no_grad():  # HF zero-initialises biases; make them matter.
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    if arch == "qwen3":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "q_norm" in name or "k_norm" in name:
                    p.uniform_(0.5, 1.5)
    return model


TINY_CONTEXT = 96
"""Context length of `tiny_chat_model`: small enough to fill in a test."""


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """An orbax checkpoint of a tiny random Llama with SmolLM2's tokenizer and chat template.

    The CLI paths that need a real tokenizer (chat, --max-new-tokens max, stage lines) run on
    it in milliseconds per token; its context is `TINY_CONTEXT` tokens.
    """
    from ferrum_jax.checkpoint import read_tokenizer, save_orbax
    from ferrum_jax.model import Model

    tokenizer = read_tokenizer()  # the embedded SmolLM2's, read without its weights
    config = ModelConfig.from_hf(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": TINY_CONTEXT,
            "eos_token_id": 2,
        }
    )
    path = tmp_path_factory.mktemp("tiny-chat") / "orbax"
    save_orbax(Model.init(config, seed=0, tokenizer=tokenizer), path)
    return path


def hf_logits(hf_model, seq) -> np.ndarray:
    """HF full forward of one unpadded sequence: `[len, vocab]`."""
    torch, _ = require_reference()
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(seq)[None], dtype=torch.long)).logits[0].numpy()


def hf_greedy(hf_model, prompt, new_tokens: int, eos: int | None = None) -> np.ndarray:
    """HF `generate`'s greedy continuation of one prompt (new tokens only)."""
    torch, _ = require_reference()
    ids = torch.tensor(np.asarray(prompt)[None], dtype=torch.long)
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].numpy()


def run_on_mesh(test: str, mesh: str = "2,4", devices: int = 8, **env: str) -> None:
    """Runs pytest node `test` in a subprocess with `devices` virtual CPU devices and
    `FERRUM_TEST_MESH=mesh` (the test builds its executor on that mesh); it must pass."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "FERRUM_TEST_MESH": mesh,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout


@contextlib.contextmanager
def count_compiles():
    """Collects the name of every XLA program compiled inside the block (any entry point,
    eager ops included), from JAX's compile events."""
    import jax
    from jax._src import dispatch

    names: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def no_load(monkeypatch):
    """Loading weights fails the test: every argument error must come before it."""
    from ferrum_jax.checkpoint import load as checkpoint_load

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for reader in ("load_gguf", "load_hf", "load_orbax"):
        monkeypatch.setattr(checkpoint_load, reader, fail)
