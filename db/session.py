"""Engines, sessions and the one error vocabulary of Caviar's database code.

Every unit of work goes through `session_scope`, which commits, rolls back and turns driver errors
into `DatabaseError` (or `ConstraintViolation` for a broken unique or foreign-key constraint):

    with session_scope(url) as session:
        session.add(Search(id=..., owner=..., name=..., spec=...))
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import Engine, Table, create_engine, event, false, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from caviar.db.storage import engine_options, normalise_url
from caviar.db.tables import Search
from caviar.models.errors import CaviarError


class DatabaseError(CaviarError, RuntimeError):
    """The database failed or is unreachable; the message says what (no driver traceback)."""


class ConstraintViolation(DatabaseError):
    """A write broke a constraint: a duplicate (idempotency) key, a missing parent, a bad status."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or used now: connection refused or lost, timed out, locked."""


def get_engine(url: str) -> Engine:
    """The engine of `url`, one per process and normalised URL."""
    return _engine(normalise_url(url))


@functools.lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    engine = create_engine(url, **engine_options(url))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


@functools.lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn SQLAlchemy errors raised inside into `ConstraintViolation`, `DatabaseUnavailable` (the
    connection failed or timed out) or `DatabaseError` (anything else, e.g. a value the column
    cannot hold)."""
    try:
        yield
    except IntegrityError as error:
        raise ConstraintViolation(_describe(error, url)) from error
    except (OperationalError, InterfaceError, PoolTimeout) as error:
        raise DatabaseUnavailable(_describe(error, url)) from error
    except SQLAlchemyError as error:
        raise DatabaseError(_describe(error, url)) from error


def _describe(error: SQLAlchemyError, url: str) -> str:
    cause = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"database {display_url(url)}: {' '.join(lines) or type(cause).__name__}"


def display_url(url: str) -> str:
    """`url` fit to print: its password hidden, in the user part or the query string alike."""
    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        return "URL (not a valid SQLAlchemy URL)"
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "hidden"})
    return parsed.render_as_string(hide_password=True)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session on `url` that commits when the block ends and rolls back if it raises.

    Loaded objects stay usable after the block (no expiry on commit), except deferred columns
    not yet loaded. Raises `ConstraintViolation` or `DatabaseError` for database failures.
    """
    with database_errors(url), _sessionmaker(normalise_url(url))() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def lock_search(session: Session, search_id: str) -> Search | None:
    """Load search `search_id` locked until the session's transaction ends; None if absent.

    PostgreSQL locks the row (`SELECT ... FOR UPDATE`), so workers claim trial slots one at a
    time. SQLite serves one worker process, whose single writer is the lock: there this is a plain
    read, since taking SQLite's database-wide write lock would block the Optuna writes a worker
    makes on its own connection while it holds the search.
    """
    query = select(Search).where(Search.id == search_id).execution_options(populate_existing=True)
    if session.get_bind().dialect.name != "sqlite":
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def lock_owner(session: Session, owner: str) -> None:
    """Serialise, until the session's transaction ends, the writes of `owner` that read first.

    A check then an insert (a per-owner limit, an idempotency key) is only exact when no other
    transaction of the same owner runs between them. PostgreSQL takes a transaction-level
    advisory lock on a hash of the owner. SQLite takes its database-wide write lock now, as
    `BEGIN IMMEDIATE` would, with a write that changes nothing, before anything is read.
    """
    if session.get_bind().dialect.name == "sqlite":
        table = cast(Table, Search.__table__)
        session.execute(update(table).where(false()).values(owner=table.c.owner))
        return
    digest = hashlib.blake2b(f"caviar owner {owner}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


#: Lock files this process holds, by path: each stays open (and locked) until the process ends.
_sole_worker_locks: dict[Path, IO[str]] = {}


def claim_sole_sqlite_worker(url: str) -> None:
    """On a SQLite file, make this process its only worker until it ends; elsewhere, nothing.

    `lock_search` takes no lock on SQLite, so two workers on one file would both fill a stage's
    slots and overrun its budget. An exclusive lock on `<database>.worker-lock` beside the file,
    which the system releases when the process ends however it ends, refuses a second one with
    a `DatabaseError` that says so.
    """
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    import fcntl  # POSIX only, as the worker pool is

    database = Path(parsed.database).resolve()
    path = database.with_name(f"{database.name}.worker-lock")
    if path in _sole_worker_locks:
        return
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DatabaseError(
            f"another worker already works on {database.name}: SQLite takes one worker per "
            "database (use PostgreSQL for a pool)"
        ) from None
    _sole_worker_locks[path] = handle
