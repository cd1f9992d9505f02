"""The REST API (FastAPI), its client and the `caviar` command line."""

from typing import TYPE_CHECKING

from caviar.models.namespace import lazy_members

if TYPE_CHECKING:  # what each name is, for type checkers; imported on first use otherwise
    from caviar.service.app import create_app
    from caviar.service.client import ApiError, Client
    from caviar.service.settings import Settings, get_settings

__all__ = [
    "ApiError",
    "Client",
    "Settings",
    "create_app",
    "get_settings",
]
__getattr__ = lazy_members(__name__, __file__)
