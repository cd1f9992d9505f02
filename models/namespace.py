"""Package namespaces whose public names are imported on first use.

Each Caviar package's ``__init__`` imports its public names under ``if TYPE_CHECKING:`` (so type
checkers and editors know them), lists them in ``__all__``, and finds them at run time through
`lazy_members`, which reads that import block. So ``from caviar.search import run_search``
works while ``import caviar.service.cli`` stays fast: no package imports JAX, Optuna or FastAPI
until a name that needs them is used.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["lazy_members", "typed_members"]


def typed_members(init_file: str) -> dict[str, str]:
    """Name → module of every name imported under ``if TYPE_CHECKING:`` in `init_file`."""
    members: dict[str, str] = {}
    for node in ast.parse(Path(init_file).read_text()).body:
        if not (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"):
            continue
        for statement in node.body:
            if isinstance(statement, ast.ImportFrom) and statement.module:
                for alias in statement.names:
                    members[alias.asname or alias.name] = statement.module
    return members


def lazy_members(package: str, init_file: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for `package` that imports each name of its ``__init__``'s
    ``TYPE_CHECKING`` block from its module when first looked up (and then keeps it)."""
    members = typed_members(init_file)

    def __getattr__(name: str) -> Any:
        if name not in members:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(members[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
