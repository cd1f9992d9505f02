"""Caviar's packages as a user imports them: `caviar.*`, each with its public names declared."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["caviar.models", "caviar.search", "caviar.db", "caviar.service"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_declared_name_imports_from_the_package(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__, f"{package} declares no public names"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == [], f"{package} declares names it does not have"
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
