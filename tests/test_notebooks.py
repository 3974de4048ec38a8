"""The notebooks in `notebooks/` run top to bottom in a fresh kernel of this interpreter.

Each notebook asserts its own key facts in a cell (streamed tokens equal `generate`'s, no
recompiles, perplexity within 1e-3 of HF's, mesh tokens equal single-device tokens), so a
silently wrong result fails here as well as an exception does.

The saved copies are committed clean (no outputs, no execution counts): saved outputs went
stale as the API moved on and carried the absolute paths of the machine that ran them. To
clean one after editing it in Jupyter::

    .venv/bin/python tests/test_notebooks.py              # all of them
    .venv/bin/python tests/test_notebooks.py quickstart   # some of them
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart", "functional_eval_loop", "sharding_tour", "executor_contract")
PLOTS = {"quickstart", "functional_eval_loop", "executor_contract"}
"""Notebooks that draw with matplotlib: their saved copies must hold PNG outputs."""
CELL_TIMEOUT_S = 600
_PREFIX_PROBE = "import sys; print(sys.prefix, end='')"


def execute(name: str) -> nbformat.NotebookNode:
    """Runs `notebooks/<name>.ipynb` in a new `python3` kernel; raises on any cell error.

    Returns the executed notebook. Afterwards it checks that the kernel ran this
    interpreter's environment (the venv), not some other `python` on PATH.
    """
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PREFIX_PROBE))
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        coalesce_streams=True,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    probe = nb.cells.pop()
    kernel_prefix = "".join(o.get("text", "") for o in probe.outputs)
    assert kernel_prefix == sys.prefix, f"kernel ran {kernel_prefix!r}, not {sys.prefix!r}"
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    """Executes the notebook; any error, including a failed assert cell, fails the test.

    The plots must render (PNG outputs) in the fresh run too.
    """
    nb = execute(name)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert bool(pngs) == (name in PLOTS), f"{name}: {len(pngs)} PNG outputs"


@pytest.mark.parametrize("name", NAMES)
def test_saved_notebook_is_clean(name):
    """The committed copy holds code and text only: no outputs, counts or widget state."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} keep outputs; run tests/test_notebooks.py {name}"
    assert "widgets" not in nb.metadata


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drops outputs, execution counts and widget state."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    return nb


def main(names: list[str]) -> None:
    """Saves the notebooks clean."""
    for name in names or NAMES:
        path = NOTEBOOKS / f"{name}.ipynb"
        nbformat.write(clean(nbformat.read(path, as_version=4)), path)
        print(f"{name}: saved clean")


if __name__ == "__main__":
    main(sys.argv[1:])
