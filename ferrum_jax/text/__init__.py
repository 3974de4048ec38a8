"""Text around the model: tokenizer, chat templates, incremental detokenisation (no file I/O)."""

from ferrum_jax.text.chat_template import render_chat_template
from ferrum_jax.text.detokenizer import IncrementalDetokenizer
from ferrum_jax.text.stops import StopStrings
from ferrum_jax.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopStrings", "Tokenizer", "render_chat_template"]
