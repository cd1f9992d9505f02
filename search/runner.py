"""A whole search in this process (`caviar run`), and what every driver of a search shares.

`run_search` drives a stored search (a `caviar_searches` row) with the decisions of
`search.driver`, as `search.worker.Worker` does under the search's row lock: `StageStudies` says
where the open stage stands and carries out opening stages and asking for trials, `advance`
makes the decisions that change the row, `finish` tests the best trial once and closes the
search. Between stages, each numeric range narrows around the best trials (coarse to fine).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from caviar.db.session import DatabaseError, claim_sole_sqlite_worker, lock_search, session_scope
from caviar.db.storage import (
    annotate_finished_trial,
    create_trials,
    fail_stale_trials,
    normalise_url,
    optuna_storage,
    trial_tallies,
)
from caviar.db.tables import TERMINAL_STATUSES, Search, SearchStatus, StoredModel, utcnow
from caviar.models.data import Dataset, load_dataset
from caviar.models.export import TrainedModel, save_model
from caviar.models.train import default_group_size
from caviar.search.driver import (
    Ask,
    Cancel,
    Capacity,
    Decision,
    Finish,
    Open,
    SearchState,
    best_trained,
    decide,
    out_of_time,
    stop_reason,
)
from caviar.search.final import FinalFit, final_fit
from caviar.search.refine import refine_space, top_fraction
from caviar.search.space import engine_params
from caviar.search.spec import Objective, Param, SearchSpec, SpecError, is_active
from caviar.search.studies import (
    ask,
    complete_value,
    create_stage_study,
    ends_in_budget,
    load_stage_study,
    make_sampler,
    stage_space,
    study_name,
)
from caviar.search.trials import (
    RETRIED_REASONS,
    AskMore,
    SearchContext,
    StopCheck,
    TrialOutcome,
    default_batch,
    give_back,
    train_trials,
    trial_seed,
)

#: Owner of the searches `caviar run` starts (the CLI's `CAVIAR_LOCAL_OWNER`).
LOCAL_OWNER = "local"

#: Objective metric → the user-facing figure names of the best trial.
TEST_FIGURES = {"classification": ("test_accuracy",), "regression": ("test_mse", "test_r2")}


def new_search_id(name: str) -> str:
    """A unique, readable search id: the spec name's slug and a random suffix."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "search"
    return f"{slug}-{uuid.uuid4().hex[:8]}"


def load_search_dataset(spec: SearchSpec) -> Dataset:
    """The dataset a spec names, split with the spec's seed."""
    source = spec.dataset.model_dump(exclude_none=True)
    if "id" in source:
        raise SpecError([{"loc": ["dataset", "id"], "msg": "uploaded datasets need the service"}])
    return load_dataset(source, seed=spec.seed, task=spec.task)


@dataclass
class SearchResult:
    """Where a search stands: its studies, trial counts, and once it is completed its best trial,
    final figures and model file; `status` is the search's (`running` when a run stopped)."""

    search_id: str
    studies: list[str]
    counts: dict[str, int]
    best: dict[str, Any] | None
    final: FinalFit | None = field(default=None, repr=False)
    status: str = SearchStatus.COMPLETED
    model: bytes | None = field(default=None, repr=False)
    #: What trials were ranked by; None where the dataset (so the task) was not loaded.
    objective: Objective | None = None

    def model_file(self, dataset: Dataset) -> bytes:
        """The refit best model with the dataset's preprocessing, as one .npz file."""
        if self.final is None or self.best is None:
            raise ValueError("the search has no completed trial, so no model")
        fit = self.final
        model = TrainedModel(
            shape=fit.shape,
            variables=fit.variables,
            feature_mean=dataset.feature_mean,
            feature_std=dataset.feature_std,
            target_mean=dataset.target_mean,
            target_std=dataset.target_std,
            metadata={
                "search_id": self.search_id,
                "params": self.best["params"],
                "figures": fit.figures,
                "diagnosis": fit.diagnosis,
            },
        )
        return save_model(model)

    def summary(self) -> dict[str, Any]:
        """The JSON summary `caviar run --json` prints."""
        return {
            "search_id": self.search_id,
            "studies": self.studies,
            "trials": self.counts,
            "best": self.best,
        }


def new_search_row(spec: SearchSpec, owner: str, search_id: str | None = None) -> Search:
    """A queued search of `spec` for `owner`, to be added to a session."""
    return Search(
        id=search_id or new_search_id(spec.name),
        owner=owner,
        name=spec.name,
        spec=spec.model_dump(mode="json", exclude_none=True),
        status=SearchStatus.QUEUED,
    )


