"""Start-up: `--version` and `--help` answer without importing JAX; the lazy package still
gives every public name."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import ferrum_jax
from ferrum_jax import choices, cli

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every command's --help (eval's is lm-eval's own), then the top level's --help and --version,
# in one fresh interpreter: importing JAX costs 2-3 s, so it must not be in sys.modules after.
_NO_JAX = """
import contextlib, io, sys
from ferrum_jax import cli
for argv in ({argvs}):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0, argv
    assert out.getvalue(), argv
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "numpy"))
print(" ".join(heavy) or "none")
"""


def test_version_and_help_never_import_jax():
    commands = [c for c in cli._HANDLERS if c != "eval"]
    argvs = [["--version"], ["--help"], *([c, "--help"] for c in commands)]
    result = subprocess.run(
        [sys.executable, "-c", _NO_JAX.format(argvs=", ".join(map(repr, argvs)))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_the_light_choices_match_what_implements_them():
    from ferrum_jax.checkpoint import text_files
    from ferrum_jax.dtypes import DTYPE_NAMES
    from ferrum_jax.models.kv_quant import KV_DTYPES
    from ferrum_jax.models.quant import QUANTIZATIONS

    assert choices.DTYPE_NAMES == DTYPE_NAMES
    assert tuple(KV_DTYPES) == choices.KV_DTYPE_NAMES
    assert tuple(QUANTIZATIONS) == choices.QUANTIZATION_NAMES
    assert text_files.TEXT_FILE_LIMIT is choices.TEXT_FILE_LIMIT


def test_every_public_name_resolves_and_type_checkers_see_the_same_names():
    exported = {name for names in ferrum_jax._EXPORTS.values() for name in names}
    assert set(ferrum_jax.__all__) == exported | {"progress", "sharding"}
    tree = ast.parse((ROOT / "ferrum_jax" / "__init__.py").read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If))  # `if TYPE_CHECKING:`
    seen = {a.name for node in guarded.body for a in node.names}
    assert seen == set(ferrum_jax.__all__)
    for name in ferrum_jax.__all__:
        module = ferrum_jax._MODULE_OF.get(name)
        value = getattr(ferrum_jax, name)
        if module is not None:
            assert value is getattr(sys.modules[module], name), name
    assert ferrum_jax.engine is sys.modules["ferrum_jax.engine"]  # submodules, as before
    assert "Model" in dir(ferrum_jax)
    try:
        ferrum_jax.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
