"""The worker process: find searches with work left, claim trial slots under a lock, train them.

Any number of workers may share a PostgreSQL database (on SQLite, one). A worker claims up to K
trials of a search's current stage while holding that search's row lock, so together the workers
never ask for more trials than a stage's budget. The same lock serialises the stage changes
(creating the next, narrowed stage study) and the end of the search (refit, test, store the
model), so each happens exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC

import optuna
from optuna.trial import Trial, TrialState
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from db.models import Dataset as DatasetRow
from db.models import Search, TrainedModel, utcnow
from db.session import DatabaseError, lock_search, session_scope
from db.storage import (
    GRACE_PERIOD_S,
    HEARTBEAT_INTERVAL_S,
    fail_orphaned_trials,
    optuna_storage,
)
from models.data import DatasetError, from_arrays, read_csv, read_npz
from models.train import DEFAULT_GROUP_SIZE
from search.heartbeat import Heartbeat
from search.runner import finish_search, load_search_dataset, open_stage, used_slots
from search.spec import Objective, Param, SearchSpec, SpecError
from search.studies import ask, study_name
from search.worker import DEFAULT_BATCH, SearchContext, TrialOutcome, train_trials

log = logging.getLogger("caviar.worker")

#: Statuses a worker looks for work in.
OPEN_STATUSES = ("queued", "running")


@dataclass
class Claim:
    """Trials a worker asked for under the search's lock and now trains."""

    search_id: str
    stage: int
    study: optuna.Study
    space: dict[str, Param]
    trials: list[Trial]