def start_search(
    database_url: str, spec: SearchSpec, owner: str = LOCAL_OWNER, search_id: str | None = None
) -> str:
    """Store a queued search of `spec` (as the API would) and return its id."""
    with session_scope(database_url) as session:
        row = new_search_row(spec, owner, search_id)
        session.add(row)
        return row.id


def stored_spec(database_url: str, search_id: str) -> SearchSpec:
    """The spec of a search that is still open; SpecError for any other, or an invalid spec."""
    with session_scope(database_url) as session:
        row = session.get(Search, search_id)
        if row is None or row.status in TERMINAL_STATUSES:
            state = "not found" if row is None else f"{row.status}: there is nothing to resume"
            raise SpecError([{"loc": ["search"], "msg": f"search {search_id!r} is {state}"}])
        spec = dict(row.spec)
    try:
        return SearchSpec.model_validate(spec)
    except ValidationError as error:
        raise SpecError.from_validation_error(error) from None


def run_search(
    database_url: str,
    search_id: str,
    *,
    batch: int | None = None,
    should_stop: StopCheck | None = None,
    on_trial: Callable[[TrialOutcome], None] | None = None,
    on_stage: Callable[[int, dict[str, Param]], None] | None = None,
    on_epoch: Callable[[list], None] | None = None,
) -> SearchResult:
    """Drive the stored search `search_id` in this process (`caviar run`) until it ends.

    The decisions are `search.driver`'s, as for the workers (`search.worker`), which make them
    under the search's row lock. A reason from `should_stop` stops the trials in flight; a
    retried one (`interrupted`, `preempted`) also stops this run and leaves the search open:
    calling this again resumes it, keeping its finished trials and running the stopped ones
    again. Any other reason ends the search as its timeout would. A resumed search's
    `timeout_s` counts from the resumption.
    """
    claim_sole_sqlite_worker(database_url)
    storage = optuna_storage(database_url)
    spec = stored_spec(database_url, search_id)
    dataset = load_search_dataset(spec)
    ctx = SearchContext(spec, search_id, dataset, spec.resolved_objective(dataset.task))
    stages = StageStudies(storage, spec, search_id, ctx.objective)
    with session_scope(database_url) as session:
        row = lock_search(session, search_id)
        if row is not None and row.stage:  # resumed
            row.started_at = utcnow()
            if _sole_worker(database_url):  # its running trials died with their process
                _give_back_running(stages.stage(row.stage)[0])
    requested = _Requested(should_stop)
    capacity, best, shown = Capacity(batch or default_batch()), None, 0
    while True:
        with session_scope(database_url) as session:
            row = lock_search(session, search_id)
            if row is None or row.status in TERMINAL_STATUSES:  # cancelled meanwhile
                return search_standing(storage, spec, search_id, row)
            reason = requested()
            if reason in RETRIED_REASONS:
                return search_standing(storage, spec, search_id, row)
            decision = advance(row, stages, capacity.current, time_up=reason is not None)
            if isinstance(decision, Cancel):
                row.status, row.finished_at = SearchStatus.CANCELLED, utcnow()
                return search_standing(storage, spec, search_id, row)
            number, started_at = row.stage, row.started_at
            trials = stages.ask(number, decision.count) if isinstance(decision, Ask) else []
            refills = bool(trials) and grants_more(row, stages)
        if isinstance(decision, Finish):
            return finish(database_url, ctx, storage, number, best)
        study, space = stages.stage(number)
        if number != shown and on_stage is not None:
            on_stage(number, space)
        shown = number
        if not trials:  # Wait: its last trials train elsewhere, or await the reaper
            fail_stale_trials(study)
            time.sleep(1.0)
            continue
        outcomes = train_trials(
            study,
            ctx,
            space,
            number,
            trials,
            should_stop=search_stop_check(
                database_url, search_id, started_at, spec.budget.timeout_s, first=requested
            ),
            on_trial=on_trial,
            on_epoch=on_epoch,
            group_size=min(default_group_size(), capacity.current),
            ask_more=more_trials(database_url, stages, search_id, number) if refills else None,
        )
        best = best_trained(best, outcomes, ctx.objective.resolved_direction)
        capacity.after(outcome.reason for outcome in outcomes)


