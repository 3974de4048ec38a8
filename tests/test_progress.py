"""Progress: stage lines inside `stage_lines`, bars only on a terminal, quiet hides both."""

from __future__ import annotations

import asyncio
import io
import sys

from ferrum_jax import progress
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.model import Model
from ferrum_jax.models.config import ModelConfig

CONFIG = ModelConfig.from_hf(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "eos_token_id": 2,
    }
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_warmup_reports_its_stages(capsys):
    executor = JaxModelExecutor(Model.init(CONFIG), max_batch_size=1, max_sequence_length=16)
    with progress.stage_lines():
        report = asyncio.run(executor.warmup())
    # Every ragged pair (compiled or skipped), verify bucket and page-copy bucket.
    programs = sum(len(v) for v in report.values())
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"ferrum-jax: warmup: compiling {programs} programs"
    assert lines[-1].startswith(f"ferrum-jax: warmup: {programs} programs in ")


def test_bars_only_on_a_terminal_and_never_when_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.bars_enabled()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.bars_enabled()
    with progress.stage_lines(quiet=True):
        assert not progress.bars_enabled()
        progress.logger.info("hidden")
    assert progress.bars_enabled()
    with progress.stage_lines():
        progress.logger.info("shown")
    assert sys.stderr.getvalue() == "ferrum-jax: shown\n"
