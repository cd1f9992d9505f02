"""The worker process: find searches with work left, claim trial slots under a lock, train them.

Any number of workers may share a PostgreSQL database (on SQLite, one). A worker claims up to K
trials of a search's current stage while holding that search's row lock, so together the workers
never ask for more trials than a stage's budget. The same lock serialises the stage changes
(creating the next, narrowed stage study) and the end of the search (refit, test, store the
model), so each happens exactly once. A search's data is loaded outside the lock. What to do next
is the search driver's decision (`search.driver`, read and carried out by `search.runner`), the
same as for `caviar run`, which drives a search in its own process.

While it works on a search a worker holds a lease on it (`caviar_leases`) and keeps the lease's
heartbeat fresh. A stale lease is a worker that died there (a poison search may kill every worker
that loads it): it counts as a failed attempt, and a search with `max_attempts` failed attempts
fails instead of taking the pool down again and again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import optuna
from optuna.trial import Trial
from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from caviar.db.session import DatabaseError, lock_search, session_scope
from caviar.db.storage import (
    GRACE_PERIOD_S,
    HEARTBEAT_INTERVAL_S,
    fail_stale_trials,
    optuna_storage,
    record_heartbeats,
)
from caviar.db.tables import OPEN_STATUSES, Lease, Search, SearchStatus, StoredDataset, utcnow
from caviar.models.data import Dataset, DatasetError, from_arrays, read_csv, read_npz
from caviar.models.train import default_group_size
from caviar.search.datadir import DataPathError, resolve_data_path
from caviar.search.driver import Ask, Capacity, Finish, best_trained
from caviar.search.heartbeat import Heartbeat
from caviar.search.runner import (
    StageStudies,
    advance,
    close_search,
    finish_search,
    grants_more,
    load_search_dataset,
    more_trials,
    search_stop_check,
)
from caviar.search.spec import Param, SearchSpec, SpecError
from caviar.search.studies import make_sampler
from caviar.search.trials import (
    SearchContext,
    TrialOutcome,
    default_batch,
    give_back,
    is_out_of_memory,
    train_trials,
)
from caviar.search.worker_metrics import METRICS

log = logging.getLogger("caviar.worker")

#: Statuses a worker looks for work in.

#: Seconds a worker goes on handing freed slots of a claim to new trials of its stage before it
#: lets the claim's last trials end and takes its turn with the other open searches.
REFILL_WINDOW_S = 120.0

#: Failed attempts on one search after which it fails (`CAVIAR_MAX_SEARCH_ATTEMPTS`).
DEFAULT_MAX_ATTEMPTS = 5

#: What a worker holding a lease of each phase was doing.
PHASES = {
    "load": "loading its dataset",
    "train": "training its trials",
    "finish": "refitting and testing its best trial",
}

#: Database failures: the worker retries them, they are no fault of the search.
DATABASE_ERRORS = (DatabaseError, optuna.exceptions.StorageInternalError, SQLAlchemyError)


@dataclass
class Claim:
    """Trials a worker asked for under the search's lock and now trains."""

    search_id: str
    stage: int
    study: optuna.Study
    space: dict[str, Param]
    trials: list[Trial]
    started_at: datetime | None  #: when the search started, which its timeout counts from
    refills: bool  #: whether the driver may grant more trials to its emptied slots


