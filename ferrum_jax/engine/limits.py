"""The model's context length: the one check every entry point runs before allocating."""

from __future__ import annotations

from ferrum_jax.errors import FerrumError


def check_context_length(
    prompt_tokens: int,
    max_new_tokens: int,
    context: int,
    *,
    prompt: str = "prompt",
    max_new: str = "max_new_tokens",
) -> None:
    """Raises unless a `prompt_tokens` prompt plus `max_new_tokens` fit in `context` positions.

    `context` is the model's `max_position_embeddings`: past it rotary positions were never
    trained and a cache would grow without bound. `prompt` and `max_new` name the inputs in
    the message (the CLI passes its flags), which always carries both numbers.
    """
    if prompt_tokens >= context:
        raise FerrumError.invalid_parameter(
            f"the {prompt} is {_tokens(prompt_tokens)}, more than fit the model's context of "
            f"{_tokens(context)}; shorten it to at most {_tokens(context - 1)}"
        )
    if prompt_tokens + max_new_tokens > context:
        raise FerrumError.invalid_parameter(
            f"the {prompt} is {_tokens(prompt_tokens)} and {max_new} is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} tokens exceed the model's context of "
            f"{_tokens(context)}; use {max_new} {context - prompt_tokens} or less"
        )


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"
