"""The REST API (FastAPI), its client and the `caviar` command line."""

from caviar.models.namespace import lazy_members

_MEMBERS = {
    "create_app": "app",
    "ApiError": "client",
    "Client": "client",
    "Settings": "settings",
    "get_settings": "settings",
}
__all__ = sorted(_MEMBERS)
__getattr__ = lazy_members(__name__, _MEMBERS)
