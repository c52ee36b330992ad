"""The layer contracts in pyproject.toml hold, and `lint-imports` really fails on an import that breaks one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_contracts_hold() -> None:
    pytest.importorskip("importlinter")
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("quept/kernels/reference.py", "import quept.engine.engine", "quept.kernels is not allowed to import quept.engine"),
    ("quept/model/model.py", "import quept.server.app", "quept.model is not allowed to import quept.server"),
    ("quept/errors.py", "import quept.model.model", "Shared leaves import nothing of quept but the errors"),
])
def test_a_forbidden_import_breaks_the_lint(tmp_path: Path, module: str, line: str, broken: str) -> None:
    pytest.importorskip("importlinter")
    shutil.copytree(ROOT / "quept", tmp_path / "quept", ignore=shutil.ignore_patterns("__pycache__", "*.txt"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0
    assert broken in run.stdout, run.stdout


def test_no_top_level_package_but_quept() -> None:
    """What `pip install` puts into site-packages is the `quept` package only: no `server` or `kernels` beside it."""
    import tomllib
    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"])
    assert "quept" in packages and "quept.server" in packages and "quept.kernels" in packages
    assert {name.split(".")[0] for name in packages} == {"quept"}
