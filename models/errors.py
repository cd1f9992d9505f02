"""The root of every error Caviar raises on purpose.

Each package's errors derive from `CaviarError` (and from the builtin they refine, e.g.
`ValueError`), so a caller tells Caviar's own refusals from bugs with one `except`, and the API
maps them all to HTTP in one handler (`caviar.service.errors`). It lives here, at the bottom of
the package graph, because every other package imports the engine, never the other way round.
"""

from __future__ import annotations

__all__ = ["CaviarError"]


class CaviarError(Exception):
    """An error Caviar raises on purpose; its message is meant for the user."""