class Worker:
    """One worker process's loop over the database's open searches."""

    def __init__(
        self,
        database_url: str,
        *,
        batch: int | None = None,
        idle_sleep: float = 1.0,
        only_search: str | None = None,
        data_dir: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.url = database_url
        self.capacity = Capacity(batch or default_batch())
        self.idle_sleep = idle_sleep
        self.only_search = only_search
        self.data_dir = data_dir
        self.max_attempts = max_attempts
        self.id = uuid.uuid4().hex
        self.storage = optuna_storage(database_url)
        self._contexts: dict[str, SearchContext] = {}
        self._stages: dict[str, StageStudies] = {}
        #: Per search, the best trial this worker trained, with its weights for the final fit.
        self._best: dict[str, TrialOutcome] = {}
        self.stop_event = threading.Event()
        self._last_reap = 0.0
        self._in_flight: Claim | None = None
        self._last_served: str | None = None

    @property
    def batch(self) -> int:
        """Trials this worker claims at once (less for a while after trials ran out of memory)."""
        return self.capacity.current

    def run(self, until_idle: bool = False) -> None:
        """Work until `stop_event` is set (or, with `until_idle`, until nothing is left to do)."""
        done = threading.Event()
        keeper = threading.Thread(
            target=self._keep_leases, args=(done,), name="caviar-leases", daemon=True
        )
        keeper.start()
        try:
            while not self.stop_event.is_set():
                if self.step():
                    continue
                if until_idle:
                    return
                self.stop_event.wait(self.idle_sleep)
        finally:
            done.set()

    def run_until_stopped(self, grace_s: float = 3.0) -> bool:
        """`run` on a thread of its own until `stop_event` is set; True if it stopped cleanly.

        The main thread stays free for signal handlers whatever the worker does (generating a
        dataset, compiling). Once stopped, the work in hand gets `grace_s` seconds to end; past
        that, its trials are failed as preempted (and enqueued again) and its leases released,
        and False says the caller should exit at once, leaving the worker's thread behind.
        """
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.run()
            except BaseException as error:  # handed to the main thread, which raises it
                failure.append(error)

        thread = threading.Thread(target=work, name="caviar-worker", daemon=True)
        thread.start()
        while thread.is_alive() and not self.stop_event.wait(0.5):
            pass
        thread.join(grace_s)
        if failure:
            raise failure[0]
        if not thread.is_alive():
            return True
        abandon = threading.Thread(target=self.abandon, name="caviar-abandon", daemon=True)
        abandon.start()
        abandon.join(grace_s)
        return False

    def abandon(self) -> None:
        """Give up the work in hand: fail its trials as preempted (they are enqueued again) and
        release this worker's leases, so that no other worker counts it as a failed attempt."""
        claim = self._in_flight
        try:
            if claim is not None:
                give_back(claim.study, claim.trials, "preempted", "the worker was stopped")
            with session_scope(self.url) as session:
                session.execute(delete(Lease).where(Lease.worker == self.id))
        except DATABASE_ERRORS as error:  # the reaper fails the trials after the grace period
            log.warning("could not give the work in hand back: %s", error)

    def step(self) -> bool:
        """One unit of work (a batch of trials, a stage change, a search's end); False if idle.

        Database failures are logged and end the step: the connection pools reconnect on the
        next step, and trials this worker could not report on are reaped and retried elsewhere.
        """
        try:
            return self._step()
        except DATABASE_ERRORS as error:
            METRICS.database_error("step")
            log.warning("database unavailable, retrying: %s", error)
            self.stop_event.wait(self.idle_sleep)
            return False

    def _step(self) -> bool:
        self._reap()
        for search_id in self._in_turn(self._open_searches()):
            if search_id not in self._contexts:
                if self._load(search_id):
                    self._last_served = search_id
                    return True
                continue
            claim = self._claim(search_id)
            if claim is not None:
                self._last_served = search_id
            if claim is True:
                return True
            if claim is not None:
                self._train(claim)
                return True
        return False

    def _in_turn(self, search_ids: list[str]) -> list[str]:
        """The open searches (oldest first) rotated to start after the one served last, so that
        every search gets its turn however large the others' budgets are."""
        if self._last_served not in search_ids:
            return search_ids
        after = search_ids.index(self._last_served) + 1
        return search_ids[after:] + search_ids[:after]

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

    def _locked(self, session: Session, search_id: str) -> Search | None:
        """The search, locked, if there is work in it: cancellations are carried out, and the
        stale leases of dead workers are counted as failed attempts."""
        row = lock_search(session, search_id)
        if row is None or row.status not in OPEN_STATUSES:
            return None
        if row.cancel_requested:
            row.status = SearchStatus.CANCELLED
            row.finished_at = utcnow()
            return None
        cutoff = utcnow() - timedelta(seconds=GRACE_PERIOD_S)
        stale = session.scalars(
            select(Lease).where(Lease.search_id == search_id, Lease.heartbeat_at < cutoff)
        )
        for lease in stale:
            session.delete(lease)
            message = f"a worker died while {PHASES.get(lease.phase, 'working on it')}"
            self._count_failure(row, message)
        return row if row.status in OPEN_STATUSES else None

    def _count_failure(self, row: Search, reason: str) -> None:
        """One more failed attempt on the search; at `max_attempts`, the search fails."""
        row.attempts += 1
        log.warning("search %s, failed attempt %d: %s", row.id, row.attempts, reason)
        if row.attempts >= self.max_attempts:
            _fail_search(row, f"{row.attempts} worker attempts failed; the last: {reason}")

    def _lease(self, session: Session, search_id: str, phase: str) -> None:
        session.merge(
            Lease(search_id=search_id, worker=self.id, phase=phase, heartbeat_at=utcnow())
        )

    def _release(self, search_id: str) -> None:
        with session_scope(self.url) as session:
            session.execute(
                delete(Lease).where(Lease.search_id == search_id, Lease.worker == self.id)
            )

    def _keep_leases(self, done: threading.Event) -> None:
        """Refresh the heartbeat of this worker's leases until `done` (a thread of its own)."""
        while not done.wait(HEARTBEAT_INTERVAL_S):
            try:
                with session_scope(self.url) as session:
                    session.execute(
                        update(Lease).where(Lease.worker == self.id).values(heartbeat_at=utcnow())
                    )
            except DatabaseError as error:  # the leases go stale if this lasts the grace period
                METRICS.database_error("lease")
                log.warning("lease heartbeat failed: %s", error)

    def _load(self, search_id: str) -> bool:
        """Load the search's spec and data, outside its lock; False if there is nothing to do.

        A search that cannot be loaded fails with the reason.
        """
        with session_scope(self.url) as session:
            row = self._locked(session, search_id)
            if row is None or self._loading_elsewhere(session, search_id):
                return False
            self._lease(session, search_id, "load")
            owner, spec = row.owner, dict(row.spec)
        try:
            context = self._while_open(search_id, lambda: self._context(search_id, owner, spec))
            if context is not None:
                self._contexts[search_id] = context
        except DATABASE_ERRORS:
            raise
        except Exception as error:  # whatever the spec or its data do, only this search fails
            what = "start the search" if isinstance(error, SpecError) else "load the dataset"
            with session_scope(self.url) as session:
                row = lock_search(session, search_id)
                if row is not None and row.status in OPEN_STATUSES:
                    _fail_search(row, f"could not {what}: {_problem(error)}")
        finally:
            self._release(search_id)
        return True

    def _claim(self, search_id: str) -> Claim | Literal[True] | None:
        """Under the search's lock: trials to train (a Claim), other work done (True), or None."""
        ctx = self._contexts[search_id]
        with session_scope(self.url) as session:
            row = self._locked(session, search_id)
            if row is None:
                self._forget(search_id)
                return None
            stages = self._stages.setdefault(
                search_id, StageStudies(self.storage, ctx.spec, search_id, ctx.objective)
            )
            decision = advance(row, stages, self.batch)
            if isinstance(decision, Ask):
                study, space = stages.stage(row.stage)
                trials = stages.ask(row.stage, decision.count)
                # From now on the reaper knows whether this worker lives.
                record_heartbeats(self.storage, [trial._trial_id for trial in trials])
                self._lease(session, row.id, "train")
                refills = grants_more(row, stages)
                claim = Claim(row.id, row.stage, study, space, trials, row.started_at, refills)
                self._in_flight = claim
                return claim
            if not isinstance(decision, Finish):
                return None  # other workers are finishing this stage
            finishing = select(Lease).where(
                Lease.search_id == row.id, Lease.phase == "finish", Lease.worker != self.id
            )
            if session.scalars(finishing).first() is not None:
                return None  # another worker is finishing the search
            self._lease(session, row.id, "finish")
            stage_count = row.stage
        self._finish(search_id, stage_count, ctx)
        return True

    def _forget(self, search_id: str) -> None:
        """Drop what this worker holds of a search that has no work left (its data, weights)."""
        for held in (self._contexts, self._stages, self._best):
            held.pop(search_id, None)

    def _loading_elsewhere(self, session: Session, search_id: str) -> bool:
        """Whether another live worker is loading the search now: this one then serves other
        searches meanwhile (stale leases were already counted and removed by `_locked`)."""
        other = session.scalar(
            select(Lease.worker).where(
                Lease.search_id == search_id, Lease.phase == "load", Lease.worker != self.id
            )
        )
        return other is not None

    def _while_open(
        self, search_id: str, load: Callable[[], SearchContext]
    ) -> SearchContext | None:
        """`load()` on a thread of its own, given up (None) as soon as the search is cancelled
        or ends, or this worker is told to stop: a long load never outlives its search.

        A given-up load runs on in the background until it returns; its result is dropped.
        """
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["context"] = load()
            except BaseException as error:  # re-raised on the worker's thread
                result["error"] = error

        thread = threading.Thread(target=run, name=f"caviar-load-{search_id}", daemon=True)
        thread.start()
        while not self.stop_event.is_set():
            thread.join(timeout=1.0)
            if not thread.is_alive():
                if "error" in result:
                    raise result["error"]
                return result["context"]
            with session_scope(self.url) as session:
                row = session.get(Search, search_id)
                if row is None or row.cancel_requested or row.status not in OPEN_STATUSES:
                    log.info("search %s ended while its dataset loaded: load given up", search_id)
                    return None
        return None

    def _context(self, search_id: str, owner: str, spec_data: dict[str, Any]) -> SearchContext:
        """The spec, its dataset (on the device) and objective; raises if any is unusable (a
        `SpecError` for a spec this worker cannot run, such as a sampler it lacks a package for)."""
        spec = SearchSpec.model_validate(spec_data)
        make_sampler(spec, stage=1)
        if spec.dataset.id is not None:
            dataset = self._uploaded_dataset(owner, spec)
        elif spec.dataset.path is not None:
            dataset = self._data_dir_dataset(spec)
        else:
            dataset = load_search_dataset(spec)
        objective = spec.resolved_objective(dataset.task)
        return SearchContext(spec, search_id, dataset, objective)

    def _data_dir_dataset(self, spec: SearchSpec) -> Dataset:
        """A file of the operator's data directory. The path is checked again here (the file
        may have changed since the spec was submitted), and no error quotes the file."""
        try:
            path = resolve_data_path(spec.dataset.path or "", self.data_dir)
        except DataPathError as error:
            raise DataPathError(f"dataset.path: {error}") from None
        source = spec.dataset.model_copy(update={"path": str(path)})
        try:
            return load_search_dataset(spec.model_copy(update={"dataset": source}))
        except DatasetError as error:
            log.warning("dataset.path %s: %s", path, error)  # the operator may read the file
            message = f"dataset.path {spec.dataset.path!r} is not a dataset Caviar can read"
            raise DatasetError(f"{message} (the worker's log says why)") from None

    def _uploaded_dataset(self, owner: str, spec: SearchSpec):
        """A dataset uploaded through the API, read from the database (never from a disk)."""
        with session_scope(self.url) as session:
            upload = session.get(StoredDataset, spec.dataset.id)
            if upload is None or upload.owner != owner:
                raise DatasetError(f"dataset {spec.dataset.id!r} not found")
            content, fmt, target, name = upload.content, upload.format, upload.target, upload.name
        if fmt == "npz":
            x, y, splits = read_npz(content)
        else:
            x, y = read_csv(content, target or "")
            splits = None
        return from_arrays(name, x, y, seed=spec.seed, task=spec.declared_task, splits=splits)

    # -- training and finishing ---------------------------------------------------------------

    def _reap(self) -> None:
        """Fail trials whose worker stopped writing heartbeats, and enqueue them again."""
        if time.monotonic() - self._last_reap < GRACE_PERIOD_S / 4:
            return
        self._last_reap = time.monotonic()
        try:
            METRICS.trials_reaped(reap_stale_trials(self.url))
        except Exception:  # reaping is a courtesy to other workers: it must not stop this one
            log.exception("reaping stale trials failed")

    def _train(self, claim: Claim) -> list[TrialOutcome]:
        ctx = self._contexts[claim.search_id]
        ids = [trial._trial_id for trial in claim.trials]
        try:
            with Heartbeat(self.storage, ids, HEARTBEAT_INTERVAL_S) as heartbeat:

                def joined(trials: list[Trial]) -> None:  # refills, still under the lock
                    ids = [trial._trial_id for trial in trials]
                    record_heartbeats(self.storage, ids)
                    heartbeat.add(ids)
                    claim.trials.extend(trials)

                outcomes = train_trials(
                    claim.study,
                    ctx,
                    claim.space,
                    claim.stage,
                    claim.trials,
                    should_stop=self._stop_check(claim, ctx, heartbeat),
                    on_epoch=METRICS.epoch_trained,
                    group_size=min(default_group_size(), self.batch),
                    ask_more=(
                        more_trials(
                            self.url,
                            self._stages[claim.search_id],
                            claim.search_id,
                            claim.stage,
                            window_s=REFILL_WINDOW_S,
                            on_asked=joined,
                        )
                        if claim.refills
                        else None
                    ),
                )
        except DATABASE_ERRORS:
            raise
        except Exception as error:  # a failure outside the engine's groups: retried, boundedly
            give_back(claim.study, claim.trials, "preempted", _problem(error))
            with session_scope(self.url) as session:
                row = lock_search(session, claim.search_id)
                if row is not None and row.status in OPEN_STATUSES:
                    self._count_failure(row, f"training failed: {_problem(error)}")
            return []
        finally:
            self._in_flight = None
            self._release(claim.search_id)
        METRICS.batch_trained([o.state.name.lower() for o in outcomes], self.batch)
        best = best_trained(
            self._best.get(claim.search_id), outcomes, ctx.objective.resolved_direction
        )
        if best is not None:
            self._best[claim.search_id] = best
        batch = self.batch
        self.capacity.after(o.reason for o in outcomes)
        if self.batch < batch:  # the trials were enqueued again: retried in smaller batches
            log.warning("out of memory: batch size halved to %d", self.batch)
        elif self.batch > batch:
            log.info("no trial ran out of memory in a while: batch size back to %d", self.batch)
        return outcomes

    def _stop_check(self, claim: Claim, ctx: SearchContext, heartbeat: Heartbeat):
        """Stop in-flight trials when this worker is told to stop, the database has been out of
        reach for longer than the grace period, or for the search's own reasons (a cancel, its
        timeout), as every driver stops them."""

        def stopping() -> str | None:
            if self.stop_event.is_set():
                return "preempted"
            if heartbeat.silent_for() > GRACE_PERIOD_S:
                return "database unreachable"
            return None

        timeout = ctx.spec.budget.timeout_s
        return search_stop_check(
            self.url, claim.search_id, claim.started_at, timeout, first=stopping
        )

    def _finish(self, search_id: str, stage_count: int, ctx: SearchContext) -> None:
        """Refit and test the best trial outside the lock (holding the search's finish lease),
        then, locked, store the model and close the search."""
        failure = None
        try:
            trained = self._best.get(search_id)  # tested without a refit if it is the best
            result = finish_search(
                ctx.spec, self.storage, search_id, ctx.dataset, stage_count, trained
            )
            content = result.model_file(ctx.dataset) if result.final is not None else None
        except DATABASE_ERRORS:
            self._release(search_id)
            raise
        except Exception as error:  # the next attempt (boundedly many) does it again
            failure = f"the final fit failed: {_problem(error)}"
        with session_scope(self.url) as session:
            row = lock_search(session, search_id)
            if row is not None and row.status in OPEN_STATUSES:
                if failure is not None:
                    self._count_failure(row, failure)
                else:
                    close_search(session, row, result, content)
            session.execute(
                delete(Lease).where(Lease.search_id == search_id, Lease.worker == self.id)
            )
        if failure is None:
            self._forget(search_id)


def reap_stale_trials(database_url: str) -> int:
    """Fail the stale trials of every open search's current stage (they are enqueued again);
    how many this call failed."""
    storage = optuna_storage(database_url)
    with session_scope(database_url) as session:
        studies = [
            row.studies[-1]
            for row in session.scalars(select(Search).where(Search.status.in_(OPEN_STATUSES)))
            if row.studies
        ]
    return sum(
        fail_stale_trials(optuna.load_study(study_name=name, storage=storage)) for name in studies
    )


def _fail_search(row: Search, message: str) -> None:
    row.status, row.error, row.finished_at = SearchStatus.FAILED, message, utcnow()


def _problem(error: BaseException) -> str:
    """What went wrong, in one line: field paths for an invalid spec, else the error."""
    if isinstance(error, ValidationError):
        error = SpecError.from_validation_error(error)
    if is_out_of_memory(error):
        return "out of memory"
    return " ".join(str(error).split()) or type(error).__name__
