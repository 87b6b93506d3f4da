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


@pytest.mark.parametrize(("module", "line"), [
    ("core/model.py", "from resolver.cli import main"),  # upward: core importing the CLI
    ("dns/wire.py", "from resolver.log import schema"),  # sideways: one sibling importing another
    ("observe/metrics.py", "from resolver.fence import feeder"),
], ids=["upward", "sibling-dns-log", "sibling-observe-fence"])
def test_a_forbidden_import_is_caught(tmp_path: Path, module: str, line: str) -> None:
    """The contract can fail: a copy of the package with one forbidden import breaks it."""
    exe = shutil.which("lint-imports")
    assert exe is not None
    shutil.copytree(ROOT / "resolver", tmp_path / "resolver", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "resolver" / module
    bad.write_text(bad.read_text() + f"\n{line}  # noqa: E402\n")
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


def _readme_map() -> dict[str, list[str]]:
    """The README's design table: subpackage -> the modules its row names."""
    import re

    text = (ROOT / "README.md").read_text()
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"\| \d \| `resolver/(\w+)/` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = re.findall(r"`(\w+/?)`", m.group(2))
    return rows


def test_readme_map_matches_the_tree() -> None:
    rows = _readme_map()
    packages = sorted(p.parent.name for p in (ROOT / "resolver").glob("*/__init__.py"))
    assert sorted(rows) == packages
    for pkg, named in rows.items():
        base = ROOT / "resolver" / pkg
        for name in named:
            assert (base / f"{name}.py").is_file() or (base / name).is_dir(), f"README names {pkg}/{name}"
        present = {p.stem for p in base.glob("*.py") if p.stem != "__init__"}
        present |= {p.parent.name + "/" for p in base.glob("*/__init__.py")}
        missing = present - {n.rstrip("/") if (base / f"{n.rstrip('/')}.py").is_file() else n for n in named}
        assert not missing, f"README's row for resolver/{pkg}/ does not mention {sorted(missing)}"


def test_no_module_holds_two_ideas() -> None:
    """The project's rule of thumb: a module past ~500 lines holds two ideas; split it."""
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "resolver").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, f"split these along a seam: {long}"
