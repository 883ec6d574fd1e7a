"""What the notebooks share: their first cells, readable output, live charts and the hub switch.

Each notebook in ``notebooks/`` is a jupytext pair: ``05_grpo.py`` (py:percent, the source a person edits) and
``05_grpo.ipynb`` (what Jupyter and Colab open), kept equal by ``jupytext --sync``. The few things every
notebook needs live here rather than in copies:

- ``setup()``: quiet library logs, floats printed to four significant digits, plotly figures that also render in
  exported HTML;
- ``LiveChart``: one line chart per metric, redrawn after every step (``LiveFigure`` for any figure);
- ``tqdm``: a progress bar that is a widget where ipywidgets is installed and plain text elsewhere;
- ``hub_switch(use_hub)``: one line saying what the switch selects and whether this runtime can run it.

The install cell must run before ``lab`` can be imported, so it cannot call this module: it is text, rendered by
``install_cell()`` from the repository URL in ``pyproject.toml``'s ``[project.urls]``, as is each notebook's Colab
badge. ``python -m lab.notebook sync`` writes both into every notebook and syncs each pair, so a fork changes the
URL in ``pyproject.toml`` only.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"  # in a clone of the repository
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# ----------------------------------------------------------------------------------------------------------------------
# The repository URL, the Colab badge and the install cell


def repository_url() -> str:
    """``[project.urls] Repository``: from ``pyproject.toml`` in a clone, from the installed metadata otherwise."""
    if PYPROJECT.is_file():
        match = re.search(
            r"^\[project\.urls\][^\[]*?^Repository\s*=\s*\"([^\"]+)\"", PYPROJECT.read_text(), re.M | re.S
        )
        if match:
            return match.group(1)
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        for entry in metadata("lab").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip() == "Repository":
                return url.strip()
    except PackageNotFoundError:
        pass
    raise RuntimeError("no Repository URL: add one to [project.urls] in pyproject.toml")


def github_path(url: str) -> str:
    """``owner/name`` of a GitHub URL: ``https://github.com/lab-rl/lab`` → ``lab-rl/lab``."""
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", url)
    if match is None:
        raise ValueError(f"repository URL {url!r} is not https://github.com/OWNER/NAME (Colab opens GitHub notebooks)")
    return match.group(1)


def colab_badge(stem: str, url: str | None = None) -> str:
    """The markdown badge that opens ``notebooks/{stem}.ipynb`` of the repository in Colab."""
    target = f"https://colab.research.google.com/github/{github_path(url or repository_url())}/blob/main/notebooks/{stem}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({target})"


INSTALL_CELL = """\
# Install. On Colab: the lab from a wheel uploaded to this session's files (lab-*.whl, built by `python -m build`),
# or else from its repository. Anywhere else nothing is installed: in a clone, the package next to this folder.
import glob
import os
import subprocess
import sys

LAB_REPOSITORY = "{url}"  # pyproject.toml's [project.urls]
if "google.colab" in sys.modules:
    wheels = sorted(glob.glob("lab-*.whl"), key=os.path.getmtime)  # the newest upload wins
    source = wheels[-1] if wheels else f"git+{{LAB_REPOSITORY}}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
elif os.path.isdir(os.path.join("..", "lab")):
    sys.path.insert(0, os.path.abspath(".."))"""


def install_cell(url: str | None = None) -> str:
    """The source of every notebook's install cell, for the repository at ``url``."""
    return INSTALL_CELL.format(url=url or repository_url())


def sync(folder: Path = NOTEBOOK_DIR, url: str | None = None) -> list[Path]:
    """Write the badge and the install cell for ``url`` into every ``folder/*.py`` notebook, then sync each pair
    (the ``.ipynb`` takes the ``.py``'s cells and keeps its own outputs). Returns the notebooks it changed."""
    import jupytext

    url = url or repository_url()
    changed = []
    for path in sorted(folder.glob("[0-9]*.py")):
        nb = jupytext.read(path)
        before = [cell.source for cell in nb.cells]
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = re.sub(
                    r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)", colab_badge(path.stem, url), cell.source
                )
            elif cell.cell_type == "code" and cell.source.startswith("# Install."):
                cell.source = install_cell(url)
        if [cell.source for cell in nb.cells] != before:
            jupytext.write(nb, path, fmt="py:percent")
            changed.append(path)
        paired = path.with_suffix(".ipynb")
        if not paired.exists() or path in changed or _differs(path, paired):
            _write_ipynb(path, paired)
            changed.append(paired)
    return changed


def _differs(py: Path, ipynb: Path) -> bool:
    return cells(py) != cells(ipynb)


def cells(path: Path) -> list[tuple[str, str]]:
    """``(cell_type, source)`` of every cell of a notebook, from either side of a pair."""
    import jupytext

    return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]


def _write_ipynb(py: Path, ipynb: Path) -> None:
    """The ``.ipynb`` of a ``.py`` source, keeping the outputs and cell ids it already had (jupytext's --update)."""
    import jupytext

    nb = jupytext.read(py)
    if ipynb.exists():
        old = jupytext.read(ipynb)
        from jupytext.combine import combine_inputs_with_outputs

        nb = combine_inputs_with_outputs(nb, old, fmt="py:percent")
    jupytext.write(nb, ipynb)


# ----------------------------------------------------------------------------------------------------------------------
# Readable, quiet output


