"""Offline batch generation from a JSONL file: `ferrum-jax generate --input-file --output`.

Input: one JSON object per line, `{"id": ..., "prompt": "..."}` or `{"id": ...,
"messages": [...]}` (the chat template applies), with optional `max_new_tokens`,
`temperature`, `top_k`, `top_p`, `min_p`, `seed` and `stop` (a string or a list) overriding
the command's flags, and at most one of `json_schema` (an object) and `regex` (a string) that
the answer must match (`GenerationRequest.constraint`; the command's `--json-schema` or
`--regex` otherwise). Output: one line per finished request, `{"id", "text", "token_ids",
"finish_reason"}`, written and flushed as each finishes (not in input order).

The run is resumable: ids already in the output are skipped, and a last line cut short by
a kill is dropped before appending. An existing output is read and checked whole before
anything is written: a file that is not a results file of this command is refused and left
as it is. Files are regular files only, the input at most `TEXT_FILE_LIMIT` bytes. A bad
input line (not JSON, unknown fields, text that is not valid Unicode, a value out of range, a
prompt too long for the context, a duplicate id, ...) is reported with its line number and
skipped; the other lines still run. A line without an `id` is named by its line number.

`generate_jsonl` is the API; the command checks both files with `read_done` and
`read_input` before it loads the model, then calls `run`. Reading goes through
`checkpoint.text_files`; the appending stays here, next to the line format it writes, so the
command and the API share one resume and append logic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

from ferrum_jax import progress
from ferrum_jax.batch_generation import (
    GenerationRequest,
    GenerationResult,
    check_request,
    generate_batch,
)
from ferrum_jax.checkpoint.text_files import (
    TEXT_FILE_LIMIT,
    check_output,
    open_regular,
    read_text_file,
    same_file,
)
from ferrum_jax.engine.limits import check_context_length
from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import JaxModelExecutor
from ferrum_jax.sampling import check_seed, check_top_k
from ferrum_jax.text.grammar import Constraint
from ferrum_jax.text.tokenizer import Tokenizer

MAX = "max"
"""`max_new_tokens` "max": fill the context after the prompt."""

_FIELDS = frozenset(
    {"id", "prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p", "min_p"}
    | {"seed", "stop", "json_schema", "regex"}
)


@dataclasses.dataclass(frozen=True)
class LineDefaults:
    """Values for the fields a line leaves out (the command's flags)."""

    max_new_tokens: int | str = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    constraint: Constraint | None = None


@dataclasses.dataclass(frozen=True)
class LineError:
    """A line that was skipped, and why."""

    line: int
    """1-based line number in the input file."""
    message: str


@dataclasses.dataclass(frozen=True)
class JsonlReport:
    """What `generate_jsonl` did."""

    generated: int
    """Lines generated and appended to the output in this run."""
    tokens: int
    """Tokens generated in this run."""
    skipped: int
    """Lines whose id the output already held (an earlier run finished them)."""
    errors: tuple[LineError, ...]
    """Lines skipped as malformed or impossible, in file order."""


@dataclasses.dataclass(frozen=True)
class BatchInput:
    """What an input file asks for, checked line by line."""

    requests: list[GenerationRequest]
    """One per good line still to run; `key` is the line's id."""
    errors: list[LineError]
    skipped: int
    """Lines whose id the output already holds."""


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise FerrumError.invalid_parameter(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FerrumError.invalid_parameter(f"{name} must be an integer, got {value!r}")
    return value


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise FerrumError.invalid_parameter(
            f"stop must be a non-empty string or a list of them, got {value!r}"
        )
    return tuple(stops)


def _line_id(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FerrumError.invalid_parameter(f"id must be a string or an integer, got {value!r}")
    return value


def id_key(value: str | int) -> str:
    """How ids are compared: `7` and `"7"` are different ids."""
    return json.dumps(value)


@dataclasses.dataclass(frozen=True)
class Resume:
    """What an existing output holds, read and checked before anything is written."""

    done: frozenset[str]
    """Ids (`id_key`) of the results it holds."""
    cut: int | None = None
    """Where a last line cut short by a kill starts: `run` drops it before appending."""
    size: int = 0
    """Bytes the output held when checked: `run` cuts nothing from a file that changed since."""


_RESULT_FIELDS = frozenset({"id", "text", "token_ids", "finish_reason"})
_RESULT_START = b'{"id": '
"""How every result line starts (`run` writes the id first): a kill leaves a prefix of one."""


def _result_id(raw: bytes) -> str | None:
    """The `id_key` of a result line of this command, None when `raw` is not one."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or set(record) != _RESULT_FIELDS:
        return None
    tokens = record["token_ids"]
    if (
        not isinstance(record["text"], str)
        or not isinstance(tokens, list)
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
        or record["finish_reason"] not in ("stop", "length")
    ):
        return None
    try:
        return id_key(_line_id(record["id"]))
    except FerrumError:
        return None


def read_done(output: pathlib.Path, input_file: pathlib.Path) -> Resume:
    """Reads and checks every line of an existing `output` before anything is written to it.

    Anything but a results file of this command (the input itself, under any name; notes; a
    config file; a FIFO or terminal) is refused and left untouched. Only the last line of a
    genuine results file may be unterminated, the write a kill interrupted: `Resume.cut`.
    """
    if same_file(output, input_file):
        raise FerrumError.invalid_parameter(
            f"--output {output} is the --input-file {input_file}; give another file"
        )
    if not check_output(output, "--output"):
        return Resume(frozenset())
    done: set[str] = set()
    whole = 0  # bytes of the complete lines read so far
    with open_regular(output, "--output") as f:
        lines = iter(lambda: f.readline(TEXT_FILE_LIMIT + 1), b"")
        for number, raw in enumerate(lines, start=1):
            key = _result_id(raw)
            if raw.endswith(b"\n") and key is not None:
                done.add(key)
                whole += len(raw)
                continue
            if _killed_write(raw):
                return Resume(frozenset(done), cut=whole, size=whole + len(raw))
            raise FerrumError.invalid_parameter(
                f"--output {output}: line {number} is not a result line of this command; "
                "refusing to append to it (the file is left as it is)"
            )
    return Resume(frozenset(done))


def _killed_write(raw: bytes) -> bool:
    """Whether an unterminated last line is what a kill leaves of a result line: the whole
    record without its newline, or the start of one that ends too early."""
    if raw.endswith(b"\n") or len(raw) > TEXT_FILE_LIMIT:
        return False
    if _result_id(raw) is not None:
        return True
    if not raw.startswith(_RESULT_START):
        return False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # a character cut in two is what a kill leaves
            return False
        text = raw[: e.start].decode("utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string"):  # the rest of the line is inside a string
            return True
        # A cut `\uXXXX` escape is reported at its `u`, at most 4 characters from the end;
        # any other error short of the end means text that is not JSON, not a cut line.
        slack = 4 if e.msg.startswith("Invalid \\uXXXX escape") else 0
        return e.pos >= len(text.rstrip()) - slack
    return False


def read_input(
    path: pathlib.Path,
    tokenizer: Tokenizer,
    *,
    context: int,
    vocab: int,
    defaults: LineDefaults,
    done: frozenset[str] | None = None,
) -> BatchInput:
    """Parses and checks every line (tokenizing prompts) without touching the model; ids
    in `done` (`id_key`s) are counted as skipped."""
    done = done or frozenset()
    text = read_text_file(path, "--input-file")
    requests, errors, skipped = [], [], 0
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = _request(line, number, tokenizer, context, defaults)
            check_request(request, vocab=vocab, max_sequence_length=context)
        except FerrumError as e:
            errors.append(LineError(number, e.message))
            continue
        key = id_key(request.key)
        if key in seen:
            errors.append(LineError(number, f"duplicate id {request.key!r}"))
            continue
        seen.add(key)
        if key in done:
            skipped += 1
            continue
        requests.append(request)
    return BatchInput(requests, errors, skipped)


def _request(
    line: str, number: int, tokenizer: Tokenizer, context: int, defaults: LineDefaults
) -> GenerationRequest:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise FerrumError.invalid_format(f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise FerrumError.invalid_format(f"expected a JSON object, got {type(record).__name__}")
    try:
        # JSON escapes can spell lone surrogates (`"\ud800"`): no tokenizer encodes them, and
        # an id holding one could not be written to the UTF-8 output.
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise FerrumError.invalid_parameter(
            f"text {e.object[e.start : e.end]!a} is not valid Unicode (a lone surrogate): "
            "it cannot be UTF-8 encoded"
        ) from None
    unknown = sorted(set(record) - _FIELDS)
    if unknown:
        raise FerrumError.invalid_parameter(
            f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})"
        )
    line_id = _line_id(record.get("id", number))
    if ("prompt" in record) == ("messages" in record):
        raise FerrumError.invalid_parameter("give exactly one of prompt or messages")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise FerrumError.invalid_parameter(
                f"prompt must be a non-empty string, got {prompt!r}"
            )
        ids = tokenizer.encode(prompt)
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise FerrumError.invalid_parameter("messages must be a non-empty list")
        if tokenizer.chat_template is None:
            raise FerrumError.invalid_parameter("messages need a chat template; the model has none")
        ids = tokenizer.encode_chat(messages)
    if not ids:
        raise FerrumError.invalid_parameter("the prompt encodes to no tokens")
    limit = record.get("max_new_tokens", defaults.max_new_tokens)
    if limit == MAX:
        check_context_length(len(ids), 1, context)
        max_new = context - len(ids)
    else:
        max_new = _integer(limit, "max_new_tokens")
        if max_new < 1:
            raise FerrumError.invalid_parameter(f"max_new_tokens must be >= 1, got {max_new}")
        check_context_length(len(ids), max_new, context)
    return GenerationRequest(
        prompt_ids=ids,
        max_new_tokens=max_new,
        temperature=_number(record.get("temperature", defaults.temperature), "temperature"),
        top_k=check_top_k(record.get("top_k", defaults.top_k)),
        top_p=_number(record.get("top_p", defaults.top_p), "top_p"),
        min_p=_number(record.get("min_p", defaults.min_p), "min_p"),
        seed=check_seed(record.get("seed", defaults.seed)),
        stop=_stops(record["stop"]) if "stop" in record else defaults.stop,
        key=line_id,
        constraint=_constraint(record, defaults.constraint),
    )


def _constraint(record: dict[str, Any], default: Constraint | None) -> Constraint | None:
    """The line's `json_schema` or `regex`, checked (a bad one skips the line), else
    `default`."""
    if "json_schema" in record and "regex" in record:
        raise FerrumError.invalid_parameter("give at most one of json_schema and regex")
    if "json_schema" in record:
        schema = record["json_schema"]
        if not isinstance(schema, dict):
            raise FerrumError.invalid_parameter(
                f"json_schema must be a JSON object, got {type(schema).__name__}"
            )
        return Constraint.json_schema(schema)
    if "regex" in record:
        return Constraint.regex(record["regex"])
    return default


def run(
    executor: JaxModelExecutor,
    requests: list[GenerationRequest],
    output: pathlib.Path,
    *,
    tokenizer: Tokenizer,
    resume: Resume,
    on_result: Callable[[GenerationResult], None] | None = None,
) -> tuple[int, int]:
    """Generates every request, appending each result line to `output` as it finishes
    (`resume`, from `read_done`, says where a line cut short by a kill starts).

    Returns `(sequences, tokens)` generated. Progress: a tqdm bar (sequences, with tokens/s)
    on a terminal, stage lines otherwise.
    """
    bar = progress.bar(len(requests), "generating", "seq")
    start, tokens = time.perf_counter(), 0

    def counted(n: int) -> None:
        nonlocal tokens
        tokens += n
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{tokens / elapsed:.1f} tok/s" if elapsed > 0 else "", refresh=False)

    finished = 0
    with output.open("a", encoding="utf-8") as out:
        if resume.cut is not None:
            if os.fstat(out.fileno()).st_size != resume.size:
                raise FerrumError.io(
                    f"--output {output} changed since it was checked; nothing was written, "
                    "run again"
                )
            out.truncate(resume.cut)
        for result in generate_batch(executor, requests, tokenizer=tokenizer, on_tokens=counted):
            record = {
                "id": result.key,
                "text": result.text,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()  # a killed run keeps every line written so far
            finished += 1
            bar.update(1)
            if on_result is not None:
                on_result(result)
    bar.close()
    elapsed = time.perf_counter() - start
    progress.logger.info(
        "%s, %s in %.1f s (%.1f tokens/s)",
        progress.plural(finished, "sequence"),
        progress.plural(tokens, "token"),
        elapsed,
        tokens / elapsed if elapsed > 0 else 0.0,
    )
    return finished, tokens


def generate_jsonl(
    executor: JaxModelExecutor,
    input_file: str | pathlib.Path,
    output: str | pathlib.Path,
    *,
    defaults: LineDefaults | None = None,
    tokenizer: Tokenizer | None = None,
) -> JsonlReport:
    """Generates every line of the JSONL `input_file` not yet in `output`, appending result
    lines as each finishes (what `ferrum-jax generate --input-file --output` does).

    `defaults` fill the fields a line leaves out. Bad lines are logged (`ferrum_jax` logger,
    WARNING, with their line numbers) and returned in `JsonlReport.errors`; the other lines
    still run. Lines must fit `executor.max_sequence_length`.
    """
    tokenizer = tokenizer or executor.tokenizer
    if tokenizer is None:
        raise FerrumError.tokenizer("batch generation needs a tokenizer; the model ships none")
    input_file, output = pathlib.Path(input_file), pathlib.Path(output)
    resume = read_done(output, input_file)
    config = executor.model.config
    batch = read_input(
        input_file,
        tokenizer,
        context=min(executor.max_sequence_length, config.max_position_embeddings),
        vocab=config.vocab_size,
        defaults=defaults or LineDefaults(),
        done=resume.done,
    )
    for error in batch.errors:
        progress.logger.warning("%s:%d: skipped: %s", input_file, error.line, error.message)
    generated, tokens = (
        run(executor, batch.requests, output, tokenizer=tokenizer, resume=resume)
        if batch.requests
        else (0, 0)
    )
    return JsonlReport(generated, tokens, batch.skipped, tuple(batch.errors))
