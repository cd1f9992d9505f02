"""A whole search: stages of batches, coarse-to-fine refinement between stages, the final fit."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from db.storage import annotate_finished_trial
from models.data import Dataset, load_dataset
from models.export import TrainedModel, save_model
from search.final import FinalFit, final_fit
from search.refine import refine_space, top_fraction
from search.space import engine_params
from search.spec import Objective, Param, SearchSpec, SpecError, is_active
from search.studies import (
    counts_toward_budget,
    create_stage_study,
    load_stage_study,
    stage_space,
    study_name,
)
from search.worker import (
    DEFAULT_BATCH,
    SearchContext,
    StopCheck,
    TrialOutcome,
    run_batch,
    trial_seed,
)

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
    """Where a finished search stands: its studies, trial counts, best trial and final figures."""

    search_id: str
    studies: list[str]
    counts: dict[str, int]
    best: dict[str, Any] | None
    final: FinalFit | None = field(default=None, repr=False)

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


def run_search(
    spec: SearchSpec,
    storage: optuna.storages.BaseStorage,
    *,
    search_id: str | None = None,
    batch: int = DEFAULT_BATCH,
    should_stop: StopCheck | None = None,
    on_trial: Callable[[TrialOutcome], None] | None = None,
    on_stage: Callable[[int, dict[str, Param]], None] | None = None,
    on_epoch: Callable[[list], None] | None = None,
) -> SearchResult:
    """Run every stage of `spec` in this process, then refit and test the best trial once."""
    search_id = search_id or new_search_id(spec.name)
    dataset = load_search_dataset(spec)
    objective = spec.resolved_objective(dataset.task)
    ctx = SearchContext(spec, search_id, dataset, objective)
    stop = _with_deadline(should_stop, spec.budget.timeout_s)

    stages = spec.stage_plan()
    best: TrialOutcome | None = None  # with its variables: the final fit need not retrain it
    better = max if objective.direction == "maximize" else min
    for number, stage in enumerate(stages, start=1):
        study, space = open_stage(storage, spec, search_id, number, objective)
        if on_stage is not None:
            on_stage(number, space)
        while (remaining := stage.trials - used_slots(study)) > 0 and not stop():
            outcomes = run_batch(
                study,
                ctx,
                space,
                number,
                min(batch, remaining),
                should_stop=stop,
                on_trial=on_trial,
                on_epoch=on_epoch,
            )
            complete = [o for o in outcomes if o.state == TrialState.COMPLETE]
            if complete:
                best = better([best, *complete] if best else complete, key=lambda o: o.value)
        if stop():
            break

    return finish_search(spec, storage, search_id, dataset, len(stages), best)


def open_stage(
    storage: optuna.storages.BaseStorage,
    spec: SearchSpec,
    search_id: str,
    number: int,
    objective: Objective,
    stream: int = 0,
) -> tuple[optuna.Study, dict[str, Param]]:
    """Create (or reopen) stage `number`'s study and return it with the space it samples.

    Stage 1 samples the spec's space; each later stage narrows the previous stage's ranges
    around that stage's top `keep_top` fraction of complete trials (coarse to fine).
    """
    if _study_exists(storage, study_name(search_id, number)):
        study = load_stage_study(storage, spec, search_id, number, stream)
        return study, stage_space(study)
    space: dict[str, Param] = dict(spec.space)
    if number > 1:
        previous = load_stage_study(storage, spec, search_id, number - 1)
        space = stage_space(previous)
        stage = spec.stage_plan()[number - 1]
        scored = [
            (t.value, engine_params(t, space, spec.fixed))
            for t in previous.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ]
        top = top_fraction(scored, stage.keep_top, objective.direction)
        if top:
            space = refine_space(space, top, margin=stage.margin, original=spec.space)
    create_stage_study(
        storage, spec, search_id, number, space, objective.direction, objective.metric
    )
    return load_stage_study(storage, spec, search_id, number, stream), space


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
        return SearchResult(search_id, studies, counts, None)
    pick = max if objective.direction == "maximize" else min
    stage, best, params = pick(complete, key=lambda t: t.trial.value)
    study = _load(storage, study_name(search_id, stage))
    own = trained is not None and (trained.stage, trained.number) == (stage, best.number)
    fit = final_fit(
        spec,
        dataset,
        params,
        trial_seed(spec.seed, stage, best.number),
        int(best.user_attrs.get("best_epoch") or spec.budget.epochs),
        trained.variables() if own and trained.variables else None,
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
    return SearchResult(search_id, studies, counts, best_summary, fit)


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


def used_slots(study: optuna.Study) -> int:
    """Trials of a stage that hold a slot of its budget: finished ones and those running.

    A WAITING trial (a retry of a trial whose worker died) is not counted: it fills one of the
    free slots, because `study.ask()` hands out waiting trials first.
    """
    return sum(
        counts_toward_budget(t) or t.state == TrialState.RUNNING
        for t in study.get_trials(deepcopy=False)
    )


def _study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def _load(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def _with_deadline(should_stop: StopCheck | None, timeout_s: float | None) -> StopCheck:
    deadline = time.monotonic() + timeout_s if timeout_s else None

    def stop() -> str | None:
        if should_stop is not None and (reason := should_stop()):
            return reason
        if deadline is not None and time.monotonic() > deadline:
            return "timeout"
        return None

    return stop