_DEFAULT_THREADS: list[int] = []  # torch's thread count before setup() chose one thread


def setup() -> None:
    """Call once at the top of a notebook: quiet library logs (weight-loading bars, bitsandbytes' note about an
    optional CPU kernel, deprecation notices), floats printed to four significant digits (pandas, torch and every
    displayed value), plotly figures that render in Jupyter, in Colab and in exported HTML, offline, and one CPU
    thread for the tiny built-in models."""
    import logging
    import os
    import warnings

    import pandas as pd
    import plotly.io as pio
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    pd.set_option("display.precision", 4)
    pd.set_option("display.max_colwidth", 80)
    torch.set_printoptions(precision=4, sci_mode=False)
    # The built-in models have a few million parameters: on the CPU one thread runs them many times faster than
    # several, which spend their time synchronising (a PPO step on bandit: 0.24 s on one thread, 5 s on two; see
    # lab.runner.use_one_thread_for_tiny_models). An explicit OMP_NUM_THREADS is respected, and
    # hub_switch(True) gives a real model its threads back.
    if "OMP_NUM_THREADS" not in os.environ and not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(torch.get_num_threads())
        torch.set_num_threads(1)
    shell = _ipython()
    if shell is not None:
        shell.run_line_magic("precision", "%.4g")  # -0.05000000074505806 displays as -0.05
        # Colab picks its own renderer. Elsewhere each figure carries plotly's JSON (Jupyter draws it) and an HTML
        # copy, with plotly.js embedded once per notebook, so nbconvert's HTML shows the figures without a network.
        if "google.colab" not in sys.modules:
            pio.renderers.default = "plotly_mimetype+notebook"


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _progress_bar():
    """tqdm.auto picks the widget bar inside Jupyter, which needs ipywidgets ("IProgress not found" without it);
    without ipywidgets, the text bar."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


tqdm = _progress_bar()


# ----------------------------------------------------------------------------------------------------------------------
# Live charts


def figure_bundle(fig) -> dict:
    """The mime bundle of a plotly figure for the default renderers, as ``fig.show()`` builds it.

    ``fig._repr_mimebundle_()`` names the default renderers explicitly, and plotly then activates them again on
    every call: with the offline HTML renderer that is a copy of plotly.js (about 5 MB) per redraw.
    """
    import plotly.io as pio

    return pio.renderers._build_mime_bundle(fig.to_dict())


class LiveFigure:
    """A plotly figure shown once and redrawn in place through a display handle: change its traces, then call
    ``refresh()``. No widgets needed, and the last drawing stays in the saved notebook."""

    def __init__(self, fig):
        from IPython.display import display

        self.fig = fig
        # A Figure's own display hook ignores display_id, so the figure goes out as a mime bundle.
        self.handle = display(figure_bundle(fig), raw=True, display_id=True)

    def refresh(self) -> None:
        self.handle.update(figure_bundle(self.fig), raw=True)


class LiveChart(LiveFigure):
    """One line chart per metric name; ``update(metrics)`` appends a step and redraws."""

    def __init__(self, keys, title: str = "", per_row: int = 3):
        from plotly.subplots import make_subplots

        self.keys = list(keys)
        rows = -(-len(self.keys) // per_row)
        fig = make_subplots(rows=rows, cols=min(per_row, len(self.keys)), subplot_titles=self.keys)
        for i, key in enumerate(self.keys):
            fig.add_scatter(x=[], y=[], mode="lines+markers", name=key, row=i // per_row + 1, col=i % per_row + 1)
        fig.update_layout(height=260 * rows + 60, showlegend=False, title=title, margin=dict(t=80, b=40))
        super().__init__(fig)

    def update(self, metrics: dict) -> None:
        for trace, key in zip(self.fig.data, self.keys):
            if metrics.get(key) is not None:
                trace.x = (*trace.x, metrics["step"])
                trace.y = (*trace.y, metrics[key])
        self.refresh()


# ----------------------------------------------------------------------------------------------------------------------
# The hub switch


def hub_switch(use_hub: bool) -> None:
    """One line about the switch: what it selects and the device it will run on.

    The built-in path runs on any CPU. The hub path downloads a real model and data set; its 4-bit (qlora) loading
    needs a CUDA GPU, so without one it says so here instead of failing later inside bitsandbytes.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if use_hub and _DEFAULT_THREADS:
        torch.set_num_threads(_DEFAULT_THREADS[0])  # a real model uses every core
    if not use_hub:
        print(f"USE_HUB = False: the built-in task and tiny model, on {device}")
    elif device == "cuda":
        print(f"USE_HUB = True: a hub model and data set, on {torch.cuda.get_device_name(0)}")
    else:
        print(
            "USE_HUB = True without a CUDA GPU: 4-bit loading (mode='qlora') needs one "
            "(Colab: Runtime → Change runtime type → GPU); mode='lora' runs on the CPU, slowly"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.notebook",
        description="sync: write the Colab badge and the install cell (repository URL from pyproject.toml) into "
        "every notebooks/*.py, then make each .ipynb match its .py",
    )
    parser.add_argument("command", choices=["sync"])
    parser.add_argument("--folder", type=Path, default=NOTEBOOK_DIR, help="the notebooks folder")
    args = parser.parse_args(argv)
    for path in sync(args.folder):
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
