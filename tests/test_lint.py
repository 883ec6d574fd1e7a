"""ruff lints and formats the whole repository (its configuration is in pyproject.toml); CI fails on either."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: pip install -r requirements-test.txt")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_check_passes():
    result = _ruff("check", ".", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_unchanged():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_lint_error_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")  # F401: unused import
    result = _ruff("check", str(bad), "--config", str(ROOT / "pyproject.toml"))
    assert result.returncode != 0 and "F401" in result.stdout, result.stdout
