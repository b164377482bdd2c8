"""Every example notebook runs end to end at its reduced size, and refuses a wrong size in its
first cell.

The notebooks run in a fresh kernel each, from their own directory, with
``TRUSTREGION_NOTEBOOK_SIZE=reduced``; each one's wall time is printed (``pytest -s``, or read
in the ``-rA`` summary).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from trustregion.notebooks import SIZE_VARIABLE

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 900


def _client(notebook: nbformat.NotebookNode, path: Path) -> NotebookClient:
    return NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})


@pytest.fixture
def size(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The kernel inherits this process's environment."""
    monkeypatch.setenv(SIZE_VARIABLE, "reduced")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return monkeypatch


def test_the_notebooks_are_there() -> None:
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_reduced(path: Path, size: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    _client(notebook, path).execute()
    print(f"{path.name}: {time.perf_counter() - started:.0f} s at reduced size")
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_with_outputs_of_a_full_run(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), \
        f"{path.name}: commit it executed (every code cell run)"
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in code for out in cell.get("outputs", [])), f"{path.name}: no chart"
    text = "".join(out.get("text", "") for cell in code for out in cell.get("outputs", []))
    assert "size: reduced" not in text, f"{path.name} was committed from a reduced run"
    assert path.stat().st_size < 1_000_000, f"{path.name}: {path.stat().st_size} bytes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_a_wrong_size_fails_in_the_first_cell(path: Path, size: pytest.MonkeyPatch) -> None:
    size.setenv(SIZE_VARIABLE, "huge")
    notebook = nbformat.read(path, as_version=4)
    first = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    notebook.cells = notebook.cells[:first + 1]
    with pytest.raises(CellExecutionError, match="TRUSTREGION_NOTEBOOK_SIZE='huge' is not a "
                                                 "notebook size; allowed: 'full'"):
        _client(notebook, path).execute()
    assert os.environ[SIZE_VARIABLE] == "huge"
