"""What `make install` leaves: packages that start from bytecode, not from source."""

from __future__ import annotations

import importlib.util
import os

import pytest


@pytest.mark.parametrize("module", ["jax", "flax", "optuna", "sklearn", "sqlalchemy", "fastapi"])
def test_the_installed_packages_were_compiled_to_bytecode(module: str) -> None:
    """Where Python may not write bytecode (PYTHONDONTWRITEBYTECODE), a package installed without
    it is compiled from source by every process that imports it: seconds per `caviar` start."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    cached = importlib.util.cache_from_source(spec.origin)
    assert os.path.exists(cached), f"{module} was installed without bytecode ({cached})"
