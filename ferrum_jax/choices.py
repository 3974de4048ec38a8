"""The names the command line offers, importable without JAX.

`ferrum-jax --help` builds its parser from these: importing JAX (through `dtypes`,
`models.quant`, `models.kv_quant`) made `--version` and `--help` take 3.4-4.3 s on a busy
2-core CPU; they take 0.15-0.17 s without it.
The modules that implement each choice hold the same names (`dtypes.MODEL_DTYPES`,
`models.kv_quant.KV_DTYPES`, `models.quant.QUANTIZATIONS`); tests/test_startup.py checks
that they agree.
"""

from __future__ import annotations

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16")
"""Param/compute dtypes (`--dtype`), in the order help texts list them."""

KV_DTYPE_NAMES: tuple[str, ...] = ("int8", "float8_e4m3fn")
"""Quantized KV cache dtypes (`--kv-dtype`)."""

QUANTIZATION_NAMES: tuple[str, ...] = ("int8", "int4")
"""Weight quantizations (`--quantize`)."""

TEXT_FILE_LIMIT = 64 * 2**20
"""Most bytes read from a prompt file, chat template or JSONL input file, and from one line
of a JSONL results file (64 MiB); `--help` names it (`checkpoint.text_files` reads by it)."""
