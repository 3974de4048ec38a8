"""Chat templates rendered with jinja2 exactly as transformers' `apply_chat_template` renders them.

The environment mirrors `transformers.utils.chat_template_utils._cached_compile_jinja_template`:
a sandboxed, immutable environment with `trim_blocks`/`lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter that does not HTML-escape, and the `raise_exception` and
`strftime_now` globals. Messages are normalised the way transformers does before rendering (keys
whose value is None dropped, reasoning aliased), so templates see the same data.

A template is code from the checkpoint, so it renders under limits (`_Limits`): a wall-clock
deadline, a cap on the output, and size checks on everything that allocates from one
argument (`*`, `**`, `%`, `range`, width arguments, `tojson`'s indent). Breaking any limit,
or recursing without end, is one `FerrumError.tokenizer`; rendering within them is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ferrum_jax.errors import FerrumError

# Names a message's reasoning goes by; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Limits:
    """What one render may spend. Real chat templates render in well under a millisecond and
    produce prompts of at most a few hundred thousand characters."""

    SECONDS = 2.0
    """Wall-clock deadline of one render."""
    OUTPUT_CHARS = 8 * 2**20
    """Longest rendered prompt, and the largest string, list or width one operation may build."""
    INDENT = 64
    """Largest `tojson` indent."""
    POWER_BITS = 1 << 16
    """Largest integer `**` may build, in bits."""


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A chat template went past one of `_Limits`."""


# Widths in printf-style (`%10s`) and format-style (`{:>10}`) specs.
_PRINTF_WIDTHS = re.compile(r"%[-+ #0]*(\d+)(?:\.(\d+))?")
_FORMAT_WIDTHS = re.compile(r"[:<>^=]\D{0,3}?(\d+)")
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _check_size(what: str, n: int) -> None:
    if n > _Limits.OUTPUT_CHARS:
        raise TemplateLimitError(f"{what} of {n} exceeds the limit of {_Limits.OUTPUT_CHARS}")


def _check_widths(fmt: str, pattern: re.Pattern) -> None:
    for match in pattern.finditer(fmt):
        for width in match.groups():
            if width and (len(width) > 12 or int(width) > _Limits.OUTPUT_CHARS):
                raise TemplateLimitError(f"format width {width[:12]} exceeds the output limit")


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raises `TemplateLimitError` inside template code running past `seconds`.

    A line tracer over template frames only (compiled templates are `<template>`): loops over
    ranges or strings make no calls the sandbox could intercept, so time is checked per line.
    """
    end = time.monotonic() + seconds
    lines = 0
    previous = sys.gettrace()

    def on_line(frame, event, arg):
        nonlocal lines
        lines += 1
        if lines % 1024 == 0 and time.monotonic() > end:
            raise TemplateLimitError(f"chat template ran past its {seconds:g} s limit")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with size checks on the operations that allocate from one
    argument."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    _check_size("a repeated sequence", len(seq) * max(n, 0))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > _Limits.POWER_BITS:
                raise TemplateLimitError(f"{left} ** {right} is too large")
        elif operator == "%" and isinstance(left, str):
            _check_widths(left, _PRINTF_WIDTHS)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # The sandbox hands templates `str.format` wrapped; the wrapper keeps the method.
        method = getattr(__obj, "__wrapped__", __obj)
        name, owner = getattr(method, "__name__", ""), getattr(method, "__self__", None)
        if isinstance(owner, str):
            if name in _WIDTH_METHODS:
                for n in (*args, *kwargs.values()):
                    if isinstance(n, int):
                        _check_size(f"str.{name} width", n)
            elif name in ("format", "format_map"):
                _check_widths(owner, _FORMAT_WIDTHS)
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(name: str, width_at: int) -> Any:
    """Jinja's filter `name` refusing a width argument (position `width_at`) over the limit."""
    inner = jinja2.filters.FILTERS[name]

    @functools.wraps(inner)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        width = kwargs.get("width", args[width_at] if len(args) > width_at else None)
        if isinstance(width, int):
            _check_size(f"{name} width", width)
        return inner(*args, **kwargs)

    return bounded


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`, which would change prompts.
    size = len(indent) if isinstance(indent, str) else indent
    if isinstance(size, int) and size > _Limits.INDENT:
        raise TemplateLimitError(f"tojson indent {size} exceeds the limit of {_Limits.INDENT}")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type object itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja `namespace` that refuses underscore names, so templates cannot reach internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Jinja's signature trick: `self` is positional-only so `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` and renders the body as is.

    transformers uses the tag to find assistant tokens for training masks; some templates have it,
    and without the extension they would not compile.
    """

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template; cached because the same template is rendered for every request."""
    env = _LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    for name, width_at in (("center", 1), ("indent", 1), ("wordwrap", 1), ("truncate", 1)):
        env.filters[name] = _bounded_filter(name, width_at)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise FerrumError.tokenizer(f"chat template does not compile: {e}") from e


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` as transformers hands them to templates.

    Keys whose value is None are dropped (templates handle a missing key, not a `None` one), and
    reasoning given under any of its names is also exposed as `reasoning_content` and `thinking`.
    """
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise FerrumError.tokenizer(f"chat messages must be dicts, got {message!r}")
        msg = {k: v for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Renders `source` for one conversation; `kwargs` override `special_tokens` like transformers.

    `special_tokens` are the named tokens (`bos_token`, `eos_token`, ...) templates may reference.
    Any failure inside the template becomes `FerrumError.tokenizer`.
    """
    template = compile_chat_template(source)
    variables = {**(special_tokens or {}), **kwargs}
    chunks: list[str] = []
    size = 0
    try:
        with _deadline(_Limits.SECONDS):
            for chunk in template.generate(
                messages=normalize_messages(messages),
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            ):
                size += len(chunk)
                _check_size("the rendered prompt", size)
                chunks.append(chunk)
    # Templates run arbitrary expressions; whatever they raise is a broken template or bad input
    # (RecursionError: a macro calling itself without end; MemoryError: an allocation the size
    # checks did not foresee).
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        LookupError,
        ArithmeticError,
        RecursionError,
        MemoryError,
    ) as e:
        raise FerrumError.tokenizer(f"chat template failed to render: {e}") from e
    return "".join(chunks)