class StageStudies:
    """A search's stage studies as one process drives it: where its open stage stands for the
    driver (`state`), and the driver's decisions to open a stage and to ask carried out."""

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        spec: SearchSpec,
        search_id: str,
        objective: Objective,
    ) -> None:
        self.storage, self.spec, self.search_id = storage, spec, search_id
        self.objective = objective
        self.plan = tuple(stage.trials for stage in spec.stage_plan())
        self._stages: dict[int, tuple[optuna.Study, dict[str, Param]]] = {}

    def stage(self, number: int) -> tuple[optuna.Study, dict[str, Param]]:
        """Stage `number`'s study and the space it samples; opened (created) on first use."""
        if number not in self._stages:
            self._stages[number] = open_stage(
                self.storage, self.spec, self.search_id, number, self.objective
            )
        return self._stages[number]

    def state(self, row: Search, now: datetime, time_up: bool = False) -> SearchState:
        """Where the search of `row` stands; `time_up` ends its time before its timeout."""
        timed_out = time_up or out_of_time(row.started_at, self.spec.budget.timeout_s, now)
        cancel = row.cancel_requested
        if row.stage == 0:
            return SearchState(self.plan, timed_out=timed_out, cancel_requested=cancel)
        tallies = trial_tallies(self.stage(row.stage)[0])
        running = sum(trial.state == TrialState.RUNNING for trial in tallies)
        counted = [trial for trial in tallies if ends_in_budget(trial.state, trial.reason)]
        budget = self.spec.budget
        epochs_left = None
        if budget.trial_epochs is not None:
            # A trial that failed mid-training (an error) recorded no epochs: count its most.
            spent = sum(budget.epochs if t.epochs is None else t.epochs for t in counted)
            epochs_left = budget.trial_epochs - spent - running * budget.epochs
        return SearchState(
            self.plan,
            row.stage,
            running + len(counted),
            running,
            timed_out,
            cancel,
            epochs_left,
            budget.epochs,
        )

    def ask(self, number: int, count: int) -> list[Trial]:
        """`count` new trials of stage `number` (retries first, as `study.ask()` hands out).

        The sampler is seeded from the spec's seed, the stage and how many trials the stage
        holds, so a search asks for the same trials whichever process asks (`caviar run` or
        any worker of a pool), and two claims never draw from the same sequence.
        """
        study, _ = self.stage(number)
        tallies = trial_tallies(study)
        study.sampler = make_sampler(self.spec, number, len(tallies))
        waiting = sum(trial.state == TrialState.WAITING for trial in tallies)
        retried = [ask(study) for _ in range(min(waiting, count))]
        return retried + create_trials(study, count - len(retried))


def more_trials(
    database_url: str,
    stages: StageStudies,
    search_id: str,
    stage: int,
    *,
    window_s: float | None = None,
    on_asked: Callable[[list[Trial]], None] | None = None,
) -> AskMore:
    """Asks, under the search's row lock, for up to n more trials of stage `stage`, as many as
    the driver's decision grants (the stage's budget left, no cancel, time not up); none once
    the stage is no longer open, or `window_s` seconds from now (a worker then takes its turn
    with other searches). `on_asked` sees the new trials before the lock is released."""
    deadline = time.monotonic() + window_s if window_s is not None else math.inf

    def ask_more(count: int) -> list[Trial]:
        if time.monotonic() > deadline:
            return []
        with session_scope(database_url) as session:
            row = lock_search(session, search_id)
            if row is None or row.status in TERMINAL_STATUSES or row.stage != stage:
                return []
            decision = decide(stages.state(row, utcnow()), count)
            if not isinstance(decision, Ask):
                return []
            trials = stages.ask(stage, decision.count)
            if on_asked is not None:
                on_asked(trials)
        return trials

    return ask_more


def grants_more(row: Search, stages: StageStudies) -> bool:
    """Whether the driver would still grant a trial of the open stage of `row` (whose lock the
    caller holds) once the trials asked so far are counted: when not, a claim's slots that
    empty take no new trial, and nothing is prepared for one."""
    return isinstance(decide(stages.state(row, utcnow()), 1), Ask)


def advance(row: Search, stages: StageStudies, capacity: int, *, time_up: bool = False) -> Decision:
    """The driver's next decision for the search of `row`, whose lock the caller holds.

    The stages it decides to open are opened here, and recorded on the row (the first one
    starts the search), so the decision returned is never an `Open`.
    """
    while isinstance(decision := decide(stages.state(row, utcnow(), time_up), capacity), Open):
        stages.stage(decision.stage)
        if row.stage == 0:
            row.status, row.started_at = SearchStatus.RUNNING, utcnow()
        row.stage = decision.stage
        row.studies = [*row.studies, study_name(row.id, decision.stage)]
    return decision


