"""Which weights hold NaN or infinity: one rule for checkpoints at load and for `update_params`.

Checked before quantization, since int8/int4 turn a NaN weight into finite garbage that no
logit reveals.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_finite(x: Any) -> bool:
    """True when `x` (numpy or jax, any dtype) holds no NaN or infinity; integers always do."""
    dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    if not jnp.issubdtype(dtype, jnp.inexact):
        return True
    if isinstance(x, jax.Array):
        return bool(jnp.isfinite(x).all())
    return bool(np.isfinite(np.asarray(x)).all())


def nonfinite_leaf(tree: Any) -> str | None:
    """The path (`jax.tree_util.keystr`) of the first non-finite leaf of a pytree, or None."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not is_finite(leaf):
            return jax.tree_util.keystr(path)
    return None
