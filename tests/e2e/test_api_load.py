"""The API stays up under streams and uploads, and its clients survive a restart: real processes."""

import asyncio
import contextlib
import io
import os
import signal
import statistics
import threading
import time
from typing import TYPE_CHECKING

import httpx
import numpy as np
import psutil
import pytest

from caviar.db.keys import create_key
from caviar.db.session import session_scope
from caviar.db.tables import Search

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.e2e.test_service import SPEC, caviar, free_port, start, wait_for
else:
    from test_service import SPEC, caviar, free_port, start, wait_for

OWNERS = 8
STREAMS_PER_OWNER = 8  # the default CAVIAR_MAX_EVENT_STREAMS

#: Long enough (tens of seconds, trials finishing two at a time) to restart the API meanwhile.
LONGER = (
    SPEC.replace("samples: 400", "samples: 2000")
    .replace("trials: 6, epochs: 3", "trials: 8, epochs: 150")
    .replace("stages: [{trials: 4}, {trials: 2}]", "stages: [{trials: 4}, {trials: 4}]")
)


class Api:
    """A real `caviar serve` on a SQLite file, which a test may restart on the same port."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env, self.port, self.url = env, port, f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.process = start("serve", "--port", str(self.port), env=self.env)
        wait_for(f"{self.url}/healthz")

    def stop(self) -> float:
        """SIGTERM; the seconds it took the API to exit."""
        started = time.monotonic()
        self.process.terminate()
        self.process.wait(timeout=30)
        return time.monotonic() - started


@pytest.fixture
def api(tmp_path):
    """The API, and the tokens of OWNERS owners, each with one queued search to stream."""
    database_url = f"sqlite:///{tmp_path / 'caviar.db'}"
    port = free_port()
    env = {
        **os.environ,
        "CAVIAR_DATABASE_URL": database_url,
        "CAVIAR_API_URL": f"http://127.0.0.1:{port}",
    }
    caviar("db", "upgrade", env=env)
    with session_scope(database_url) as session:
        tokens = {f"owner{i}": create_key(session, f"owner{i}", "test")[1] for i in range(OWNERS)}
    server = Api(env, port)
    server.start()
    try:
        yield server, tokens
    finally:
        server.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(server: Api, token: str, spec: str = SPEC) -> str:
    from caviar.search.spec import parse_spec

    body = parse_spec(spec).model_dump(mode="json", exclude_none=True)
    response = httpx.post(f"{server.url}/v1/searches", json=body, headers=auth(token), timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def big_csv(size: int) -> bytes:
    """A valid classification CSV of about `size` bytes."""
    rows = size // 88
    rng = np.random.default_rng(0)
    table = np.column_stack([rng.random((rows, 10)), rng.integers(0, 2, rows)])
    buffer = io.StringIO()
    buffer.write(",".join(f"f{j}" for j in range(10)) + ",label\n")
    np.savetxt(buffer, table, fmt="%.5f", delimiter=",")
    return buffer.getvalue().encode()


async def post_csv(http: httpx.AsyncClient, token: str, content: bytes) -> httpx.Response:
    files = {"file": ("data.csv", content)}
    return await http.post(
        "/v1/datasets", files=files, data={"target": "label"}, headers=auth(token), timeout=600
    )


async def healthz_seconds(http: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    response = await http.get("/healthz", timeout=10)
    assert response.status_code == 200
    return time.perf_counter() - started


def test_healthz_answers_within_100_ms_while_64_streams_and_a_60_mb_upload_are_open(api):
    """...and the uploading owner cannot queue a second upload meanwhile; others can upload."""
    server, tokens = api
    searches = {owner: submit(server, token) for owner, token in tokens.items()}
    content = big_csv(60 * 10**6)

    async def measure() -> list[float]:
        limits = httpx.Limits(max_connections=OWNERS * STREAMS_PER_OWNER + 8)
        async with (
            httpx.AsyncClient(base_url=server.url, limits=limits, timeout=10) as http,
            contextlib.AsyncExitStack() as streams,
        ):
            for owner, token in tokens.items():
                path = f"/v1/searches/{searches[owner]}/events"
                for _ in range(STREAMS_PER_OWNER):
                    opened = http.stream("GET", path, headers=auth(token))
                    assert (await streams.enter_async_context(opened)).status_code == 200
            upload = asyncio.create_task(
                http.post(
                    "/v1/datasets",
                    files={"file": ("big.csv", content)},
                    data={"target": "label"},
                    headers=auth(tokens["owner0"]),
                    timeout=600,
                )
            )
            seconds: list[float] = []
            again: list[httpx.Response] = []
            small, began = big_csv(10_000), time.monotonic()
            while not upload.done():
                seconds.append(await healthz_seconds(http))
                # Once the big file has arrived (parsing it takes far longer), owner0 may not
                # queue a second upload behind it.
                if not again and time.monotonic() - began > 3:
                    again.append(await post_csv(http, tokens["owner0"], small))
                await asyncio.sleep(0.05)
            assert (await upload).status_code == 201, (await upload).text
            assert again and again[0].status_code == 429, again[0].text
            assert "still being parsed" in again[0].json()["detail"]
            assert (await post_csv(http, tokens["owner1"], small)).status_code == 201
            return seconds

    seconds = asyncio.run(measure())
    print(
        f"/healthz during the upload: median {statistics.median(seconds) * 1000:.1f} ms, "
        f"max {max(seconds) * 1000:.1f} ms over {len(seconds)} calls"
    )
    assert len(seconds) >= 5, "the upload ended before /healthz could be measured"
    assert statistics.median(seconds) < 0.1, seconds
    deadline = time.monotonic() + 30
    while descendants_rss(server.process.pid) > 500 * 2**20:
        assert time.monotonic() < deadline, "the upload's parser kept its memory"
        time.sleep(0.5)
    parsers = psutil.Process(server.process.pid).children(recursive=True)
    server.stop()
    assert not psutil.wait_procs(parsers, timeout=10)[1], "the API left processes behind"


def descendants_rss(pid: int) -> int:
    """Resident memory of every process under `pid` (the API's upload parsers)."""
    total = 0
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


def test_streams_over_an_owners_cap_get_429_and_closed_streams_free_everything(api):
    server, tokens = api
    searches = {owner: submit(server, token) for owner, token in tokens.items()}
    http = httpx.Client(base_url=server.url, timeout=10)

    def open_streams(owner: str, count: int) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for _ in range(count):
            response = stack.enter_context(
                http.stream(
                    "GET", f"/v1/searches/{searches[owner]}/events", headers=auth(tokens[owner])
                )
            )
            assert response.status_code == 200, response.read()
        return stack

    with contextlib.ExitStack() as everything:
        for owner in tokens:
            everything.enter_context(open_streams(owner, STREAMS_PER_OWNER))
        over = http.get(f"/v1/searches/{searches['owner0']}/events", headers=auth(tokens["owner0"]))
        assert over.status_code == 429
        assert f"the limit is {STREAMS_PER_OWNER}" in over.json()["detail"]
        assert http.get("/healthz", timeout=1).status_code == 200
    # Every client went away: the API serves everyone at once, and the slots are free again.
    assert http.get("/healthz", timeout=1).status_code == 200
    listed = http.get("/v1/searches", headers=auth(tokens["owner1"]), timeout=1)
    assert listed.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        try:
            with open_streams("owner0", STREAMS_PER_OWNER):
                break
        except AssertionError:
            assert time.monotonic() < deadline, "closed streams kept their slots"
            time.sleep(0.2)


def test_watch_carries_on_when_the_api_restarts(api, tmp_path):
    server, tokens = api
    env = {**server.env, "CAVIAR_TOKEN": tokens["owner0"]}
    search_id = submit(server, tokens["owner0"], LONGER)
    watch = start("watch", search_id, env=env)
    worker = start("worker", "--batch", "2", "--idle-sleep", "0.2", env=env)
    http = httpx.Client(base_url=server.url, headers=auth(tokens["owner0"]), timeout=10)
    try:
        deadline = time.monotonic() + 300
        while http.get(f"/v1/searches/{search_id}").json()["progress"]["complete"] < 2:
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.3)
        # Freeze the worker while the API is down, so that however fast this machine trains,
        # the search is still running when the watch loses its stream.
        worker.send_signal(signal.SIGSTOP)
        assert server.stop() < 15, "the API took too long to stop with a stream open"
        with session_scope(server.env["CAVIAR_DATABASE_URL"]) as session:
            status = session.get_one(Search, search_id).status
        assert status == "running", "the search ended before the API went down"
        time.sleep(2)  # the API is down for a while
        server.start()
        worker.send_signal(signal.SIGCONT)
        output, _ = watch.communicate(timeout=300)
    finally:
        worker.send_signal(signal.SIGCONT)  # a stopped process takes no SIGTERM
        worker.terminate()
        worker.wait(timeout=30)
        if watch.poll() is None:
            watch.kill()
    trials = http.get(f"/v1/searches/{search_id}/trials").json()["items"]
    assert watch.returncode == 0, output
    assert f"search {search_id}: completed ({len(trials)} trials finished)" in output, output


def test_a_small_npz_that_expands_to_480_mb_leaves_the_api_small(api):
    server, tokens = api
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((3_000_000, 20)), y=np.zeros(3_000_000, dtype=np.int8))
    assert len(buffer.getvalue()) < 3 * 10**6
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak.append(process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = httpx.post(
            f"{server.url}/v1/datasets",
            files={"file": ("bomb.npz", buffer.getvalue())},
            headers=auth(tokens["owner0"]),
            timeout=120,
        )
    finally:
        stop.set()
        sampler.join()
    print(f"API RSS {before / 2**20:.0f} MiB before, {max(peak) / 2**20:.0f} MiB at most")
    assert response.status_code == 413, response.text
    assert max(peak) - before < 200 * 2**20
