"""ferrum-jax: generate text, chat, convert checkpoints, describe, benchmark and evaluate models.

Arguments are checked before any weight loads: flag values and the prompt first, then the
prompt's length against the model's context, tokenized with the tokenizer read from the
checkpoint's metadata. Argument errors exit 2 and runtime errors 1, each as one line on
stderr (--debug shows the traceback). Progress goes to stderr: bars on a terminal, one line
per stage otherwise; --quiet hides both.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import ferrum_jax
from ferrum_jax import progress
from ferrum_jax.choices import DTYPE_NAMES, KV_DTYPE_NAMES, QUANTIZATION_NAMES, TEXT_FILE_LIMIT
from ferrum_jax.errors import ErrorKind, FerrumError

# Everything that imports JAX is imported inside the function that needs it: the parser is
# built from `choices` alone, so `--version` and `--help` answer in 0.15-0.17 s instead of
# 3.4-4.3 s (a busy 2-core AMD EPYC), and tests/test_startup.py checks that they never
# import JAX.
if TYPE_CHECKING:
    from jax.sharding import Mesh

    from ferrum_jax.model import Model
    from ferrum_jax.models.config import ModelConfig
    from ferrum_jax.sampling import SamplingParams
    from ferrum_jax.streaming import StreamedToken
    from ferrum_jax.text import Tokenizer
    from ferrum_jax.text.grammar import Constraint

MAX = "max"
"""`--max-new-tokens max`: fill the model's context."""

_SYNONYMS = {"--input": "--prompt", "--text": "--prompt"}
"""Flags of other tools that users type for ours; difflib catches plain typos."""

log = progress.logger

_FILE_LIMIT = f"a regular file of at most {TEXT_FILE_LIMIT // 2**20} MiB"


def _arg_error(message: str) -> FerrumError:
    """An argument error: exits 2."""
    return FerrumError.invalid_parameter(message)


# ---------------------------------------------------------------------------------------------
# Argument parsing: every value is checked by its flag's parser, in the flag's own words.


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one `FerrumError` line in CLI terms."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _arg_error(_usage_message(message, self.prog))


def _usage_message(message: str, prog: str) -> str:
    required = re.fullmatch(r"the following arguments are required: (.*)", message)
    if required:
        if required[1] == "COMMAND":
            return f"choose a command: {', '.join(_HANDLERS)} (see {prog} --help)"
        return f"missing {required[1]} (see {prog} --help)"
    argument = re.fullmatch(r"argument ([^:]+): (.*)", message, re.DOTALL)
    if not argument:
        return message
    flag, problem = argument[1].split("/")[-1], argument[2]
    choice = re.fullmatch(r"invalid choice: (.*) \(choose from (.*)\)", problem)
    if choice and flag == "COMMAND":
        typed = choice[1].strip("'")
        guess = [c for c in _HANDLERS if c.startswith(typed)] or difflib.get_close_matches(
            typed, list(_HANDLERS), n=1
        )
        hint = f"; did you mean {guess[0]}?" if guess else ""
        return f"unknown command {choice[1]}{hint} (choose from {', '.join(_HANDLERS)})"
    if choice:
        return f"{flag} must be one of {choice[2].replace(chr(39), '')} (got {choice[1]})"
    if problem == "expected one argument":
        return f"{flag} needs a value"
    return f"{flag} {problem}"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is no value to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (got {text!r})") from None


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {text})")
        return value

    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def _temperature(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {text})")
    return value


def _top_p(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {text})")
    return value


def _min_p(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (got {text})")
    return value


def _by_sampling_rule(check: Callable[[int], int], text: str) -> int:
    """An integer flag checked by the rule JSONL lines and the API share (`sampling`)."""
    try:
        return check(_integer(text))
    except FerrumError as e:  # the rule's words without its parameter name: argparse adds the flag
        raise argparse.ArgumentTypeError(e.message.split(" ", 1)[1]) from None


# `sampling` imports JAX: only a flag given on the command line loads it.
def _top_k(text: str) -> int:
    from ferrum_jax.sampling import check_top_k

    return _by_sampling_rule(check_top_k, text)


def _seed(text: str) -> int:
    from ferrum_jax.sampling import check_seed

    return _by_sampling_rule(check_seed, text)


def _token_limit(text: str) -> int | str:
    if text == MAX:
        return MAX
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or '{MAX}' (got {text!r})")
    return value


def _stop_string(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    # The shell passes `\n` as two characters; a newline is the stop string people want.
    return re.sub(r"\\(\\|n|t)", lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m[1]], text)


def _sizes(what: str, example: str) -> Callable[[str], list[int]]:
    """A comma-separated list of integers >= 1 (`--batch 1,8`, `--prompt-len 128,512`)."""

    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",")]
        if not all(part.isdigit() and int(part) >= 1 for part in parts):
            raise argparse.ArgumentTypeError(f"must be {what} >= 1 like {example} (got {text!r})")
        return [int(part) for part in parts]

    return parse


