"""Chat templates rendered with jinja2 exactly as transformers' `apply_chat_template` renders them.

The environment mirrors `transformers.utils.chat_template_utils._cached_compile_jinja_template`:
a sandboxed, immutable environment with `trim_blocks`/`lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter that does not HTML-escape, and the `raise_exception` and
`strftime_now` globals. Messages are normalised the way transformers does before rendering (keys
whose value is None dropped, reasoning aliased), so templates see the same data.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
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


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`, which would change prompts.
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
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
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
    try:
        return template.render(
            messages=normalize_messages(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    # Templates run arbitrary expressions; whatever they raise is a broken template or bad input.
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
        raise FerrumError.tokenizer(f"chat template failed to render: {e}") from e
