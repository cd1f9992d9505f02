"""The REST API (FastAPI), its client and the `caviar` command line."""

from caviar.models.namespace import lazy_members

__getattr__, __all__ = lazy_members(
    __name__,
    app="create_app",
    client="ApiError Client",
    settings="Settings get_settings",
)
