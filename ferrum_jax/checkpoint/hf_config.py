"""`config.json`: the HF architecture dict of a model directory, parsed into a `ModelConfig`."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from ferrum_jax.errors import FerrumError
from ferrum_jax.models.config import ModelConfig

CONFIG_FILE = "config.json"


def parse_config(hf: Mapping[str, Any], source: object) -> ModelConfig:
    """`ModelConfig.from_hf(hf)`, naming `source` (the file it came from) in every error."""
    try:
        return ModelConfig.from_hf(hf)
    except FerrumError as e:
        raise FerrumError(e.kind, f"{source}: {e.message}") from e
    # Malformed values (a string count, zero heads) that from_hf does not check itself.
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as e:
        raise FerrumError.config(f"{source}: invalid config: {e!r}") from e


def read_config_dict(root: pathlib.Path) -> dict[str, Any]:
    """The JSON object in `root/config.json`."""
    path = root / CONFIG_FILE
    if not path.is_file():
        raise FerrumError.not_found(f"{root}: no {CONFIG_FILE}")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise FerrumError.invalid_format(f"{path}: not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise FerrumError.invalid_format(f"{path}: not a JSON object")
    return hf


def read_config(root: pathlib.Path) -> ModelConfig:
    """Parses `root/config.json`."""
    return parse_config(read_config_dict(root), root / CONFIG_FILE)


def write_config(config: ModelConfig, root: pathlib.Path) -> None:
    """Writes `config.to_hf()` as `root/config.json` (refuses a config it cannot round-trip)."""
    if ModelConfig.from_hf(config.to_hf()) != config:
        raise FerrumError.internal(f"config does not survive {CONFIG_FILE}: {config}")
    (root / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2))
