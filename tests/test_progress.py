"""Progress: stage lines inside `stage_lines`, bars only on a terminal, quiet hides both."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re
import sys
import time
from collections.abc import Iterator

import pytest

from ferrum_jax import jsonl_batch, progress
from ferrum_jax.batch_generation import GenerationRequest, GenerationResult
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


# ---- never silent: a line within LINE_INTERVAL_S off a terminal, whatever one step takes ----

_SLOW_STEP_S = 0.3
"""What the fake slow stages sleep per step: longer than the interval below, so only the
progress thread can keep the log within it."""
_INTERVAL_S = 0.1
_SLACK_S = 1.0  # 2 shared cores: a thread may wake late, never by seconds


class Lines(logging.Handler):
    """The `ferrum_jax` logger's messages with when they came."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((time.perf_counter(), record.getMessage()))


@pytest.fixture
def lines(monkeypatch) -> Iterator[Lines]:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # off a terminal
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", _INTERVAL_S)
    handler = Lines()
    progress.logger.addHandler(handler)
    try:
        with progress.stage_lines():
            yield handler
    finally:
        progress.logger.removeHandler(handler)


def _never_silent(lines: Lines, start: float, pattern: str) -> list[str]:
    """The lines matching `pattern`; no gap in the log is longer than the interval allows."""
    ticks = [message for _, message in lines.seen if re.fullmatch(pattern, message)]
    assert ticks, [message for _, message in lines.seen]
    times = [start] + [when for when, _ in lines.seen]
    assert max(b - a for a, b in itertools.pairwise(times)) < _INTERVAL_S + _SLACK_S
    return ticks


def test_warmup_reports_a_line_within_the_interval_off_a_terminal(lines, monkeypatch):
    slow = lambda *args: time.sleep(_SLOW_STEP_S)
    monkeypatch.setattr(JaxModelExecutor, "_padding_step", slow)  # each stands for a compile
    monkeypatch.setattr(JaxModelExecutor, "_copy", slow)
    executor = JaxModelExecutor(Model.init(CONFIG), max_batch_size=1, max_sequence_length=16)
    start = time.perf_counter()
    programs = sum(len(v) for v in asyncio.run(executor.warmup()).values())
    ticks = _never_silent(lines, start, r"warmup: \d+/\d+ programs, \d+ s")
    assert ticks[-1].startswith("warmup: ") and f"/{programs} programs" in ticks[-1]


def test_a_jsonl_batch_reports_a_line_within_the_interval_off_a_terminal(
    lines, monkeypatch, tmp_path
):
    def slow_batch(executor, requests, *, tokenizer, on_tokens):
        for i, request in enumerate(requests):
            time.sleep(_SLOW_STEP_S)  # one sequence's decoding
            on_tokens(3)
            yield GenerationResult(request.key, i, "text", [1, 2, 3], "length", 1)

    monkeypatch.setattr(jsonl_batch, "generate_batch", slow_batch)
    requests = [GenerationRequest([1], 3, key=str(i)) for i in range(3)]
    start = time.perf_counter()
    done = jsonl_batch.run(
        None,  # the fake batch needs no executor
        requests,
        tmp_path / "out.jsonl",
        tokenizer=None,
        resume=jsonl_batch.Resume(frozenset()),
    )
    assert done == (3, 9)
    _never_silent(lines, start, r"generating: \d/3 seqs, \d+ s \(\d+\.\d tok/s\)")
    assert lines.seen[-1][1].startswith("3 sequences, 9 tokens in ")


def test_only_the_innermost_stage_reports_and_quiet_hides_all(lines):
    with progress.waiting("loading"):
        time.sleep(_SLOW_STEP_S)
        with progress.bar(2, "loading model", "tensor") as inner:
            time.sleep(_SLOW_STEP_S)
            inner.update()
    said = [message for _, message in lines.seen]
    assert any(re.fullmatch(r"loading: \d+ s", m) for m in said)
    assert any(re.fullmatch(r"loading model: 0/2 tensors, \d+ s", m) for m in said)
    inner_start = said.index(next(m for m in said if m.startswith("loading model")))
    assert all(m.startswith("loading model") for m in said[inner_start:])
    progress.logger.setLevel(logging.WARNING)  # what --quiet does
    with progress.waiting("hidden"):
        time.sleep(_SLOW_STEP_S)
    assert [m for _, m in lines.seen if "hidden" in m] == []


def test_plural():
    assert progress.plural(1, "sequence") == "1 sequence"
    assert progress.plural(0, "line") == "0 lines"
    assert progress.plural(6, "line") == "6 lines"


def test_on_a_terminal_a_stage_is_a_timer_redrawn_while_it_runs(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "REDRAW_S", _INTERVAL_S)
    with progress.waiting("loading"):
        time.sleep(_SLOW_STEP_S)  # no step to count: only the redraw shows time passing
    assert "loading: 00:00" in terminal.getvalue()
    with progress.stage_lines(quiet=True):
        terminal.seek(0)
        terminal.truncate()
        with progress.waiting("hidden"), progress.bar(1, "hidden too", "step"):
            time.sleep(_SLOW_STEP_S)
    assert terminal.getvalue() == ""
