"""The package's layering (pyproject's import-linter contract) and its size discipline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contract_is_kept() -> None:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' installs import-linter")
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The contract can fail: a copy of the package with core importing the CLI breaks it."""
    exe = shutil.which("lint-imports")
    assert exe is not None
    shutil.copytree(ROOT / "resolver", tmp_path / "resolver", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "resolver" / "core" / "model.py"
    bad.write_text(bad.read_text() + "\nfrom resolver.cli import main  # noqa: E402\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout or "broken" in proc.stdout


def test_subpackages_say_what_they_own() -> None:
    for init in sorted((ROOT / "resolver").glob("*/__init__.py")):
        text = init.read_text()
        assert text.lstrip().startswith('"""'), f"{init} has no docstring"
        assert "import" in text.lower().split('"""')[1], f"{init}'s docstring does not say what it may import"
