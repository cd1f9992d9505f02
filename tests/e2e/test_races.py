"""Races as users meet them: concurrent requests to a real API, workers started together."""

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
import pytest

from caviar.db.migrate import upgrade
from caviar.search.spec import parse_spec

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.e2e.test_service import SPEC, caviar, free_port, start, wait_for
else:
    from test_service import SPEC, caviar, free_port, start, wait_for

LIMIT = 4


@pytest.fixture
def api(database_url):
    """A real API on `database_url` (SQLite file or PostgreSQL) and a token of owner alice."""
    port = free_port()
    env = {
        **os.environ,
        "CAVIAR_DATABASE_URL": database_url,
        "CAVIAR_MAX_CONCURRENT_SEARCHES": str(LIMIT),
    }
    caviar("db", "upgrade", env=env)
    token = caviar("keys", "create", "alice", env=env).stdout.strip().split()[-1]
    server = start("serve", "--port", str(port), env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    finally:
        server.terminate()
        server.wait(timeout=20)


def post_at_once(api, count: int, headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """`count` clients, each on its own open connection, POST the same search at the same time."""
    base, auth = api
    spec = parse_spec(SPEC).model_dump(mode="json", exclude_none=True)
    barrier = threading.Barrier(count)

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=base, headers=auth, timeout=60) as client:
            client.get("/healthz")  # connected before the race starts
            barrier.wait()
            return client.post("/v1/searches", json=spec, headers=headers)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(post, range(count)))


def searches_of(api) -> list[dict]:
    base, auth = api
    return httpx.get(f"{base}/v1/searches", headers=auth).json()["items"]


def test_the_open_search_limit_holds_under_concurrent_posts(api):
    responses = post_at_once(api, 16)
    assert Counter(r.status_code for r in responses) == {201: LIMIT, 429: 16 - LIMIT}
    assert len(searches_of(api)) == LIMIT


def test_concurrent_retries_of_one_idempotency_key_get_one_search(api):
    responses = post_at_once(api, 8, headers={"Idempotency-Key": "retry-1"})
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 201, 409}, [(r.status_code, r.text) for r in responses]
    ids = {r.json()["id"] for r in responses if r.status_code in (200, 201)}
    assert len(ids) == 1
    assert [search["id"] for search in searches_of(api)] == list(ids)


def assert_started(workers: list, seconds: float = 180) -> None:
    """Every worker prints its ready line (rather than dying first)."""

    def until_ready(worker) -> str:
        lines = []
        for line in worker.stdout:
            lines.append(line)
            if line.startswith("worker on "):
                break
        return "".join(lines)

    with ThreadPoolExecutor(len(workers)) as pool:
        outputs = list(pool.map(until_ready, workers, timeout=seconds))
    for output in outputs:
        assert output.splitlines()[-1].startswith("worker on "), output


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_workers_started_together_on_a_fresh_upgraded_database_all_start(postgres_url, attempt):
    env = {**os.environ, "CAVIAR_DATABASE_URL": postgres_url}
    upgrade(postgres_url)
    workers = [start("worker", "--idle-sleep", "0.2", env=env) for _ in range(8)]
    try:
        assert_started(workers)
    finally:
        for worker in workers:
            worker.terminate()
            worker.communicate(timeout=30)


@pytest.mark.parametrize("command", [["worker"], ["serve", "--port", "0"]], ids=["worker", "serve"])
def test_a_worker_or_the_api_refuses_a_database_not_upgraded(database_url, command):
    env = {**os.environ, "CAVIAR_DATABASE_URL": database_url}
    done = caviar(*command, env=env, timeout=60, check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and lines[0].endswith("run `caviar db upgrade`"), lines


def test_a_second_worker_on_one_sqlite_file_is_refused_until_the_first_ends(tmp_path):
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    env = {**os.environ, "CAVIAR_DATABASE_URL": url}
    upgrade(url)
    first = start("worker", env=env)
    try:
        assert_started([first])
        second = caviar("worker", env=env, timeout=60, check=False)
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert second.returncode == 2
        assert len(lines) == 1 and "SQLite takes one worker per database" in lines[0], lines
        assert first.poll() is None, "the first worker should keep working"
    finally:
        first.kill()  # however it ends, the database is free again
        first.communicate(timeout=30)
    after = start("worker", env=env)
    try:
        assert_started([after])
    finally:
        after.terminate()
        after.communicate(timeout=30)
