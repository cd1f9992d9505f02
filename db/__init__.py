"""The one SQL database: Caviar's tables, migrations, sessions, API keys, Optuna's storage."""

from typing import TYPE_CHECKING

from caviar.models.namespace import lazy_members

if TYPE_CHECKING:  # what each name is, for type checkers; imported on first use otherwise
    from caviar.db.keys import create_key
    from caviar.db.migrate import upgrade
    from caviar.db.session import DatabaseError, DatabaseUnavailable, get_engine, session_scope
    from caviar.db.storage import optuna_storage
    from caviar.db.tables import Search, SearchStatus, StoredDataset, StoredModel

__all__ = [
    "DatabaseError",
    "DatabaseUnavailable",
    "Search",
    "SearchStatus",
    "StoredDataset",
    "StoredModel",
    "create_key",
    "get_engine",
    "optuna_storage",
    "session_scope",
    "upgrade",
]
__getattr__ = lazy_members(__name__, __file__)
