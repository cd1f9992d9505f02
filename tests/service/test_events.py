"""A search's event stream: every event has an id, and `Last-Event-ID` resumes exactly after it."""

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import pytest

from caviar.search.worker import Worker
from caviar.service.client import _server_sent_events
from caviar.service.events import EventCursor, EventStreams, events

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.service.support import SPEC, auth
else:
    from support import SPEC, auth

#: Two stages, so that the stream holds `stage` events between its trials.
STAGED = {**SPEC, "stages": [{"trials": 2}, {"trials": 2}]}


def read_events(client, token, search_id, last_event_id=None):
    headers = {**auth(token), **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    response = client.get(f"/v1/searches/{search_id}/events", headers=headers)
    assert response.status_code == 200, response.text
    return list(_server_sent_events(iter(response.text.splitlines())))


def test_every_event_has_an_id_and_a_resumed_stream_sends_exactly_the_rest(
    client, tokens, settings
):
    token = tokens["alice"]
    search_id = client.post("/v1/searches", json=STAGED, headers=auth(token)).json()["id"]
    Worker(settings.database_url, batch=2).run(until_idle=True)

    events = read_events(client, token, search_id)
    kinds = [kind for _, kind, _ in events]
    assert kinds.count("stage") == 2 and kinds.count("trial") == 4 and kinds[-1] == "done"
    ids = [event_id for event_id, _, _ in events]
    assert all(ids) and len(set(ids[:-1])) == len(ids) - 1
    for k, (event_id, _, _) in enumerate(events[:-1]):
        assert read_events(client, token, search_id, event_id) == events[k + 1 :], k
    assert read_events(client, token, search_id, ids[-1]) == events[-1:]


def test_a_malformed_last_event_id_is_a_422(client, tokens):
    token = tokens["alice"]
    search_id = client.post("/v1/searches", json=SPEC, headers=auth(token)).json()["id"]
    for bad in ("x", "1;2", "1;2:3+y", "-1", "1" * 40):
        response = client.get(
            f"/v1/searches/{search_id}/events", headers={**auth(token), "Last-Event-ID": bad}
        )
        assert response.status_code == 422, bad
        assert "Last-Event-ID" in response.json()["detail"]


def test_an_event_cursor_holds_trials_that_finish_out_of_order():
    cursor = EventCursor(stage=2)
    for stage, number in [(1, 0), (1, 2), (1, 1), (2, 5), (2, 0), (2, 3)]:
        cursor.add(stage, number)
    assert cursor.encode() == "2;1:3;2:1+3+5"
    again = EventCursor.decode(cursor.encode())
    assert again.encode() == cursor.encode() and again.sent() == 6
    assert (2, 3) in again and (2, 4) not in again and (1, 2) in again


def test_a_huge_count_in_an_event_id_costs_nothing():
    started = time.perf_counter()
    cursor = EventCursor.decode("0;1:999999999999")
    assert (1, 10**11) in cursor and (1, 10**12) not in cursor
    assert time.perf_counter() - started < 0.1
    with pytest.raises(ValueError):
        EventCursor.decode("0;1:9999999999999")


def test_a_quiet_stream_sends_keep_alive_comments_that_clients_skip(client, tokens, settings):
    search_id = client.post("/v1/searches", json=SPEC, headers=auth(tokens["alice"])).json()["id"]

    async def first_chunk() -> str:
        stream = events(
            EventStreams(1), settings.database_url, "alice", search_id, poll_s=0.05, keepalive_s=0.2
        )
        assert isinstance(stream, AsyncGenerator)  # declared an AsyncIterator; closed below
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    comment = asyncio.run(first_chunk())
    assert comment == ": keep-alive\n\n"
    stage = ["id: 1", "event: stage", 'data: {"stage": 1}', ""]
    lines = [*comment.splitlines(), "", *stage]
    assert list(_server_sent_events(iter(lines))) == [("1", "stage", {"stage": 1})]