def finish(
    database_url: str,
    ctx: SearchContext,
    storage: optuna.storages.BaseStorage,
    stage_count: int,
    trained: TrialOutcome | None = None,
) -> SearchResult:
    """Carry out `Finish`: test the best trial once (outside the search's lock), then, locked,
    store it and the model file and close the search."""
    result = finish_search(ctx.spec, storage, ctx.search_id, ctx.dataset, stage_count, trained)
    content = result.model_file(ctx.dataset) if result.final is not None else None
    with session_scope(database_url) as session:
        row = lock_search(session, ctx.search_id)
        if row is not None and row.status not in TERMINAL_STATUSES:
            close_search(session, row, result, content)
        status = row.status if row is not None else SearchStatus.FAILED
    return replace(result, status=status, model=content)


def close_search(
    session: Session, row: Search, result: SearchResult, content: bytes | None
) -> None:
    """Store a finished search's best trial and model (None: no trial completed), and close it."""
    row.finished_at = utcnow()
    if result.best is None or content is None:
        row.status, row.error = SearchStatus.FAILED, "no trial completed"
        return
    row.best = {**result.best, "trials": result.counts}
    digest = hashlib.sha256(content).hexdigest()
    session.merge(StoredModel(search_id=row.id, content=content, size=len(content), sha256=digest))
    row.status = SearchStatus.COMPLETED


def search_standing(
    storage: optuna.storages.BaseStorage, spec: SearchSpec, search_id: str, row: Search | None
) -> SearchResult:
    """A search that this run leaves as it is: its studies and trial counts, its status."""
    studies = list(row.studies) if row is not None else []
    counts = count_states(t.trial for t in search_trials(storage, spec, studies))
    return SearchResult(
        search_id, studies, counts, None, status=row.status if row else SearchStatus.FAILED
    )


def search_stop_check(
    database_url: str,
    search_id: str,
    started_at: datetime | None,
    timeout_s: float | None,
    *,
    first: StopCheck | None = None,
    every_s: float = 1.0,
) -> StopCheck:
    """Why the search's trials in flight stop: the driver's own reason (`first`, such as its
    process stopping), else the search's (`search.driver.stop_reason`): its timeout, or a
    cancel, read from its row at most every `every_s` seconds."""
    last = {"at": -math.inf, "cancelled": False}

    def check() -> str | None:
        if first is not None and (reason := first()):
            return reason
        if time.monotonic() - last["at"] >= every_s:
            last["at"] = time.monotonic()
            try:
                with session_scope(database_url) as session:
                    row = session.get(Search, search_id)
                    last["cancelled"] = row is None or row.cancel_requested
            except DatabaseError:
                pass  # unknown for now: a worker's heartbeat decides when to give up
        timed_out = out_of_time(started_at, timeout_s, utcnow())
        return stop_reason(cancel_requested=bool(last["cancelled"]), timed_out=timed_out)

    return check


class _Requested:
    """`should_stop`, remembered: once it gives a reason, that reason holds."""

    def __init__(self, should_stop: StopCheck | None) -> None:
        self.should_stop = should_stop
        self.reason: str | None = None

    def __call__(self) -> str | None:
        if self.reason is None and self.should_stop is not None:
            self.reason = self.should_stop()
        return self.reason


def _sole_worker(database_url: str) -> bool:
    """Whether this process is the only one driving searches on the database (SQLite)."""
    return make_url(normalise_url(database_url)).get_backend_name() == "sqlite"


