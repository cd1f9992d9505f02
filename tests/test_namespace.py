"""Caviar's packages as a user imports them: `caviar.*`, each with its public names declared."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from caviar.models.namespace import typed_members

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["caviar.models", "caviar.search", "caviar.db", "caviar.service"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_declared_name_imports_from_the_package(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__, f"{package} declares no public names"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == [], f"{package} declares names it does not have"
    assert sorted(module.__all__) == sorted(typed_members(str(module.__file__))), (
        "__all__ and the TYPE_CHECKING imports (what type checkers see) must name the same"
    )
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018


def test_the_command_line_starts_without_jax_optuna_or_fastapi() -> None:
    """`caviar --help` stays instant: the packages import their members on first use."""
    probe = (
        "import sys, caviar.service.cli\n"
        "print(sorted(m for m in ('jax', 'optuna', 'fastapi') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_module_imports_beside_a_users_own_models_db_search_and_service(
    tmp_path: Path,
) -> None:
    """With the repository off the path and a user's modules of the same names in the working
    directory, every Caviar module still imports: none reaches for a top-level `models` etc."""
    for name in ("models", "db", "search", "service"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('the user module was imported')\n")
    probe = (
        "import importlib, pkgutil\n"
        f"for package in {PACKAGES!r}:\n"
        "    path = importlib.import_module(package).__path__\n"
        "    for module in pkgutil.walk_packages(path, package + '.'):\n"
        "        if '.migrations' not in module.name:  # Alembic imports those itself\n"
        "            importlib.import_module(module.name)\n"
        "print('imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_the_wheel_holds_every_package_folder() -> None:
    """pyproject's package list (the wheel, the Docker images) names every folder with an
    __init__.py, so no subpackage is left out of a non-editable install."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {value: key for key, value in setuptools["package-dir"].items()}
    found = {
        ".".join([folders[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for top in folders
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(found)
