"""`ChatSession` and `ferrum-jax chat`: multi-turn answers equal whole-conversation generation,
with only the new message prefilled each turn."""

from __future__ import annotations

import codecs
import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from conftest import TINY_CONTEXT

from ferrum_jax import engine
from ferrum_jax.chat import ChatSession
from ferrum_jax.checkpoint import load_model
from ferrum_jax.cli import main
from ferrum_jax.streaming import stream_tokens


def whole_conversation(model, messages, max_new_tokens: int) -> list[int]:
    """What `generate --chat` runs: the rendered conversation, generated in one go."""
    ids = model.tokenizer.encode_chat(messages)
    return [t.token_id for t in stream_tokens(model, ids, max_new_tokens=max_new_tokens)]


def text_of(model, ids: list[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def test_turns_equal_whole_conversations_and_prefill_only_what_is_new(tiny_chat_model, monkeypatch):
    model = load_model(tiny_chat_model)
    session = ChatSession(model, system="You are terse.")
    first = [t.token_id for t in session.send("hello there", max_new_tokens=8)]
    session.add_answer(text_of(model, first))

    prefilled: list[int] = []
    extend = engine.extend

    def counting_extend(graphdef, params, cache, tokens, *args, **kwargs):
        prefilled.append(len(tokens[0]))
        return extend(graphdef, params, cache, tokens, *args, **kwargs)

    monkeypatch.setattr(engine, "extend", counting_extend)
    # The caller stops early (a stop string, say): the session stays consistent.
    second = []
    for token in session.send("and then?", max_new_tokens=8):
        second.append(token.token_id)
        if len(second) == 3:
            break
    session.add_answer(text_of(model, second))
    third = [t.token_id for t in session.send("one more", max_new_tokens=8)]

    conversation = session.messages  # system, three questions, two answers
    assert [m["role"] for m in conversation] == ["system", *["user", "assistant"] * 2, "user"]
    assert third == whole_conversation(model, conversation, 8)
    assert second == whole_conversation(model, conversation[:4], 8)[:3]
    whole = len(model.tokenizer.encode_chat(conversation))
    assert len(prefilled) == 2 and sum(prefilled) < whole  # the history was not prefilled again


def test_chat_reads_to_end_of_input_and_stops_at_a_full_context(
    capsys, monkeypatch, tiny_chat_model
):
    argv = ["chat", "--model", str(tiny_chat_model), "--quiet"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n"))  # then Ctrl-D (end of input)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> ") and out.endswith(">>> \n")

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    assert main([*argv, "--max-new-tokens", "max"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"[stopped: the model's context of {TINY_CONTEXT} tokens is full]"
    assert err[1].startswith("ferrum-jax: error: the conversation no longer fits")


class Terminal:
    """A command on a pseudo-terminal, as a person at a terminal runs it.

    `subprocess` starts it (fork and exec in C): forking this multithreaded JAX process in
    Python, as `pty.fork` and pexpect do, can deadlock the child.
    """

    def __init__(self, argv: list[str]) -> None:
        main_fd, child_fd = pty.openpty()
        env = {**os.environ, "TERM": "dumb"}
        self.process = subprocess.Popen(
            argv, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env, close_fds=True
        )
        os.close(child_fd)
        self.fd, self.screen = main_fd, ""
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def read_until(self, text: str, timeout: float = 600) -> str:
        """What the terminal shows before `text` (a guard against hangs, not a timing)."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            ready, _, _ = select.select([self.fd], [], [], max(0, deadline - time.monotonic()))
            try:
                data = os.read(self.fd, 4096) if ready else b""
            except OSError:  # EIO: the command closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"no {text!r} on the terminal; it shows {self.screen!r}")
            self.screen += self.decoder.decode(data)
        before, _, self.screen = self.screen.partition(text)
        return before

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def close(self) -> int:
        code = self.process.wait(timeout=60)
        os.close(self.fd)
        return code


def answer_in(screen: str) -> str:
    """The answer between the echoed question and the next prompt, as a terminal shows it."""
    lines = screen.replace("\r\n", "\n").split("\n")[1:]  # the echo of what was typed
    return "\n".join(line for line in lines if not line.startswith("[stopped:")).strip()


def test_chat_in_a_terminal_equals_generate_with_the_whole_conversation(capsys):
    """Two greedy turns through a pseudo-terminal on SmolLM2; the second answer is the one a
    single generation over the whole conversation gives."""
    questions = ["What is the capital of France?", "And what is the capital of Italy?"]
    limit = ["--max-new-tokens", "24"]
    terminal = Terminal([sys.executable, "-m", "ferrum_jax.cli", "chat", "--quiet", *limit])
    terminal.read_until(">>> ")
    answers = []
    for question in questions:
        terminal.type(question)
        answers.append(answer_in(terminal.read_until(">>> ")))
    terminal.type("/exit")
    assert terminal.close() == 0

    first = ["generate", "--chat", "--prompt", questions[0], *limit, "--json", "--quiet"]
    assert main(first) == 0
    assert answers[0] == json.loads(capsys.readouterr().out)["text"].strip()
    model = load_model()
    conversation = [
        {"role": "user", "content": questions[0]},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": questions[1]},
    ]
    expected = whole_conversation(model, conversation, 24)
    assert answers[1] == text_of(model, expected).strip()
    assert "Rome" in answers[1]


@pytest.mark.parametrize("flag", ["/exit", "/quit"])
def test_exit_commands(capsys, monkeypatch, tiny_chat_model, flag):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{flag}\nnever read\n"))
    assert main(["chat", "--model", str(tiny_chat_model), "--quiet"]) == 0
    assert capsys.readouterr().out == ">>> "
