"""The layers flow one way, `checkpoint/` has no import cycle, and only it touches model files.

Read from the source with `ast` (imports inside functions count too), so a lazy import cannot
hide a dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (see pyproject's package-dir).
PACKAGES = {
    "ferrum_jax": "ferrum_jax",
    "models": "ferrum_jax.models",
    "sharding": "ferrum_jax.sharding",
}
UPPER_LAYERS = (
    "ferrum_jax.executor",
    "ferrum_jax.engine",
    "ferrum_jax.checkpoint",
    "ferrum_jax.cli",
    "ferrum_jax.bench",
    "ferrum_jax.chat",
    "ferrum_jax.factory",
    "ferrum_jax.streaming",
    "ferrum_jax.model",
    "ferrum_jax.paging",
    "ferrum_jax.batch_generation",
    "ferrum_jax.jsonl_batch",
    "ferrum_jax.eval_harness",
    "ferrum_jax.engine_loop",
    "ferrum_jax.serve_bench",
)
FILE_FORMAT_LIBRARIES = ("safetensors", "gguf", "orbax", "mmap")
# Library modules outside checkpoint/ that open files that are not model files.
NON_MODEL_FILES = {
    "ferrum_jax.bench": "writes the --json report",
    "ferrum_jax.executor.memory": "reads the host's free memory (/proc/meminfo, the cgroup limit)",
    "ferrum_jax.jsonl_batch": "reads the user's JSONL requests, appends their results",
    "ferrum_jax.serve_bench": "writes the --serve --json report",
}
FILE_CALLS = frozenset(
    {"open", "read_text", "read_bytes", "write_text", "write_bytes", "from_file"}
)


def _modules() -> dict[str, ast.Module]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(tree: ast.Module) -> set[str]:
    """Every module `tree` imports, by absolute name (`from a import b` yields a and a.b)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_package_was_read():
    assert {"ferrum_jax.models.llama", "ferrum_jax.sharding.rules", "ferrum_jax.executor"} <= set(
        MODULES
    )
    assert any(name.startswith("ferrum_jax.checkpoint.") for name in MODULES)


@pytest.mark.parametrize("package", ["ferrum_jax.models", "ferrum_jax.sharding"])
def test_models_and_sharding_import_nothing_above_them(package):
    bad = {
        (name, target)
        for name, tree in MODULES.items()
        if _within(name, (package,))
        for target in _imports(tree)
        if _within(target, UPPER_LAYERS)
    }
    assert not bad, f"{package} imports an upper layer: {sorted(bad)}"


def test_checkpoint_has_no_import_cycle():
    prefix = "ferrum_jax.checkpoint"
    nodes = {n for n in MODULES if n.startswith(prefix + ".")}
    edges = {n: {t for t in _imports(MODULES[n]) if t in nodes and t != n} for n in nodes}
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join([*path, node])}"
        visiting.add(node)
        for target in edges[node]:
            visit(target, [*path, node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(nodes):
        visit(node, [])
    assert edges["ferrum_jax.checkpoint.load"], "the dispatcher sits above the readers"


def _file_calls(tree: ast.Module) -> set[str]:
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in FILE_CALLS:
                calls.add(name)
    return calls


def test_only_checkpoint_touches_model_files():
    outside = {n: t for n, t in MODULES.items() if not _within(n, ("ferrum_jax.checkpoint",))}
    libraries = {
        (name, target)
        for name, tree in outside.items()
        for target in _imports(tree)
        if _within(target, FILE_FORMAT_LIBRARIES)
    }
    assert not libraries, f"file-format libraries used outside checkpoint/: {sorted(libraries)}"
    opened = {
        name: calls
        for name, tree in outside.items()
        if (calls := _file_calls(tree)) and name not in NON_MODEL_FILES
    }
    assert not opened, f"file I/O outside checkpoint/: {opened}"
    for name in NON_MODEL_FILES:
        assert name in MODULES and _file_calls(MODULES[name]), f"stale allowance for {name}"
