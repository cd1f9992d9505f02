"""A search's server-sent events: async streams that resume from `Last-Event-ID`, capped per owner.

A stream never holds a thread while it waits: it reads the database briefly in a thread (under
its own limiter, so that streams cannot take the threads other routes need) and sleeps on the
event loop between reads.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from optuna.trial import TrialState

from caviar.db.session import session_scope
from caviar.db.storage import trial_states
from caviar.db.tables import TERMINAL_STATUSES
from caviar.search.runner import SearchTrial
from caviar.service.errors import BadEventId, TooMany
from caviar.service.searches import owned_search, public_trial, search_trials

#: Trial states that end a trial: each finished trial is one `trial` event.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

#: Threads that all event streams of one API process share for their database reads.
POLL_THREADS = 4

#: A comment line is sent after this many seconds without an event, so that proxies keep an
#: idle stream open and a client that has gone away is noticed on any server.
KEEPALIVE_S = 15.0


@dataclass
class _Sent:
    """Trial numbers of one stage already sent: every number below `prefix`, and `extras`."""

    prefix: int = 0
    extras: set[int] = field(default_factory=set)

    def __contains__(self, number: int) -> bool:
        return number < self.prefix or number in self.extras

    def add(self, number: int) -> None:
        if number in self:
            return
        self.extras.add(number)
        while self.prefix in self.extras:
            self.extras.remove(self.prefix)
            self.prefix += 1


@dataclass
class EventCursor:
    """What a client has received of a stream: stages announced, finished trials per stage.

    Every event's id is the cursor after it, e.g. ``2;1:4;2:1+3`` (stages 1 and 2 announced;
    trials 0-3 of stage 1; trials 0 and 3 of stage 2), so that a stream resumed from a
    `Last-Event-ID` sends exactly the events the client lacks, whatever order trials finish in.
    """

    stage: int = 0
    trials: dict[int, _Sent] = field(default_factory=dict)

    def __contains__(self, key: tuple[int, int]) -> bool:
        stage, number = key
        return stage in self.trials and number in self.trials[stage]

    def add(self, stage: int, number: int) -> None:
        self.trials.setdefault(stage, _Sent()).add(number)

    def sent(self) -> int:
        """How many trial events the client has had."""
        return sum(s.prefix + len(s.extras) for s in self.trials.values())

    def encode(self) -> str:
        stages = [
            f"{stage}:{sent.prefix}" + "".join(f"+{n}" for n in sorted(sent.extras))
            for stage, sent in sorted(self.trials.items())
        ]
        return ";".join([str(self.stage), *stages])

    @classmethod
    def decode(cls, text: str) -> EventCursor:
        """The cursor an event id encodes; BadEventId when `text` is not an id of this API."""
        head, *stages = text.split(";")
        cursor = cls(stage=_natural(head))
        for part in stages:
            stage, colon, numbers = part.partition(":")
            if not colon:
                raise BadEventId(f"not an event id: {text!r}")
            prefix, *extras = numbers.split("+")
            sent = cursor.trials.setdefault(_natural(stage), _Sent())
            sent.prefix = max(sent.prefix, _natural(prefix))
            for number in extras:
                sent.add(_natural(number))
        return cursor


def _natural(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise BadEventId(f"not an event-id count: {text!r}")
    return int(text)


class EventStreams:
    """The open event streams of one API process: at most `per_owner` for each owner."""

    def __init__(self, per_owner: int) -> None:
        self.per_owner = per_owner
        self.open: Counter[str] = Counter()
        self.limiter = anyio.CapacityLimiter(POLL_THREADS)

    def acquire(self, owner: str) -> None:
        """Count one more stream of `owner`, or raise TooMany when they have `per_owner` open."""
        if self.open[owner] >= self.per_owner:
            raise TooMany(
                f"{self.open[owner]} event streams are open for this key's owner; the limit is "
                f"{self.per_owner} (close one, or poll GET /v1/searches/{{id}} instead)"
            )
        self.open[owner] += 1

    def release(self, owner: str) -> None:
        self.open[owner] -= 1
        if self.open[owner] <= 0:
            del self.open[owner]

    async def run(self, func, *args: Any) -> Any:
        """`func(*args)` in a thread of the streams' own limiter."""
        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)


async def events(
    streams: EventStreams,
    database_url: str,
    owner: str,
    search_id: str,
    after: EventCursor | None = None,
    poll_s: float = 0.5,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[str]:
    """Server-sent events: `stage` per stage opened, `trial` per finished trial, then `done`.

    `after` (a client's `Last-Event-ID`) skips what the client has had. The database is read
    every `poll_s` seconds; the trials are loaded only when more have finished than were sent.
    A comment line is sent after `keepalive_s` seconds without an event.
    """
    cursor = after or EventCursor()
    quiet_since = time.monotonic()
    while True:
        status, stage, best, trials = await streams.run(
            _poll, database_url, owner, search_id, cursor.sent()
        )
        for number in range(cursor.stage + 1, stage + 1):
            cursor.stage = number
            quiet_since = time.monotonic()
            yield _sse("stage", {"stage": number}, cursor)
        for trial_stage, trial, params in trials:
            if trial.state in FINISHED and (trial_stage, trial.number) not in cursor:
                cursor.add(trial_stage, trial.number)
                data = public_trial(trial_stage, trial, params).model_dump(mode="json")
                quiet_since = time.monotonic()
                yield _sse("trial", data, cursor)
        if status in TERMINAL_STATUSES:
            yield _sse("done", {"status": status, "best": best}, cursor)
            return
        if time.monotonic() - quiet_since >= keepalive_s:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await anyio.sleep(poll_s)


def _poll(
    database_url: str, owner: str, search_id: str, sent: int
) -> tuple[str, int, dict | None, list[SearchTrial]]:
    """Status, stage and best of the search, and its trials if more than `sent` have finished."""
    with session_scope(database_url) as session:
        search = owned_search(session, owner, search_id)
    states = trial_states(database_url, search.studies or [])
    finished = sum(states[state] for state in FINISHED)
    trials = search_trials(database_url, search) if finished > sent else []
    return search.status, search.stage, search.best, trials


def _sse(event: str, data: dict[str, Any], cursor: EventCursor) -> str:
    return f"id: {cursor.encode()}\nevent: {event}\ndata: {json.dumps(data, default=str)}\n\n"
