"""Optuna's storage on our database URL: SQLite (one machine) or PostgreSQL (a worker pool)."""

from __future__ import annotations

import functools

import optuna
from sqlalchemy.engine import make_url

DEFAULT_DATABASE_URL = "sqlite:///caviar.db"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs that name no driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def engine_options(url: str) -> dict:
    """Connection options per backend: a busy timeout for SQLite, small checked pools otherwise."""
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 1800}


@functools.lru_cache(maxsize=8)
def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage of `url` (cached per process; creates Optuna's tables if missing)."""
    url = normalise_url(url)
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url))
    if make_url(url).get_backend_name() == "sqlite":
        with storage.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    return storage