def _span(what: str, example: str) -> Callable[[str], list[int]]:
    """`LO,HI` integers with 1 <= LO <= HI (`--serve-prompts 32,1024`)."""
    sizes = _sizes(what, example)

    def parse(text: str) -> list[int]:
        span = sizes(text)
        if len(span) != 2 or span[0] > span[1]:
            raise argparse.ArgumentTypeError(f"must be {what} LO,HI like {example} (got {text!r})")
        return span

    return parse


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's parser (for messages about unknown flags)."""
    parser = _ArgumentParser(
        prog="ferrum-jax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'ferrum-jax COMMAND --help' for the options of a command.",
    )
    parser.add_argument(
        "--version", action="version", version=f"ferrum-jax {ferrum_jax.__version__}"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(
        dest="command", title="commands", metavar="COMMAND", parser_class=_ArgumentParser
    )
    commands.required = True
    subparsers: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=_HelpFormatter,
            # No prefixes: `--input` (another tool's flag for the prompt) must not silently
            # become `--input-file`; a typo gets a suggestion instead (`_unknown`).
            allow_abbrev=False,
        )
        subparsers[name] = sub
        return sub

    def common(p: argparse.ArgumentParser, *, quiet: bool = True) -> None:
        if quiet:  # bench has none: its lines on stderr are its measurements
            p.add_argument(
                "--quiet",
                action="store_true",
                help="no progress on stderr (errors and the [stopped: ...] notice remain)",
            )
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def quantize_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--quantize",
            choices=("none", *QUANTIZATION_NAMES),
            default="none",
            help="store linear weights as int8 (per output channel) or int4 (blocks of 32)",
        )

    def non_finite_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--allow-non-finite",
            action="store_true",
            help="load weights holding NaN or infinity (refused by default, naming the tensor: "
            "int8/int4 would hide the corruption behind finite logits)",
        )

    def model_args(p: argparse.ArgumentParser, *, mesh: bool = True, loads: bool = True) -> None:
        p.add_argument(
            "--model",
            metavar="PATH",
            help="HF directory (config.json + safetensors), .gguf file, orbax directory or "
            "hub name org/name (from the Hugging Face cache, downloaded unless HF_HUB_OFFLINE "
            "is set) (default: the embedded SmolLM2-135M-Instruct)",
        )
        p.add_argument("--revision", metavar="REV", help="branch, tag or commit of a hub --model")
        p.add_argument(
            "--gguf-file",
            metavar="NAME",
            help="the .gguf file of a hub --model that holds several",
        )
        p.add_argument(
            "--dtype", choices=DTYPE_NAMES, default="float32", help="parameter and compute dtype"
        )
        quantize_arg(p)
        if loads:  # `info` reads shapes and config only
            non_finite_arg(p)
        p.add_argument(
            "--kv-dtype",
            choices=("auto", *KV_DTYPE_NAMES),
            default="auto",
            help="KV cache dtype: auto (the compute dtype), or quantized with a scale per "
            "token and head (runs the xla attention)",
        )
        if mesh:
            p.add_argument(
                "--mesh",
                metavar="data=D,model=M",
                help="shard over a device mesh, e.g. data=1,model=2 (default: one device)",
            )
            p.add_argument(
                "--attention",
                default="auto",
                metavar="IMPL",
                help="attention implementation: auto (by platform), xla (pure JAX, any "
                "platform), tpu (Pallas ragged paged attention) or gpu (Pallas paged decode)",
            )

    def chat_template_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--chat-template",
            metavar="FILE",
            help="a Jinja chat template to use instead of the model's (for a model without one); "
            f"{_FILE_LIMIT}",
        )

    def sampling_args(p: argparse.ArgumentParser, *, per: str) -> None:
        p.add_argument(
            "--max-new-tokens",
            type=_token_limit,
            default=128,
            metavar="N",
            help=f"most tokens to generate {per}; '{MAX}' fills the model's context. The "
            "prompt plus N must fit the context",
        )
        p.add_argument(
            "--temperature",
            type=_temperature,
            default=0.0,
            metavar="T",
            help="sampling temperature; 0 is greedy",
        )
        p.add_argument(
            "--top-k",
            type=_top_k,
            default=0,
            metavar="K",
            help="keep the K likeliest tokens; 0: all",
        )
        p.add_argument(
            "--top-p",
            type=_top_p,
            default=1.0,
            metavar="P",
            help="keep the fewest tokens whose probability reaches P; 1: all",
        )
        p.add_argument(
            "--min-p",
            type=_min_p,
            default=0.0,
            metavar="P",
            help="drop tokens less likely than P times the likeliest; 0: none",
        )
        p.add_argument(
            "--seed", type=_seed, default=0, metavar="S", help="random seed for sampling"
        )
        p.add_argument(
            "--stop",
            type=_stop_string,
            action="append",
            default=[],
            metavar="STR",
            help="stop when the output contains STR (repeatable; \\n and \\t are understood); "
            "the text ends before it",
        )

    gen = command(
        "generate",
        "generate text from a prompt, streamed to stdout, or for every line of a JSONL file",
    )
    gen.add_argument(
        "--prompt", metavar="TEXT", help="the prompt; '-' reads it from standard input"
    )
    gen.add_argument(
        "--prompt-file",
        metavar="PATH",
        help="read the prompt from this UTF-8 file (one trailing newline is dropped); "
        f"{_FILE_LIMIT}",
    )
    gen.add_argument(
        "--input-file",
        metavar="FILE.jsonl",
        help='batch mode: one JSON object per line, {"id", "prompt"} or {"id", "messages"}, '
        "optionally with max_new_tokens, temperature, top_k, top_p, min_p, seed, stop "
        f"(the flags give the defaults); needs --output; {_FILE_LIMIT}",
    )
    gen.add_argument(
        "--output",
        metavar="FILE.jsonl",
        help='batch mode: appends {"id", "text", "token_ids", "finish_reason"} as each line '
        "finishes; ids already there are skipped (a killed run resumes); an existing file "
        "must hold only such lines",
    )
    gen.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=8,
        metavar="N",
        help="batch mode: sequences generated at once (continuous batching)",
    )
    gen.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message of the chat template"
    )
    gen.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    chat_template_arg(gen)
    sampling_args(gen, per="after the prompt")
    grammar = gen.add_mutually_exclusive_group()
    grammar.add_argument(
        "--json-schema",
        metavar="FILE",
        help="the answer is JSON matching the JSON schema in FILE (every token is picked among "
        "the ones the schema allows; batch mode: the default of each line's json_schema). "
        "One prompt runs as a batch of one and prints its text when complete, not streamed; "
        f"{_FILE_LIMIT}",
    )
    grammar.add_argument(
        "--regex",
        metavar="PATTERN",
        help="the answer matches PATTERN whole (as --json-schema; batch mode: each line's "
        "regex default)",
    )
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token_ids, prompt_token_ids, finish_reason, "
        "timings) instead of streaming",
    )
    model_args(gen)
    common(gen)

    chat = command("chat", "chat with the model in the terminal (/exit or Ctrl-D to quit)")
    chat.add_argument("--system", metavar="TEXT", help="system message of the conversation")
    chat_template_arg(chat)
    sampling_args(chat, per="per answer")
    model_args(chat)
    common(chat)

    convert = command("convert", "convert an HF directory or .gguf file to an orbax directory")
    convert.add_argument("src", metavar="SRC", help="HF directory, .gguf file or orbax directory")
    convert.add_argument("dst", metavar="DST", help="orbax directory to write")
    convert.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the saved params"
    )
    quantize_arg(convert)
    non_finite_arg(convert)
    convert.add_argument(
        "--force",
        action="store_true",
        help="replace DST if it is an orbax checkpoint (or an empty directory)",
    )
    common(convert)

    command_eval = commands.add_parser(
        "eval",
        help="run lm-eval-harness with this model (lm-eval's own flags; needs the eval extra)",
        usage="ferrum-jax eval [LM_EVAL_FLAGS ...]",
        add_help=False,  # --help is lm-eval's
    )
    subparsers["eval"] = command_eval

    info = command("info", "describe a model from its metadata (no weights are read)")
    model_args(info, mesh=False, loads=False)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    common(info)

    bench = command("bench", "measure throughput and latency, optionally against HF transformers")
    model_args(bench)
    bench.add_argument(
        "--batch",
        type=_sizes("batch sizes", "1,8"),
        default=[1, 8],
        metavar="B,B",
        help="comma-separated batch sizes",
    )
    bench.add_argument(
        "--prompt-len",
        type=_sizes("prompt lengths", "128,512"),
        default=[128],
        metavar="N,N",
        help="prompt tokens per row; a list gives one row per length (prefill scaling)",
    )
    bench.add_argument(
        "--max-context",
        type=_sizes("context lengths", "512,8192"),
        metavar="N,N",
        help="tokens each row's KV pages can hold (default: prompt + new tokens); a list "
        "measures decode at each, with the same live tokens",
    )
    bench.add_argument(
        "--new-tokens",
        type=_int_at_least(2),
        default=128,
        metavar="N",
        help="tokens generated per row",
    )
    bench.add_argument(
        "--compare", choices=("hf",), help="also run HF transformers on the same weights"
    )
    bench.add_argument(
        "--repeat",
        type=_int_at_least(1),
        default=3,
        metavar="N",
        help="timed runs; medians are reported",
    )
    bench.add_argument(
        "--json", dest="json_path", metavar="FILE", help="write the report as JSON to FILE"
    )
    bench.add_argument("--plot", metavar="FILE.png", help="plot decode tokens/s vs batch to FILE")
    serve = bench.add_argument_group(
        "serving (--serve)",
        "the Ferrum 0.7 engine loop (unified_decode) against the 0.6 split path, one run",
    )
    serve.add_argument(
        "--serve", action="store_true", help="run the serving benchmark instead of bench rows"
    )
    serve.add_argument(
        "--requests", type=_int_at_least(1), default=64, metavar="N", help="requests served"
    )
    serve.add_argument(
        "--rate",
        type=_positive,
        metavar="R",
        help="Poisson arrivals at R requests/s (default: all arrive at once)",
    )
    serve.add_argument(
        "--serve-prompts",
        type=_span("prompt lengths", "32,1024"),
        default=[32, 1024],
        metavar="LO,HI",
        help="prompt tokens, uniform in [LO, HI]",
    )
    serve.add_argument(
        "--serve-outputs",
        type=_span("output lengths", "16,256"),
        default=[16, 256],
        metavar="LO,HI",
        help="output tokens, uniform in [LO, HI]",
    )
    serve.add_argument(
        "--serve-batch",
        type=_int_at_least(1),
        default=16,
        metavar="B",
        help="sequences served at once (the executor's max_batch_size)",
    )
    serve.add_argument(
        "--max-kv-tokens",
        type=_int_at_least(1),
        metavar="N",
        help="KV tokens of the page pool (default: B x the longest request)",
    )
    common(bench, quiet=False)
    return parser, subparsers