def _give_back_running(study: optuna.Study) -> None:
    """Fail the stage's running trials as interrupted; they are enqueued again."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    trials = [Trial(study, trial._trial_id) for trial in running]
    give_back(study, trials, "interrupted", "its process stopped before it ended")


def open_stage(
    storage: optuna.storages.BaseStorage,
    spec: SearchSpec,
    search_id: str,
    number: int,
    objective: Objective,
) -> tuple[optuna.Study, dict[str, Param]]:
    """Create (or reopen) stage `number`'s study and return it with the space it samples.

    Stage 1 samples the spec's space; each later stage narrows the previous stage's ranges
    around that stage's top `keep_top` fraction of complete trials (coarse to fine).
    """
    if _study_exists(storage, study_name(search_id, number)):
        study = load_stage_study(storage, spec, search_id, number)
        return study, stage_space(study)
    space: dict[str, Param] = dict(spec.space)
    if number > 1:
        previous = load_stage_study(storage, spec, search_id, number - 1)
        space = stage_space(previous)
        stage = spec.stage_plan()[number - 1]
        scored = [
            (complete_value(t), engine_params(t, space, spec.fixed))
            for t in previous.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ]
        top = top_fraction(scored, stage.keep_top, objective.resolved_direction)
        if top:
            space = refine_space(space, top, margin=stage.margin, original=spec.space)
    create_stage_study(
        storage, spec, search_id, number, space, objective.resolved_direction, objective.metric
    )
    return load_stage_study(storage, spec, search_id, number), space


def finish_search(
    spec: SearchSpec,
    storage: optuna.storages.BaseStorage,
    search_id: str,
    dataset: Dataset,
    stage_count: int,
    trained: TrialOutcome | None = None,
) -> SearchResult:
    """Pick the best trial over all stages, refit and test it once, and record the figures.

    When `trained` (an outcome of this process, with its variables) is that best trial, the
    `final_fit: train` refit is skipped: those variables are what it would reproduce.
    """
    studies = [
        study_name(search_id, n)
        for n in range(1, stage_count + 1)
        if _study_exists(storage, study_name(search_id, n))
    ]
    trials = search_trials(storage, spec, studies)
    counts = count_states(t.trial for t in trials)
    objective = spec.resolved_objective(dataset.task)
    complete = [t for t in trials if t.trial.state == TrialState.COMPLETE]
    if not complete:
        return SearchResult(search_id, studies, counts, None, objective=objective)
    pick = max if objective.resolved_direction == "maximize" else min
    stage, best, params = pick(complete, key=lambda t: complete_value(t.trial))
    study = _load(storage, study_name(search_id, stage))
    own = trained is not None and (trained.stage, trained.number) == (stage, best.number)
    fit = final_fit(
        spec,
        dataset,
        params,
        trial_seed(spec.seed, stage, best.number),
        int(best.user_attrs.get("best_epoch") or spec.budget.epochs),
        trained.variables() if trained is not None and own and trained.variables else None,
    )
    tests = {name: fit.figures[name] for name in TEST_FIGURES[dataset.task]}
    record = {
        **tests,
        "diagnosis": fit.diagnosis,
        "final_fit": spec.final_fit,
        "final_figures": fit.figures,
    }
    annotate_finished_trial(storage, best, record)
    for key, value in {**record, "best_trial": best.number}.items():
        study.set_user_attr(key, value)
    best_summary = {
        "trial": best.number,
        "stage": stage,
        "study": study_name(search_id, stage),
        "params": shown_params(params, spec),
        objective.metric: best.value,
        **tests,
        "diagnosis": fit.diagnosis,
    }
    return SearchResult(search_id, studies, counts, best_summary, fit, objective=objective)


def shown_params(params: dict[str, Any], spec: SearchSpec) -> dict[str, Any]:
    """The searched and fixed hyperparameters that the trial actually used (β as β)."""
    names = [*spec.space, *spec.fixed]
    return {name: params[name] for name in names if is_active(name, params)}


class SearchTrial(NamedTuple):
    """A trial of a search with its stage and the engine hyperparameters it used (β as β)."""

    stage: int
    trial: FrozenTrial
    params: dict[str, Any]


def search_trials(
    storage: optuna.storages.BaseStorage, spec: SearchSpec, studies: Sequence[str]
) -> list[SearchTrial]:
    """Every trial of a search's stage studies (`studies` in stage order), stage by stage."""
    found = []
    for stage, name in enumerate(studies, start=1):
        study = _load(storage, name)
        space = stage_space(study)
        found += [
            SearchTrial(stage, trial, engine_params(trial, space, spec.fixed))
            for trial in study.get_trials(deepcopy=False)
        ]
    return found


def count_states(trials: Iterable[FrozenTrial]) -> dict[str, int]:
    """Trials by state: complete, pruned, failed, running (WAITING retries included), total."""
    return tally_states(Counter(trial.state for trial in trials))


def tally_states(states: Mapping[TrialState, int]) -> dict[str, int]:
    """`count_states` from a count of trials per Optuna state."""
    return {
        "complete": states.get(TrialState.COMPLETE, 0),
        "pruned": states.get(TrialState.PRUNED, 0),
        "failed": states.get(TrialState.FAIL, 0),
        "running": states.get(TrialState.RUNNING, 0) + states.get(TrialState.WAITING, 0),
        "total": sum(states.values()),
    }


def _study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def _load(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)
