"""Tokenizer files of an HF directory: read into a `Tokenizer`, written back from one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ferrum_jax.errors import FerrumError
from ferrum_jax.text.tokenizer import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    Tokenizer,
)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FerrumError.tokenizer(f"cannot read {path}: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise FerrumError.tokenizer(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise FerrumError.tokenizer(f"{path} is not a JSON object")
    return data


def has_tokenizer(root: str | os.PathLike[str]) -> bool:
    """`root` holds a `tokenizer.json`."""
    return (Path(root) / TOKENIZER_FILE).is_file()


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Loads an HF tokenizer directory the way transformers 5 does.

    Reads `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja` and
    `generation_config.json` (the last three optional); see `Tokenizer.from_files`.
    """
    root = Path(path)
    tok_path = root / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FerrumError.tokenizer(f"missing {tok_path}")
    config_path, jinja_path = root / TOKENIZER_CONFIG_FILE, root / CHAT_TEMPLATE_FILE
    gen_path = root / GENERATION_CONFIG_FILE
    return Tokenizer.from_files(
        _read_text(tok_path),
        _read_json(config_path) if config_path.is_file() else {},
        chat_template=_read_text(jinja_path) if jinja_path.is_file() else None,
        generation_config=_read_json(gen_path) if gen_path.is_file() else None,
        source=str(root),
    )


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> None:
    """Writes `tokenizer`'s files into `path` so `load_tokenizer(path)` round-trips.

    Extra end-of-generation ids are merged into an existing `generation_config.json`; an
    existing `chat_template.jinja` is rewritten (or removed), as it would otherwise shadow the
    config's template.
    """
    root = Path(path)
    files = tokenizer.to_files()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            (root / name).write_text(files[name], encoding="utf-8")
        jinja_path = root / CHAT_TEMPLATE_FILE
        if jinja_path.exists():
            if tokenizer.chat_template is None:
                jinja_path.unlink()
            else:
                jinja_path.write_text(tokenizer.chat_template, encoding="utf-8")
        gen_path = root / GENERATION_CONFIG_FILE
        if GENERATION_CONFIG_FILE in files or gen_path.is_file():
            gen = _read_json(gen_path) if gen_path.is_file() else {}
            gen["eos_token_id"] = list(tokenizer.eos_token_ids)
            gen_path.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise FerrumError.io(f"cannot save tokenizer to {root}: {e}") from e