def _unknown(extra: list[str], parser: argparse.ArgumentParser) -> FerrumError:
    first = extra[0]
    if not first.startswith("-"):
        return _arg_error(f"unexpected argument {first!r} (see {parser.prog} --help)")
    name = first.split("=", 1)[0]
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    guess = _SYNONYMS.get(name) or next(iter(difflib.get_close_matches(name, options, n=1)), None)
    hint = f"; did you mean {guess}?" if guess in options else ""
    return _arg_error(f"unknown option {name}{hint} (see {parser.prog} --help)")


# ---------------------------------------------------------------------------------------------
# Checks before loading: the prompt, the mesh, the model's path and metadata.


def _prompt_text(args: argparse.Namespace) -> tuple[str, str]:
    """The prompt and the flag it came from."""
    if args.prompt is None and args.prompt_file is None:
        raise _arg_error(
            "give a prompt: --prompt TEXT, --prompt - (standard input) or --prompt-file PATH"
        )
    if args.prompt is not None and args.prompt_file is not None:
        raise _arg_error("give the prompt once: --prompt or --prompt-file, not both")
    if args.prompt == "-":
        flag = "--prompt -"
        try:
            text = sys.stdin.read(TEXT_FILE_LIMIT + 1)
        except UnicodeDecodeError:
            raise _arg_error("--prompt -: standard input is not UTF-8 text") from None
        if len(text) > TEXT_FILE_LIMIT:
            raise _arg_error(
                f"--prompt -: standard input is longer than {TEXT_FILE_LIMIT} characters"
            )
    elif args.prompt is not None:
        flag, text = "--prompt", args.prompt
    else:
        flag, text = "--prompt-file", _read_prompt_file(pathlib.Path(args.prompt_file))
    if flag != "--prompt":
        # Files and `echo` end in a newline that is not part of the prompt.
        text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        where = {"--prompt -": "--prompt -: standard input", "--prompt-file": "--prompt-file"}
        raise _arg_error(f"{where.get(flag, flag)} is empty")
    _check_utf8(text, flag)
    return text, flag


