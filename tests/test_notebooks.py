"""The notebooks: each one runs top to bottom in fast mode, is committed without outputs, matches its generator,
and takes its math from `lab` instead of defining it again.

Executing a notebook starts a real Jupyter kernel (nbclient + ipykernel) in a temporary folder, so the runs/ records
the notebook writes land there, with LAB_FAST=1 so the runs are a few steps long.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # one cell; a whole notebook takes well under a minute in fast mode

# A notebook may call lab's losses, estimators and log-prob helpers, never write its own.
FORBIDDEN = [
    (
        re.compile(r"\bdef\s+\w*(loss|advantage|kl|logprob|log_prob|objective|whiten)\w*\s*\(", re.I),
        "defines a loss / advantage / KL / log-prob function",
    ),
    (re.compile(r"\w*(loss|advantage)\w*\s*=\s*lambda\b", re.I), "defines a loss or advantage as a lambda"),
    (
        re.compile(r"\b(logsigmoid|log_softmax|binary_cross_entropy\w*|cross_entropy)\s*\("),
        "computes a loss by hand instead of calling lab",
    ),
]


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOK_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_exist():
    """The tour is always there; the generator and the committed files list the same notebooks."""
    names = {p.stem for p in NOTEBOOKS}
    assert "01_tour" in names
    assert names == set(_load_generator().NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_stripped_and_matches_its_generator(path):
    """No outputs, no execution counts, and exactly what `python notebooks/make_notebooks.py` writes, so the
    generator and the notebooks cannot drift apart."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {cell.id} has outputs; rerun make_notebooks.py"
            assert cell.execution_count is None, f"{path.name}: cell {cell.id} has an execution count"
    generated = _load_generator().build(path.stem)
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in generated.cells], (
        f"{path.name} differs from notebooks/make_notebooks.py; run `python notebooks/make_notebooks.py`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_takes_its_math_from_lab(path):
    """No code cell defines a loss, an advantage, a KL or a log-prob function: it imports lab's."""
    nb = nbformat.read(path, as_version=4)
    sources = _code_cells(nb)
    assert any(re.search(r"^\s*(from lab\b|import lab\b)", s, re.M) for s in sources), f"{path.name} never imports lab"
    for source in sources:
        for pattern, why in FORBIDDEN:
            match = pattern.search(source)
            assert match is None, f"{path.name} {why}: {match.group(0)!r}"


def test_forbidden_patterns_catch_a_redefined_loss():
    """The check above would notice a notebook that writes its own DPO loss."""
    cell = "def my_dpo_loss(a, b):\n    return -F.logsigmoid(beta * (a - b)).mean()"
    assert sum(bool(p.search(cell)) for p, _ in FORBIDDEN) == 2
    assert not any(p.search("loss, metrics = dpo_loss(chosen, rejected)") for p, _ in FORBIDDEN)


# 06_compare needs an enumerable response space (the bandit task) and says so instead of offering the switch.
WITHOUT_HUB_SWITCH = {"06_compare"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_header(path):
    """A Colab badge for this very file, one install cell that only acts on Colab, the LAB_FAST parameter and
    the hub switch, turned off."""
    nb = nbformat.read(path, as_version=4)
    assert f"/blob/main/notebooks/{path.name})" in nb.cells[0].source
    sources = _code_cells(nb)
    installs = [s for s in sources if "%pip install" in s]
    assert len(installs) == 1 and 'if "google.colab" in sys.modules:' in installs[0]
    assert sum('LAB_FAST = os.environ.get("LAB_FAST", "0") == "1"' in s for s in sources) == 1
    switches = sum(re.search(r"^USE_HUB = False\b", s, re.M) is not None for s in sources)
    assert switches == (0 if path.stem in WITHOUT_HUB_SWITCH else 1)
    assert not any(re.search(r"^USE_HUB = True", s, re.M) for s in sources)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
    """Execute every cell in a fresh kernel; any cell error fails the test with that cell's traceback."""
    from nbclient import NotebookClient

    monkeypatch.setenv("LAB_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The built-in models are tiny: one thread per kernel avoids oversubscribing a shared CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    started = time.time()
    client.execute()  # raises CellExecutionError naming the cell on the first error
    print(f"{path.name}: {time.time() - started:.1f} s")
    assert any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
