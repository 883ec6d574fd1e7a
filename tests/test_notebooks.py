"""The notebooks: each is a jupytext pair whose two sides hold the same cells, runs top to bottom in fast mode
without noise on stderr, is committed without outputs, carries the badge and install cell written from
pyproject.toml's repository URL, and takes its math from `lab` instead of defining it again.

Executing a notebook starts a real Jupyter kernel (nbclient + ipykernel) in a temporary folder, so the runs/ records
the notebook writes land there, with LAB_FAST=1 so the runs are a few steps long.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from lab import notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9]*.py"))
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


def test_every_notebook_is_a_pair():
    """The tour is there, and every .ipynb has its py:percent source and the other way round."""
    assert "01_tour" in {p.stem for p in NOTEBOOKS}
    assert {p.stem for p in NOTEBOOKS} == {p.stem for p in SOURCES}
    assert not (NOTEBOOK_DIR / "make_notebooks.py").exists()
    for path in SOURCES:
        assert path.read_text().count("# %%") >= 2, f"{path.name} is not in py:percent format"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_pair_has_the_same_cells_and_the_notebook_no_outputs(path):
    """The .ipynb holds exactly the .py's cells (jupytext reads both) and is committed without outputs."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {cell.id} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {cell.id} has an execution count"
    assert notebook.cells(path.with_suffix(".py")) == notebook.cells(path), (
        f"{path.name} and {path.stem}.py differ; run `jupytext --sync notebooks/{path.stem}.py`"
    )


def test_drift_is_caught_and_sync_repairs_it(tmp_path):
    """Appending a cell to the .py makes the pair differ; `jupytext --sync` on the .py (the documented workflow)
    brings the cell into the .ipynb, after the cells it already had."""
    from jupytext.cli import jupytext as jupytext_cli

    for name in ("01_tour.py", "01_tour.ipynb", "jupytext.toml"):
        shutil.copy(NOTEBOOK_DIR / name, tmp_path / name)
    py, ipynb = tmp_path / "01_tour.py", tmp_path / "01_tour.ipynb"
    before = notebook.cells(ipynb)
    with py.open("a") as f:
        f.write('\n# %% [markdown]\n# ## 6. One more section\n\n# %%\nprint("appended")\n')
    os.utime(py, (time.time() + 5, time.time() + 5))  # the edited side is the newer one, as after saving it
    assert notebook.cells(py) != notebook.cells(ipynb)
    jupytext_cli(["--sync", str(py)])
    assert notebook.cells(ipynb) == notebook.cells(py)
    assert notebook.cells(ipynb) == [*before, ("markdown", "## 6. One more section"), ("code", 'print("appended")')]


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
    """The Colab badge for this very file and one install cell, both as lab.notebook writes them from
    pyproject.toml's URL; setup() and the LAB_FAST parameter; the hub switch, turned off."""
    nb = nbformat.read(path, as_version=4)
    assert notebook.colab_badge(path.stem) in nb.cells[0].source
    sources = _code_cells(nb)
    assert sources[0] == notebook.install_cell(), f"{path.name}: run `python -m lab.notebook sync`"
    assert sum("subprocess.run" in s for s in sources) == 1
    assert re.search(r"^setup\(\)", sources[1], re.M)
    assert sum('LAB_FAST = os.environ.get("LAB_FAST", "0") == "1"' in s for s in sources) == 1
    switches = sum(re.search(r"^USE_HUB = False\b", s, re.M) is not None for s in sources)
    assert switches == (0 if path.stem in WITHOUT_HUB_SWITCH else 1)
    assert not any(re.search(r"^USE_HUB = True", s, re.M) for s in sources)


def test_repository_url_has_one_source(tmp_path):
    """pyproject.toml names the repository once; `python -m lab.notebook sync` moves every badge and install cell
    to another URL (a fork's), so nothing else in the notebooks names the repository."""
    url = notebook.repository_url()
    assert notebook.github_path(url) == "lab-rl/lab"
    assert (ROOT / "pyproject.toml").read_text().count(url) == 1
    for name in [p.name for p in SOURCES] + [p.name for p in NOTEBOOKS] + ["jupytext.toml"]:
        shutil.copy(NOTEBOOK_DIR / name, tmp_path / name)
    changed = notebook.sync(tmp_path, url="https://github.com/someone/fork")
    assert len(changed) == 2 * len(SOURCES)  # every .py and every .ipynb
    for path in tmp_path.glob("0*"):
        text = path.read_text()
        assert "lab-rl" not in text, f"{path.name} still names the old repository"
        assert "github.com/someone/fork" in text
    assert notebook.sync(tmp_path, url="https://github.com/someone/fork") == []  # a second sync changes nothing
    with pytest.raises(ValueError, match="OWNER/NAME"):
        notebook.github_path("https://gitlab.com/someone/fork")


def test_setup_runs_the_builtin_models_on_one_thread_and_the_hub_switch_gives_threads_back(monkeypatch):
    """A tiny model is many times faster on one CPU thread (lab.runner.use_one_thread_for_tiny_models), and a
    notebook loads some models itself: setup() picks one thread unless OMP_NUM_THREADS says otherwise, and
    hub_switch(True) restores the thread count a real model needs."""
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(notebook, "_DEFAULT_THREADS", [])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        notebook.setup()
        assert torch.get_num_threads() == 1
        notebook.hub_switch(False)
        assert torch.get_num_threads() == 1
        notebook.hub_switch(True)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit choice is left alone
        monkeypatch.setattr(notebook, "_DEFAULT_THREADS", [])
        notebook.setup()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        torch.set_printoptions(profile="default")


def _requirements(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line.replace(" ", "") for line in lines if line}


def test_pyproject_declares_the_requirements():
    """pip install of the package (git+URL or the wheel) brings what requirements.txt lists: the dependencies
    plus the app and notebooks extras equal requirements.txt, and the test extra equals requirements-test.txt."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = set(project["dependencies"]) | set(extras["app"]) | set(extras["notebooks"])
    assert declared == _requirements(ROOT / "requirements.txt"), (
        "requirements.txt and pyproject.toml's [project] differ"
    )
    assert set(extras["test"]) == _requirements(ROOT / "requirements-test.txt"), (
        "requirements-test.txt and pyproject.toml's test extra differ"
    )
    assert "torch>=2.4" in project["dependencies"]  # a range, not a CUDA or CPU build
    assert any(r.startswith("jupyterlab") for r in _requirements(ROOT / "requirements.txt"))


def _stderr(nb) -> list[str]:
    return [
        out.text
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stderr"
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, tmp_path, monkeypatch):
    """Execute every cell in a fresh kernel; any cell error fails the test with that cell's traceback. Nothing
    reaches stderr (no "IProgress not found", no library deprecation notices), and every plotly figure carries an
    HTML copy, which is what nbconvert's HTML shows."""
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
    assert _stderr(nb) == [], f"{path.name} wrote to stderr"
    bundles = [out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []) if "data" in out]
    figures = [data for data in bundles if "application/vnd.plotly.v1+json" in data]
    assert figures and all("plotly-graph-div" in data.get("text/html", "") for data in figures)
    # plotly.js itself (about 5 MB) is embedded once per notebook, not once per figure or redraw
    assert sum("window.Plotly = Plotly" in data.get("text/html", "") for data in bundles) == 1