def _check_utf8(text: str, flag: str) -> None:
    """Bytes that are not UTF-8 in an argument reach Python as lone surrogates, which no
    tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _arg_error(f"{flag} is not UTF-8 text") from None


def _read_prompt_file(path: pathlib.Path) -> str:
    from ferrum_jax.checkpoint.text_files import read_text_file

    return read_text_file(path, "--prompt-file")


def _mesh(spec: str | None) -> Mesh | None:
    """The `--mesh` flag's mesh, checked against the devices (None: one device)."""
    if spec is None:
        return None
    import jax

    from ferrum_jax import sharding

    try:
        data, model = sharding.parse_mesh(spec)
    except FerrumError:
        raise _arg_error(f"--mesh must be data=N,model=M with N, M >= 1 (got {spec!r})") from None
    available = len(jax.devices())
    if data * model > available:
        raise _arg_error(f"--mesh {spec} needs {data * model} devices, {available} available")
    return sharding.make_mesh(data=data, model=model)


def _attention_for(args: argparse.Namespace) -> str:
    """`--attention` (checked by `_attention`) with `--kv-dtype`: quantized KV pages run the
    xla implementation (the kernels read float pages only)."""
    from ferrum_jax.models import kv_quant

    impl = _attention(args.attention)
    kv_dtype = None if args.kv_dtype == "auto" else args.kv_dtype
    if kv_dtype is not None and impl != "xla":
        log.info("the %s attention kernel cannot read %s KV pages: xla runs", impl, kv_dtype)
    return kv_quant.implementation(impl, kv_dtype)


def _attention(name: str) -> str:
    """The `--attention` flag's implementation, checked against this platform: a kernel off
    its own platform runs only in Pallas interpret mode (for tests), far too slow to use."""
    import jax

    from ferrum_jax.models import attention

    try:
        impl = attention.resolve_implementation(name)
    except FerrumError as e:
        raise _arg_error(f"--attention: {e.message}") from None
    if impl not in ("xla", attention.default_implementation()):
        raise _arg_error(
            f"--attention {impl} needs a {impl.upper()} backend; JAX's backend here is "
            f"{jax.default_backend()} (use auto or xla)"
        )
    return impl


