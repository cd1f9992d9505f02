"""Package namespaces whose public names are imported on first use.

Each Caviar package declares its public names in its ``__init__`` (``__all__``) and finds them
through `lazy_members`, so ``from caviar.search import run_search`` works while ``import
caviar.service.cli`` stays fast: no package imports JAX, Optuna or FastAPI until a name that
needs them is used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_members"]


def lazy_members(package: str, **modules: str) -> tuple[Callable[[str], Any], list[str]]:
    """A module ``__getattr__`` for `package` and its ``__all__``: `modules` gives each submodule
    the public names it defines (space-separated), imported when first looked up (then kept)."""
    members = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        if name not in members:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{members[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, sorted(members)
