"""What the suite needs from outside Python, found or set up by the suite itself.

- PostgreSQL: `ensure_postgres(url)` creates the test database when the server at `url` is up but
  the database is missing, and starts a throw-away server from the installed PostgreSQL binaries
  (`initdb`, `pg_ctl`, in a temporary directory, on a free port) when nothing answers there.
- Chromium: `find_chromium()` finds Debian's `chromium` (or `chromium-browser`).

When one of them cannot be had, `missing(reason)` decides: under `CI=true` the tests that need it
fail with the reason; elsewhere they are skipped with it, and the run's header says so once.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

CHROMIUM_HINT = "install Debian's chromium package: `make system-deps` (apt-get install chromium)"
POSTGRES_HINT = "install PostgreSQL: `make system-deps` (apt-get install postgresql)"


class Unavailable(RuntimeError):
    """A service or program the tests need cannot be found or started; says what to do."""


def in_ci() -> bool:
    """Whether this run is CI's (`CI` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def missing(reason: str) -> NoReturn:
    """Fail (under CI) or skip the calling test because of `reason`."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# --- PostgreSQL -------------------------------------------------------------------------------

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/caviar_test"
_postgres: dict[str, str] = {}


def configure_postgres() -> None:
    """Resolve the run's PostgreSQL test database once (`CAVIAR_TEST_POSTGRES_URL` or the default);
    the URL found is put back in that variable for subprocesses."""
    url = per_worker(os.environ.get("CAVIAR_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    try:
        url, _ = ensure_postgres(url)
    except Unavailable as error:
        _postgres["unavailable"] = str(error)
        return
    _postgres["url"] = os.environ["CAVIAR_TEST_POSTGRES_URL"] = url


def per_worker(url: str) -> str:
    """`url` with a database of this pytest-xdist worker's own (`caviar_test_gw1`), so that the
    suite's processes never wipe each other's tables; `url` itself outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return url
    target = make_url(url)
    return target.set(database=f"{target.database}_{worker}").render_as_string(hide_password=False)


def postgres_test_url() -> str:
    """The PostgreSQL test database's URL; fails or skips the calling test where there is none."""
    if "url" not in _postgres:
        missing(f"PostgreSQL: {_postgres.get('unavailable', 'not configured')}")
    return _postgres["url"]


def report() -> list[str]:
    """The run header's lines: what the suite uses from outside Python, and what it lacks."""
    postgres = _postgres.get("url") or "UNAVAILABLE: " + _postgres.get("unavailable", "?")
    chromium = find_chromium() or "UNAVAILABLE: " + CHROMIUM_HINT
    return [f"postgresql: {postgres}", f"chromium: {chromium}"]


@dataclass
class TemporaryServer:
    """A PostgreSQL server started for this run in a temporary directory; `stop()` removes it."""

    data_dir: Path
    port: int
    pg_ctl: str
    user: str | None

    def stop(self) -> None:
        """Stop the server and delete its files (safe to call twice)."""
        if self.data_dir.exists():
            _run_as(self.user, [self.pg_ctl, "stop", "-D", str(self.data_dir), "-m", "immediate"])
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def ensure_postgres(url: str) -> tuple[str, TemporaryServer | None]:
    """A URL whose database exists and answers, and the server started for it (None if it ran).

    Raises `Unavailable` when no server answers at `url` and none can be started here.
    """
    target = make_url(url)
    server = None
    if not _answers(target):
        server = start_temporary_server()
        target = target.set(host="127.0.0.1", port=server.port, username="postgres", password=None)
    create_database(target)
    return target.render_as_string(hide_password=False), server


def create_database(url: URL) -> bool:
    """Create `url`'s database on its server if it is missing; whether it was created."""
    admin = create_engine(url.set(database="postgres"), poolclass=NullPool)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            exists = connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
            )
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{url.database}"'))
    finally:
        admin.dispose()
    return not exists


def start_temporary_server() -> TemporaryServer:
    """Start a trust-auth PostgreSQL server on a free port of 127.0.0.1, stopped at exit."""
    bindir = _postgres_bindir()
    if bindir is None:
        raise Unavailable(
            f"no PostgreSQL server answers and no initdb/pg_ctl is installed; {POSTGRES_HINT}"
        )
    # PostgreSQL refuses to run as root: run it as the `postgres` user the package creates.
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="caviar-test-pg-"))
    data_dir = root / "data"
    if user is not None:
        shutil.chown(root, user)
    port = _free_port()
    pg_ctl = str(bindir / "pg_ctl")
    init = [str(bindir / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust"]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [pg_ctl, "start", "-D", str(data_dir), "-w", "-t", "60", "-l", str(root / "log")]
    for command in (init, [*start, "-o", options]):
        done = _run_as(user, command)
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            detail = " ".join((done.stdout + done.stderr).split())[-300:]
            raise Unavailable(f"could not start a temporary PostgreSQL server: {detail}")
    server = TemporaryServer(data_dir, port, pg_ctl, user)
    atexit.register(server.stop)
    return server


def _answers(url: URL) -> bool:
    engine = create_engine(url.set(database="postgres"), poolclass=NullPool)
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


def _postgres_bindir() -> Path | None:
    """The directory holding `initdb` and `pg_ctl`: on PATH, or Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(versions[-1]).parent if versions else None


def _run_as(user: str | None, command: list[str]) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Chromium ---------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """The path of a Chromium binary, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")
