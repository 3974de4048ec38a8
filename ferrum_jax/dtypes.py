"""The dtypes a model's params and compute run in, by name: the one table everyone reads."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ferrum_jax.errors import FerrumError

MODEL_DTYPES: dict[str, np.dtype] = {
    "float32": jnp.dtype(jnp.float32),
    "bfloat16": jnp.dtype(jnp.bfloat16),
}
"""Name -> dtype of every supported param/compute dtype (CLI `--dtype`, `load_model(dtype=)`)."""

DTYPE_NAMES: tuple[str, ...] = tuple(MODEL_DTYPES)
"""The names, in the order help texts list them."""


def model_dtype(name: str) -> np.dtype:
    """The dtype named `name`; a `FerrumError` listing the choices otherwise."""
    if name not in MODEL_DTYPES:
        raise FerrumError.invalid_parameter(
            f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}"
        )
    return MODEL_DTYPES[name]
