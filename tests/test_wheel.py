"""The Colab path without a repository: build the wheel, install it the way the notebooks' install cell does, in a
fresh virtual environment, and run a notebook against it.

The venv sees the system's site-packages (torch, transformers … are not downloaded again) and pip runs with
PIP_NO_INDEX=1, so the test also proves that the wheel's declared dependencies are all satisfied without a network.
The kernel runs the venv's Python with the repository off its path, so `import lab` can only find the wheel's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import nbformat
import pytest

from lab import notebook

ROOT = Path(__file__).resolve().parent.parent
CELL_TIMEOUT_S = 300


def build_wheel(out: Path) -> Path:
    """`python -m build --wheel` on a copy of the package (the build leaves build/ and *.egg-info behind, which
    must not land in the working tree); no isolation, so setuptools comes from this environment, offline."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lab", src / "lab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (out / "dist").glob("lab-*.whl")
    return wheel


def _kernel_manager(venv_python: Path, kernels: Path):
    """A kernel manager that starts ipykernel with the venv's interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = kernels / "lab-wheel"
    spec.mkdir(parents=True)
    argv = [str(venv_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "lab wheel", "language": "python"}))
    return KernelManager(kernel_name="lab-wheel", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


@pytest.mark.slow  # about a minute: the build, pip's dependency check and a kernel; CI runs it
def test_install_cell_installs_the_wheel_and_a_notebook_runs(tmp_path):
    from nbclient import NotebookClient

    wheel = build_wheel(tmp_path / "build")
    venv = tmp_path / "venv"
    # --without-pip: the system's pip (visible through --system-site-packages) installs into the venv
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    python = venv / "bin" / "python"
    work = tmp_path / "content"  # Colab's working folder, where an uploaded file lands
    work.mkdir()
    shutil.copy(wheel, work / wheel.name)

    tour = nbformat.read(ROOT / "notebooks" / "01_tour.ipynb", as_version=4)
    install = tour.cells[1]
    assert install.source == notebook.install_cell()
    # Colab is recognized by its module; the stub stays only for the install cell, since libraries that find
    # google.colab imported take code paths that need the real one.
    colab = nbformat.v4.new_code_cell(
        'import sys, types\nsys.modules["google.colab"] = types.ModuleType("google.colab")'
    )
    where = nbformat.v4.new_code_cell(
        'del sys.modules["google.colab"]\nimport lab\nfrom lab.notebook import repository_url\n'
        "print(lab.__file__)\nprint(repository_url())"
    )
    tour.cells = [tour.cells[0], colab, install, where, *tour.cells[2:]]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        LAB_FAST="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1"
    )
    client = NotebookClient(
        tour,
        timeout=CELL_TIMEOUT_S,
        km=_kernel_manager(python, tmp_path / "kernels"),
        resources={"metadata": {"path": str(work)}},
    )
    started = time.time()
    client.execute(env=env)
    print(f"01_tour against the wheel: {time.time() - started:.1f} s")

    printed = "".join(out.get("text", "") for out in tour.cells[3].outputs).split()
    installed = Path(printed[0]).parent
    assert printed[1] == notebook.repository_url()  # read from the wheel's metadata, no pyproject.toml there
    assert installed.is_relative_to(venv), f"lab was imported from {installed}, not from the venv"
    assert installed.parent.name == "site-packages"
    # the package data: every built-in model with its weights and tokenizer, and the tasks' data files
    for model in ("arith", "reviews", "bandit"):
        assert (installed / "models" / model / "config.json").is_file()
        assert (installed / "models" / model / "tokenizer.json").is_file()
        assert any((installed / "models" / model).glob("*.safetensors"))
    shipped = {p.name for p in (ROOT / "lab" / "tasks" / "data").iterdir() if p.is_file()}
    assert shipped and shipped <= {p.name for p in (installed / "tasks" / "data").iterdir()}


def test_install_cell_without_colab_only_puts_a_clone_on_the_path(tmp_path, monkeypatch):
    """Outside Colab nothing is installed: in notebooks/ of a clone the package next to it becomes importable,
    anywhere else the cell does nothing at all."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    (tmp_path / "lab").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    path = list(sys.path)
    monkeypatch.setattr(sys, "path", path)
    exec(notebook.install_cell(), {})
    assert calls == [] and path[0] == str(tmp_path)
    monkeypatch.chdir(tmp_path)  # no ../lab here
    monkeypatch.setattr(sys, "path", list(path))
    exec(notebook.install_cell(), {})
    assert calls == [] and sys.path == path


def test_install_cell_on_colab_prefers_the_newest_uploaded_wheel(tmp_path, monkeypatch):
    """On Colab: pip installs the newest lab-*.whl in the working folder, or the repository without one."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(tmp_path)
    exec(notebook.install_cell("https://github.com/someone/fork"), {})
    assert calls[-1][-1] == "git+https://github.com/someone/fork"
    for age, name in ((100, "lab-0.1.0-py3-none-any.whl"), (0, "lab-0.2.0-py3-none-any.whl")):
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
    exec(notebook.install_cell(), {})
    assert calls[-1][1:] == ["-m", "pip", "install", "-q", "lab-0.2.0-py3-none-any.whl"]
