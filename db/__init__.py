"""The one SQL database: Caviar's tables, migrations, sessions, API keys, Optuna's storage."""

from caviar.models.namespace import lazy_members

_MEMBERS = {
    "create_key": "keys",
    "upgrade": "migrate",
    "DatabaseError": "session",
    "DatabaseUnavailable": "session",
    "get_engine": "session",
    "session_scope": "session",
    "optuna_storage": "storage",
    "Search": "tables",
    "SearchStatus": "tables",
    "StoredDataset": "tables",
    "StoredModel": "tables",
}
__all__ = sorted(_MEMBERS)
__getattr__ = lazy_members(__name__, _MEMBERS)