def _model_path(
    value: str | None,
    flag: str = "--model",
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> str | None:
    """The local path of what `value` names once `load_model` can read it (None: the
    embedded model); a hub name resolves to its files in the Hugging Face cache."""
    if value is None:
        if revision is not None or gguf_file is not None:
            raise _arg_error("--revision and --gguf-file need a hub name in --model (org/name)")
        return None  # a missing default model is a broken install, reported by the load
    from ferrum_jax.checkpoint import model_format

    try:
        path, _ = model_format(value, revision=revision, gguf_file=gguf_file)
    except FerrumError as e:
        if e.kind not in (ErrorKind.NOT_FOUND, ErrorKind.INVALID_PARAMETER, ErrorKind.UNSUPPORTED):
            raise
        raise _arg_error(f"{flag} {e.message}") from None
    if path != pathlib.Path(value):  # a hub name: say which files it is
        log.info("%s is %s", value, path)
    return str(path)


def _hub_model(args: argparse.Namespace) -> str | None:
    """`--model` (with `--revision`, `--gguf-file`) as a local path."""
    return _model_path(args.model, revision=args.revision, gguf_file=args.gguf_file)


def _tokenizer(model: str | None, *, chat: bool, template: str | None = None) -> Tokenizer:
    """The checkpoint's tokenizer, read without its weights; `template` is a `--chat-template`
    file that replaces its chat template."""
    from ferrum_jax.checkpoint import read_tokenizer

    tokenizer = read_tokenizer(model)
    if tokenizer is None:
        raise FerrumError.tokenizer(f"{_name(model)} ships no tokenizer; cannot encode a prompt")
    if template is not None:
        tokenizer = tokenizer.with_chat_template(_read_chat_template(pathlib.Path(template)))
    if chat and tokenizer.chat_template is None:
        raise _arg_error(
            f"{_name(model)} has no chat template, which --chat and chat need; "
            "give one with --chat-template FILE"
        )
    return tokenizer


def _family_line(config: ModelConfig) -> str:
    """The family and what sets this checkpoint apart inside it, for `info`."""
    from ferrum_jax.models.family import family

    facts = [family(config).name]
    layers = config.num_layers
    sliding = sum(config.layer_window(i) is not None for i in range(layers))
    if sliding:
        facts.append(f"sliding window {config.sliding_window} on {sliding} of {layers} layers")
    if config.num_experts:
        facts.append(f"{config.num_experts} experts, {config.num_experts_per_tok} per token")
    caps = [c for c in (config.attn_logit_softcap, config.final_logit_softcap) if c is not None]
    if caps:
        facts.append(f"soft-caps {config.attn_logit_softcap} / {config.final_logit_softcap}")
    return "; ".join(facts)


def _read_chat_template(path: pathlib.Path) -> str:
    from ferrum_jax.checkpoint.text_files import read_text_file

    # Universal newlines, as Python reads text: a template saved with CRLF renders no \r.
    text = read_text_file(path, "--chat-template").replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise _arg_error(f"--chat-template {path}: is empty")
    return text


def _context(model: str | None) -> int:
    from ferrum_jax.checkpoint import describe_model

    return describe_model(model).config.max_position_embeddings


def _token_budget(limit: int | str, prompt_tokens: int, context: int, prompt: str) -> int:
    """`--max-new-tokens` as a number, checked against the context (`max`: what is left)."""
    from ferrum_jax.engine import check_context_length

    wanted = 1 if limit == MAX else int(limit)
    check_context_length(
        prompt_tokens, wanted, context, prompt=f"prompt ({prompt})", max_new="--max-new-tokens"
    )
    return context - prompt_tokens if limit == MAX else wanted


def _sampling(args: argparse.Namespace) -> SamplingParams:
    from ferrum_jax.sampling import SamplingParams

    return SamplingParams.make(
        1, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
    )


def _name(model: str | None) -> str:
    if model is None:
        from ferrum_jax.checkpoint import default_model_path

        return default_model_path().name
    return pathlib.Path(model).name


def _load(
    model: str | None,
    dtype: str,
    mesh: Mesh | None = None,
    quantize: str = "none",
    allow_non_finite: bool = False,
) -> Model:
    """The one place the CLI loads weights: every check of the arguments runs before it."""
    from ferrum_jax.checkpoint import load_model

    start = time.perf_counter()
    where = "" if mesh is None else f" on a {dict(mesh.shape)} mesh"
    log.info("loading %s as %s%s", _name(model), dtype if quantize == "none" else quantize, where)
    with progress.waiting("loading"):  # an orbax restore has no tensor-by-tensor bar
        loaded = load_model(
            model,
            dtype=dtype,
            mesh=mesh,
            quantize=None if quantize == "none" else quantize,
            allow_non_finite=allow_non_finite,
        )
    log.info("loaded in %.1f s", time.perf_counter() - start)
    return loaded


# ---------------------------------------------------------------------------------------------
# Streaming an answer: stop tokens, stop strings, detokenisation.


@dataclasses.dataclass(frozen=True)
class _Answer:
    text: str
    """Decoded `token_ids` (special tokens skipped), cut before the first stop string."""
    token_ids: list[int]
    """Every generated token, the one that ended generation (stop token or the token that
    completed a stop string) included."""
    finish_reason: str
    """`"stop"` (stop token or stop string) or `"length"` (the token limit)."""


def _answer(
    tokens: Iterator[StreamedToken],
    tokenizer: Tokenizer,
    stops: Sequence[str],
    write: Callable[[str], None] | None,
) -> _Answer:
    """Consumes `tokens` until a stop token, a stop string or their end; `write` (if given)
    receives the text as it becomes safe to show."""
    from ferrum_jax.text import StopStrings

    detokenizer = tokenizer.stream_decoder(skip_special_tokens=True)
    matcher = StopStrings(stops)
    token_ids: list[int] = []
    parts: list[str] = []
    finish = "length"

    def emit(piece: str) -> None:
        if piece:
            parts.append(piece)
            if write is not None:
                write(piece)

    for token in tokens:
        token_ids.append(token.token_id)
        if token.stop:
            finish = "stop"
            break
        emit(matcher.push(detokenizer.push(token.token_id)))
        if matcher.matched is not None:
            break
    if matcher.matched is None:
        emit(matcher.push(detokenizer.flush()))
        emit(matcher.flush())
    if matcher.matched is not None:
        finish = "stop"
    return _Answer("".join(parts), token_ids, finish)


def _first_waited(tokens: Iterator[StreamedToken], desc: str) -> Iterator[StreamedToken]:
    """`tokens`, shown as the stage `desc` until the first one comes: a new prompt shape
    compiles its prefill first (5-10 s on a 2-core CPU)."""
    with progress.waiting(desc):
        first = next(tokens, None)
    if first is not None:
        yield first
        yield from tokens


def _write_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _stopped(reason: str) -> None:
    sys.stdout.flush()  # the notice goes after the text on a shared terminal
    print(f"[stopped: {reason}]", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Commands.


def _generate(args: argparse.Namespace) -> int:
    from ferrum_jax import sharding
    from ferrum_jax.streaming import stream_tokens

    if args.input_file is not None or args.output is not None:
        return _generate_file(args)
    constraint = _constraint(args)
    if args.system is not None and not args.chat:
        raise _arg_error("--system needs --chat (the system message is part of the chat template)")
    if args.system == "":
        raise _arg_error("--system is empty")
    if args.system is not None:
        _check_utf8(args.system, "--system")
    text, flag = _prompt_text(args)
    sampling = _sampling(args)
    args.attention = _attention_for(args)
    mesh = _mesh(args.mesh)
    model_path = _hub_model(args)
    tokenizer = _tokenizer(model_path, chat=args.chat, template=args.chat_template)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt_ids = tokenizer.encode_chat([*system, {"role": "user", "content": text}])
    else:
        prompt_ids = tokenizer.encode(text)
    max_new = _token_budget(args.max_new_tokens, len(prompt_ids), _context(model_path), flag)

    model = _load(model_path, args.dtype, mesh, args.quantize, args.allow_non_finite)
    if constraint is not None:
        return _generate_constrained(args, model, prompt_ids, max_new, constraint)
    log.info(
        "prefilling %s (compiling, if this shape is new)",
        progress.plural(len(prompt_ids), "prompt token"),
    )
    timings: dict[str, float] = {}
    primary = sharding.is_primary()
    tokens = stream_tokens(
        model,
        prompt_ids,
        max_new_tokens=max_new,
        sampling=sampling,
        seed=args.seed,
        stop_tokens=tokenizer.eos_token_ids or model.config.eos_token_ids,
        timings=timings,
        attention_impl=args.attention,
    )
    stream = _write_stdout if primary and not args.json else None
    answer = _answer(_first_waited(tokens, "prefill"), tokenizer, args.stop, stream)
    generated = len(answer.token_ids)
    # Tokens/s of the decode steps alone: the first step compiles the decode program.
    running_s = timings.get("decode_s", 0.0) - timings.get("decode_compile_s", 0.0)
    report = {
        "text": answer.text,
        "token_ids": answer.token_ids,
        "prompt_token_ids": list(prompt_ids),
        "finish_reason": answer.finish_reason,
        "timings": {
            key: timings.get(key, 0.0)
            for key in ("prefill_s", "compile_s", "decode_s", "decode_compile_s")
        }
        | {"decode_tok_s": (generated - 1) / running_s if running_s > 0 and generated > 1 else 0.0},
    }
    if not primary:
        return 0
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    _write_stdout("\n")
    log.info("%s", _speed_line(generated, report["timings"]))
    if answer.finish_reason == "length":
        _stopped(f"max-new-tokens {max_new} reached")
    return 0


def _speed_line(generated: int, timings: dict[str, float]) -> str:
    """`12 tokens: first token after 6.78 s (compile 5.91 s), then 14.2 tokens/s (decode
    compile 1.10 s excluded)`: compiling is said apart, never counted as decoding."""
    line = f"{progress.plural(generated, 'token')}: first token after {timings['prefill_s']:.2f} s"
    line += f" (compile {timings['compile_s']:.2f} s)"
    if generated > 1:
        line += f", then {timings['decode_tok_s']:.1f} tokens/s"
        if timings["decode_compile_s"] >= 0.005:  # shown as 0.00 s otherwise
            line += f" (decode compile {timings['decode_compile_s']:.2f} s excluded)"
    return line


def _constraint(args: argparse.Namespace) -> Constraint | None:
    """`--json-schema FILE` or `--regex PATTERN` checked (before any weights load)."""
    from ferrum_jax.checkpoint.text_files import read_text_file
    from ferrum_jax.text.grammar import Constraint

    try:
        if args.json_schema is not None:
            return Constraint.json_schema(read_text_file(args.json_schema, "--json-schema"))
        if args.regex is not None:
            return Constraint.regex(args.regex)
    except FerrumError as e:
        flag = "--json-schema" if args.json_schema is not None else "--regex"
        raise _arg_error(f"{flag}: {e.message}") from None
    return None


def _generate_constrained(
    args: argparse.Namespace,
    model: Model,
    prompt_ids: list[int],
    max_new: int,
    constraint: Constraint,
) -> int:
    """One prompt under `--json-schema`/`--regex`: a batch of one through `generate_batch`,
    whose steps mask the logits on the device; the text prints once complete."""
    from ferrum_jax import sharding
    from ferrum_jax.batch_generation import GenerationRequest, generate_batch
    from ferrum_jax.engine import bucket
    from ferrum_jax.executor import JaxModelExecutor

    tokenizer = model.tokenizer
    executor = JaxModelExecutor(
        model,
        max_batch_size=1,
        # A power of two: prompts of similar length reuse compiled programs.
        max_sequence_length=min(
            bucket(len(prompt_ids) + max_new, minimum=64), model.config.max_position_embeddings
        ),
        attention_impl=args.attention,
    )
    request = GenerationRequest(
        prompt_ids,
        max_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tokenizer.eos_token_ids or model.config.eos_token_ids,
        constraint=constraint,
    )
    (result,) = generate_batch(executor, [request], tokenizer=tokenizer)
    if not sharding.is_primary():
        return 0
    if args.json:
        report = {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_token_ids": list(prompt_ids),
            "finish_reason": result.finish_reason,
        }
        print(json.dumps(report, ensure_ascii=False))
        return 0
    _write_stdout(result.text + "\n")
    if result.finish_reason == "length":
        _stopped(f"max-new-tokens {max_new} reached (the answer may not match)")
    return 0


def _generate_file(args: argparse.Namespace) -> int:
    """`generate --input-file --output`: every line of a JSONL file, continuous batching."""
    from ferrum_jax import jsonl_batch
    from ferrum_jax.executor import JaxModelExecutor

    if args.input_file is None or args.output is None:
        raise _arg_error("--input-file and --output go together (batch mode)")
    for flag, given in (
        ("--prompt", args.prompt is not None),
        ("--prompt-file", args.prompt_file is not None),
        ("--chat", args.chat),
        ("--system", args.system is not None),
        ("--json", args.json),
    ):
        if given:
            raise _arg_error(
                f"{flag} does not go with --input-file (each line holds its prompt or messages)"
            )
    input_file, output = pathlib.Path(args.input_file), pathlib.Path(args.output)
    constraint = _constraint(args)
    resume = jsonl_batch.read_done(output, input_file)
    args.attention = _attention_for(args)
    mesh = _mesh(args.mesh)
    model_path = _hub_model(args)
    tokenizer = _tokenizer(model_path, chat=False, template=args.chat_template)
    from ferrum_jax.checkpoint import describe_model

    config = describe_model(model_path).config
    defaults = jsonl_batch.LineDefaults(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        constraint=constraint,
    )
    batch = jsonl_batch.read_input(
        input_file,
        tokenizer,
        context=config.max_position_embeddings,
        vocab=config.vocab_size,
        defaults=defaults,
        done=resume.done,
    )
    for error in batch.errors:
        print(
            f"ferrum-jax: {args.input_file}:{error.line}: skipped: {error.message}", file=sys.stderr
        )
    if batch.skipped:
        log.info("%s already in %s: skipped", progress.plural(batch.skipped, "line"), args.output)
    if batch.requests:
        from ferrum_jax.engine import bucket

        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in batch.requests)
        model = _load(model_path, args.dtype, mesh, args.quantize, args.allow_non_finite)
        executor = JaxModelExecutor(
            model,
            max_batch_size=min(args.batch_size, len(batch.requests)),
            # A power of two: runs with similar lines reuse compiled programs.
            max_sequence_length=min(bucket(longest, minimum=64), config.max_position_embeddings),
            attention_impl=args.attention,
        )
        log.info(
            "generating %s, %d at a time",
            progress.plural(len(batch.requests), "line"),
            executor.max_batch_size,
        )
        jsonl_batch.run(executor, batch.requests, output, tokenizer=tokenizer, resume=resume)
    if batch.errors:
        print(
            f"ferrum-jax: {progress.plural(len(batch.errors), 'line')} of {args.input_file} "
            "skipped (see above)",
            file=sys.stderr,
        )
        return 1
    return 0


def _eval(argv: list[str]) -> int:
    """`eval ARGS`: lm-eval's command line with the `ferrum-jax` model registered."""
    try:
        from ferrum_jax import eval_harness
    except ImportError as e:
        raise FerrumError.unsupported(f"{e} (the eval extra)") from None
    return eval_harness.run_cli(argv)


def _chat(args: argparse.Namespace) -> int:
    from ferrum_jax.chat import ChatSession

    if args.system == "":
        raise _arg_error("--system is empty")
    sampling = _sampling(args)
    args.attention = _attention_for(args)
    mesh = _mesh(args.mesh)
    model_path = _hub_model(args)
    tokenizer = _tokenizer(model_path, chat=True, template=args.chat_template)
    model = _load(model_path, args.dtype, mesh, args.quantize, args.allow_non_finite)
    session = ChatSession(
        model,
        tokenizer=tokenizer,
        system=args.system,
        sampling=sampling,
        seed=args.seed,
        stop_tokens=tokenizer.eos_token_ids or model.config.eos_token_ids,
        attention_impl=args.attention,
    )
    log.info("chatting with %s; /exit or Ctrl-D ends the chat", _name(model_path))
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            _write_stdout("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        room = session.context - len(session.prompt_ids(text))
        if room < 1:
            raise FerrumError.resource_exhausted(
                f"the conversation no longer fits the model's context of {session.context} "
                "tokens; start a new chat"
            )
        wanted = room if args.max_new_tokens == MAX else args.max_new_tokens
        budget = min(wanted, room)
        tokens = _first_waited(session.send(text, max_new_tokens=budget), "answering")
        answer = _answer(tokens, tokenizer, args.stop, _write_stdout)
        session.add_answer(answer.text)
        _write_stdout("\n")
        if answer.finish_reason == "length":
            full = args.max_new_tokens == MAX or budget < wanted
            _stopped(
                f"the model's context of {session.context} tokens is full"
                if full
                else f"max-new-tokens {budget} reached"
            )


def _convert(args: argparse.Namespace) -> int:
    from ferrum_jax.checkpoint import save_orbax
    from ferrum_jax.checkpoint.orbax import check_destination

    source = _model_path(args.src, flag="SRC")
    try:
        check_destination(args.dst, overwrite=args.force)
    except FerrumError as e:
        if e.kind is ErrorKind.ALREADY_EXISTS and not args.force:
            raise _arg_error(f"DST {args.dst} already exists; pass --force to replace it") from None
        raise _arg_error(f"DST {e.message}") from None
    start = time.perf_counter()
    model = _load(
        source, args.dtype, quantize=args.quantize, allow_non_finite=args.allow_non_finite
    )
    log.info("saving orbax %s", args.dst)
    save_orbax(model, args.dst, overwrite=args.force)
    print(
        f"converted {model.format} {args.src} -> orbax {args.dst} "
        f"({args.dtype if args.quantize == 'none' else args.quantize}, "
        f"{time.perf_counter() - start:.1f}s)"
    )
    return 0


def _size(nbytes: float) -> str:
    """Bytes in binary units: `513.1 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _info(args: argparse.Namespace) -> int:
    import jax

    from ferrum_jax.checkpoint import describe_model
    from ferrum_jax.dtypes import model_dtype
    from ferrum_jax.models import attention, kv_quant, quant

    described = describe_model(_hub_model(args))
    config = described.config
    itemsize = model_dtype(args.dtype).itemsize
    kv_dtype = None if args.kv_dtype == "auto" else args.kv_dtype
    layout = attention.IMPLEMENTATIONS[kv_quant.implementation("xla", kv_dtype)].layout
    kv_per_token = kv_quant.bytes_per_token(
        layout, config.num_layers, config.num_kv_heads, config.head_dim, model_dtype(args.dtype)
    )
    weights = config.num_params * itemsize
    if args.quantize != "none":
        weights = quant.quantized_bytes(config, model_dtype(args.dtype), args.quantize)
    report: dict[str, Any] = {
        "source": described.source,
        "format": described.format,
        "architecture": config.architecture,
        "parameters": config.num_params,
        "dtype": args.dtype,
        "weights": args.quantize if args.quantize != "none" else args.dtype,
        "parameter_bytes": weights,
        "file_bytes": described.file_bytes,
        "quantization": {
            e.name: {"tensors": e.tensors, "bytes": e.nbytes} for e in described.encodings
        },
        "kv_dtype": kv_dtype or args.dtype,
        "kv_bytes_per_token": kv_per_token,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "family": _family_line(config).split(";")[0],
        "sliding_window": config.sliding_window,
        "sliding_layers": sum(config.layer_window(i) is not None for i in range(config.num_layers)),
        "experts": config.num_experts,
        "experts_per_token": config.num_experts_per_tok if config.num_experts else 0,
        "tokenizer": described.has_tokenizer,
        "chat_template": described.has_chat_template,
        "devices": [str(d) for d in jax.devices()],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    mix = ", ".join(
        f"{e.name} ({e.tensors} tensor{'s' * (e.tensors != 1)}, {_size(e.nbytes)})"
        for e in described.encodings
    )
    context = config.max_position_embeddings
    tokenizer = "none"
    if described.has_tokenizer:
        tokenizer = (
            "yes, with a chat template" if described.has_chat_template else "yes, no chat template"
        )
    rows = [
        ("model", pathlib.Path(described.source).name),
        ("path", described.source),
        ("format", f"{described.format}, {_size(described.file_bytes)} on disk"),
        ("quantization", mix),
        (
            "architecture",
            f"{config.architecture}: {config.num_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_heads} heads ({config.num_kv_heads} KV), head_dim {config.head_dim}",
        ),
        ("family", _family_line(config)),
        ("parameters", f"{config.num_params / 1e6:.1f}M"),
        ("vocabulary", f"{config.vocab_size} tokens"),
        ("context", f"{context} tokens"),
        ("tokenizer", tokenizer),
        (f"{report['weights']} weights", _size(report["parameter_bytes"])),
        (
            f"{report['kv_dtype']} KV cache",
            f"{_size(kv_per_token)} per token, {_size(kv_per_token * context)} at full context",
        ),
        ("devices", ", ".join(report["devices"])),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ferrum_jax.bench import run_bench
    from ferrum_jax.checkpoint.text_files import check_output
    from ferrum_jax.engine import MIN_BUCKET, bucket, check_context_length

    # Before the benchmark runs: a report path that cannot be written would lose its result.
    for flag, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path is not None:
            check_output(path, flag)
    args.attention = _attention_for(args)
    _mesh(args.mesh)
    args.model = _hub_model(args)  # run_bench loads the local path
    context = _context(args.model)
    if args.serve:
        from ferrum_jax.serve_bench import run_serve_bench

        longest = args.serve_prompts[1] + args.serve_outputs[1]
        if longest > context:
            raise _arg_error(
                f"--serve-prompts and --serve-outputs reach {longest} tokens, more than the "
                f"model's context of {context} tokens"
            )
        return run_serve_bench(args)
    for prompt_len in args.prompt_len:
        check_context_length(
            prompt_len,
            args.new_tokens,
            context,
            prompt="prompt (--prompt-len)",
            max_new="--new-tokens",
        )
        needed = bucket(prompt_len, minimum=MIN_BUCKET) + args.new_tokens
        for max_context in args.max_context or ():
            if not needed <= max_context <= context:
                raise _arg_error(
                    f"--max-context {max_context} must hold the padded prompt and the new "
                    f"tokens ({needed}) and fit the model's context ({context})"
                )
    return run_bench(args)


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": _generate,
    "chat": _chat,
    "convert": _convert,
    "info": _info,
    "bench": _bench,
    "eval": lambda args: 0,  # handed over to lm-eval before parsing (`main`)
}


# ---------------------------------------------------------------------------------------------
# The entry point.


def _enable_compilation_cache() -> None:
    """Keeps compiled programs on disk, so a second run starts without compiling.

    `JAX_COMPILATION_CACHE_DIR` overrides the location; an empty value disables it.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") is not None:
        return  # JAX reads it itself
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(cache / "ferrum-jax" / "xla"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ferrum-jax` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser, subparsers = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    try:
        if argv[0] == "eval":  # lm-eval parses its own flags
            with progress.stage_lines():
                _enable_compilation_cache()
                return _eval(argv[1:])
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:  # --help and --version print, then exit 0
            return int(e.code or 0)
        if extra:
            raise _unknown(extra, subparsers[args.command])
        with progress.stage_lines(getattr(args, "quiet", False)):
            _enable_compilation_cache()
            return _HANDLERS[args.command](args)
    except FerrumError as e:
        if debug:
            raise
        # One line, whatever the message holds (a library's multi-line text, say).
        print(f"ferrum-jax: error: {' '.join(e.message.split())}", file=sys.stderr)
        return 2 if e.kind is ErrorKind.INVALID_PARAMETER else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