class Worker:
    """One worker process's loop over the database's open searches."""

    def __init__(
        self,
        database_url: str,
        *,
        batch: int = DEFAULT_BATCH,
        idle_sleep: float = 1.0,
        only_search: str | None = None,
        stream: int | None = None,
    ) -> None:
        self.url = database_url
        self.batch = batch
        self.idle_sleep = idle_sleep
        self.only_search = only_search
        # Each worker samples from its own random stream, so two workers never ask Optuna's
        # seeded samplers for the same sequence of points.
        self.stream = random.SystemRandom().randrange(1, 2**31) if stream is None else stream
        self.storage = optuna_storage(database_url)
        self._contexts: dict[str, SearchContext] = {}
        self._studies: dict[tuple[str, int], tuple[optuna.Study, dict[str, Param]]] = {}
        self.stop_event = threading.Event()
        self._last_reap = 0.0

    def run(self, until_idle: bool = False) -> None:
        """Work until `stop_event` is set (or, with `until_idle`, until nothing is left to do)."""
        while not self.stop_event.is_set():
            if self.step():
                continue
            if until_idle:
                return
            self.stop_event.wait(self.idle_sleep)

    def step(self) -> bool:
        """One unit of work (a batch of trials, a stage change, a search's end); False if idle.

        Database failures are logged and end the step: the connection pools reconnect on the
        next step, and trials this worker could not report on are reaped and retried elsewhere.
        """
        try:
            return self._step()
        except (DatabaseError, optuna.exceptions.StorageInternalError, SQLAlchemyError) as error:
            log.warning("database unavailable, retrying: %s", error)
            self.stop_event.wait(self.idle_sleep)
            return False

    def _step(self) -> bool:
        self._reap()
        for search_id in self._open_searches():
            claim = self._claim(search_id)
            if claim is True:
                return True
            if claim is not None:
                self._train(claim)
                return True
        return False

    # -- finding and claiming work ------------------------------------------------------------

    def _open_searches(self) -> list[str]:
        with session_scope(self.url) as session:
            query = (
                select(Search.id)
                .where(Search.status.in_(OPEN_STATUSES))
                .order_by(Search.created_at)
            )
            if self.only_search is not None:
                query = query.where(Search.id == self.only_search)
            return list(session.scalars(query))

    def _claim(self, search_id: str) -> Claim | bool | None:
        """Under the search's lock: trials to train (a Claim), other work done (True), or None."""
        with session_scope(self.url) as session:
            row = lock_search(session, search_id)
            if row is None or row.status not in OPEN_STATUSES:
                return None
            if row.cancel_requested:
                row.status = "cancelled"
                row.finished_at = utcnow()
                return True
            try:
                ctx = self._context(row)
            except (DatasetError, SpecError, ValueError) as error:
                _fail_search(row, f"could not load the dataset: {error}")
                return True
            objective = ctx.objective
            if row.stage == 0:
                self._open(row, 1, objective)
                row.status, row.started_at = "running", utcnow()
            stages = ctx.spec.stage_plan()
            while True:
                study, space = self._stage(row, objective)
                remaining = stages[row.stage - 1].trials - used_slots(study)
                if remaining > 0 and not _timed_out(row, ctx.spec):
                    trials = []
                    for _ in range(min(self.batch, remaining)):
                        trials.append(ask(study))
                        # From now on the reaper knows whether this worker lives.
                        self.storage.record_heartbeat(trials[-1]._trial_id)
                    return Claim(row.id, row.stage, study, space, trials)
                if _running(study):
                    return None  # other workers are finishing this stage
                if row.stage < len(stages) and not _timed_out(row, ctx.spec):
                    self._open(row, row.stage + 1, objective)
                    continue
                self._finish(session, row, ctx)
                return True

    def _open(self, row: Search, number: int, objective: Objective) -> None:
        spec = SearchSpec.model_validate(row.spec)
        study, space = open_stage(self.storage, spec, row.id, number, objective, self.stream)
        self._studies[(row.id, number)] = (study, space)
        row.stage = number
        row.studies = [*row.studies, study_name(row.id, number)]

    def _stage(self, row: Search, objective: Objective) -> tuple[optuna.Study, dict[str, Param]]:
        key = (row.id, row.stage)
        if key not in self._studies:  # opened by another worker: reopen with our own sampler
            spec = SearchSpec.model_validate(row.spec)
            self._studies[key] = open_stage(
                self.storage, spec, row.id, row.stage, objective, self.stream
            )
        return self._studies[key]

    def _context(self, row: Search) -> SearchContext:
        if row.id not in self._contexts:
            spec = SearchSpec.model_validate(row.spec)
            dataset = (
                self._uploaded_dataset(row.owner, spec)
                if spec.dataset.id is not None
                else load_search_dataset(spec)
            )
            objective = spec.resolved_objective(dataset.task)
            self._contexts[row.id] = SearchContext(spec, row.id, dataset, objective)
        return self._contexts[row.id]

    def _uploaded_dataset(self, owner: str, spec: SearchSpec):
        """A dataset uploaded through the API, read from the database (never from a disk)."""
        with session_scope(self.url) as session:
            upload = session.get(DatasetRow, spec.dataset.id)
            if upload is None or upload.owner != owner:
                raise DatasetError(f"dataset {spec.dataset.id!r} not found")
            content, fmt, target, name = upload.content, upload.format, upload.target, upload.name
        if fmt == "npz":
            x, y, splits = read_npz(content)
        else:
            x, y = read_csv(content, target or "")
            splits = None
        task = spec.task or spec.dataset.task
        return from_arrays(name, x, y, seed=spec.seed, task=task, splits=splits)

    # -- training and finishing ---------------------------------------------------------------

    def _reap(self) -> None:
        """Fail trials whose worker stopped writing heartbeats, and enqueue them again."""
        if time.monotonic() - self._last_reap < GRACE_PERIOD_S / 4:
            return
        self._last_reap = time.monotonic()
        try:
            reap_stale_trials(self.url)
        except Exception:  # reaping is a courtesy to other workers: it must not stop this one
            log.exception("reaping stale trials failed")

    def _train(self, claim: Claim) -> list[TrialOutcome]:
        ctx = self._contexts[claim.search_id]
        ids = [trial._trial_id for trial in claim.trials]
        with Heartbeat(self.storage, ids, HEARTBEAT_INTERVAL_S) as heartbeat:
            outcomes = train_trials(
                claim.study,
                ctx,
                claim.space,
                claim.stage,
                claim.trials,
                should_stop=self._stop_check(claim.search_id, heartbeat),
                group_size=min(DEFAULT_GROUP_SIZE, self.batch),
            )
        if any(outcome.reason == "oom" for outcome in outcomes) and self.batch > 1:
            # Out of memory: the trials were enqueued again; retry them in smaller batches.
            self.batch //= 2
            log.warning("out of memory: batch size halved to %d", self.batch)
        return outcomes

    def _stop_check(self, search_id: str, heartbeat: Heartbeat, every_s: float = 1.0):
        """Stop in-flight trials when the search is cancelled, this worker is told to stop, or
        the database has been out of reach for longer than the grace period."""
        last = {"at": 0.0, "reason": None}

        def check() -> str | None:
            if self.stop_event.is_set():
                return "preempted"
            if heartbeat.silent_for() > GRACE_PERIOD_S:
                return "database unreachable"
            if time.monotonic() - last["at"] >= every_s:
                last["at"] = time.monotonic()
                try:
                    with session_scope(self.url) as session:
                        row = session.get(Search, search_id)
                        cancelled = row is None or row.cancel_requested or row.status == "cancelled"
                except DatabaseError:
                    return None  # unknown for now; the heartbeat decides when to give up
                last["reason"] = "cancelled" if cancelled else None
            return last["reason"]

        return check

    def _finish(self, session, row: Search, ctx: SearchContext) -> None:
        """Refit and test the best trial, store the model, and close the search."""
        spec, dataset = ctx.spec, ctx.dataset
        result = finish_search(spec, self.storage, row.id, dataset, row.stage)
        row.finished_at = utcnow()
        if result.best is None or result.final is None:
            _fail_search(row, "no trial completed")
            return
        row.best = {**result.best, "trials": result.counts}
        content = result.model_file(dataset)
        digest = hashlib.sha256(content).hexdigest()
        session.merge(
            TrainedModel(search_id=row.id, content=content, size=len(content), sha256=digest)
        )
        row.status = "completed"
        self._contexts.pop(row.id, None)


def reap_stale_trials(database_url: str) -> None:
    """Fail the stale trials of every open search's current stage (they are enqueued again)."""
    storage = optuna_storage(database_url)
    with session_scope(database_url) as session:
        studies = [
            row.studies[-1]
            for row in session.scalars(select(Search).where(Search.status.in_(OPEN_STATUSES)))
            if row.studies
        ]
    for name in studies:
        study = optuna.load_study(study_name=name, storage=storage)
        optuna.storages.fail_stale_trials(study)
        fail_orphaned_trials(study)


def _running(study: optuna.Study) -> bool:
    return any(
        t.state in (TrialState.RUNNING, TrialState.WAITING)
        for t in study.get_trials(deepcopy=False)
    )


def _timed_out(row: Search, spec: SearchSpec) -> bool:
    timeout = spec.budget.timeout_s
    if not timeout or row.started_at is None:
        return False
    started = row.started_at if row.started_at.tzinfo else row.started_at.replace(tzinfo=UTC)
    return (utcnow() - started).total_seconds() > timeout


def _fail_search(row: Search, message: str) -> None:
    row.status, row.error, row.finished_at = "failed", message, utcnow()
