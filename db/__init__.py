"""The one SQL database: Caviar's tables, migrations, sessions, API keys, Optuna's storage."""

from caviar.models.namespace import lazy_members

__getattr__, __all__ = lazy_members(
    __name__,
    keys="create_key",
    migrate="upgrade",
    session="DatabaseError DatabaseUnavailable get_engine session_scope",
    storage="optuna_storage",
    tables="Search SearchStatus StoredDataset StoredModel",
)
