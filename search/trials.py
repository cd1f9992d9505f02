"""The worker loop's core: ask Optuna for trials, train them, tell Optuna.

The planner (`models.planner.plan`) splits a claim of trials into buckets, each one compiled
program for trials of different shapes; the engine (`models.train.train_buckets`) trains the
buckets side by side, one lane each, and knows nothing about Optuna; this module turns each
lane's per-epoch callback into reports and Optuna's pruning decisions
(`search.pruning.RoundPruner`), tells Optuna each trial as it leaves its slot, and, given a way
to ask the driver for more (`AskMore`), hands a freed slot to a new trial of the stage at once.
A diverged trial fails with reason `diverged`; the rest of its batch goes on.
"""

from __future__ import annotations

import logging
import math
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import Trial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from caviar.db.storage import (
    Finished,
    deferred_writes,
    finish_trials,
    report_epoch,
    retry_trial,
    set_user_attrs,
)
from caviar.models.data import Dataset
from caviar.models.executables import compile_ahead_override
from caviar.models.planner import plan, strategy_from_env
from caviar.models.train import (
    HPARAM_DEFAULTS,
    Bucket,
    EndedTrial,
    EpochReport,
    Lane,
    Shape,
    TrainData,
    TrialResult,
    cached_buckets,
    compile_ahead,
    compiled_buckets,
    default_group_size,
    planning_costs,
    train_buckets,
)
from caviar.search.pruning import RoundPruner
from caviar.search.space import sample_trial
from caviar.search.spec import Direction, Objective, Param, SearchSpec
from caviar.search.studies import ends_in_budget, expected_epochs

#: Trials one worker asks for at once; the planner splits them into buckets.
DEFAULT_BATCH = 32
"""Trials a driver asks for and trains at once, at least: on an accelerator, one group's worth."""


def default_batch() -> int:
    """Trials to ask for at once: `DEFAULT_BATCH`, or a whole group where groups are larger."""
    return max(DEFAULT_BATCH, default_group_size())


logger = logging.getLogger(__name__)

#: Stop reasons after which a trial is enqueued again: the trial itself was not at fault.
RETRIED_REASONS = frozenset({"preempted", "interrupted", "oom"})


@dataclass
class SearchContext:
    """What every batch of a search needs: the spec, its data on the device and its objective."""

    spec: SearchSpec
    search_id: str
    dataset: Dataset
    objective: Objective
    data: TrainData = field(init=False)

    def __post_init__(self) -> None:
        ds = self.dataset
        self.data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev, ds.target_std)


@dataclass(frozen=True)
class TrialOutcome:
    """What happened to one trial, for progress displays."""

    number: int
    stage: int
    state: TrialState
    value: float | None
    params: dict[str, Any]
    reason: str | None = None  # why a failed trial failed
    #: The objective's direction, "maximize" or "minimize": which values are better.
    direction: Direction = "maximize"
    epochs: int = 0  #: epochs it trained (0: it never trained, e.g. given back unstarted)
    #: A complete trial's best-epoch variables, read on demand (its batch's result stays on the
    #: device meanwhile), so that its own process can test it without a refit.
    variables: Callable[[], dict] | None = field(default=None, repr=False, compare=False)

    @property
    def counted(self) -> bool:
        """Whether it counts toward the budget (a trial run again does not)."""
        return ends_in_budget(self.state, self.reason)


#: Called after every epoch; a returned reason ("cancelled", "timeout", "preempted") stops every
#: trial in training, which then fails with that reason.
StopCheck = Callable[[], "str | None"]


def shape_of(params: dict[str, Any], dataset: Dataset) -> Shape:
    """The real architecture of a trial's hyperparameters (a bucket may hold it padded)."""
    return Shape(
        input_dim=dataset.num_features,
        num_outputs=dataset.num_outputs,
        hidden=(int(params["hidden_units"]),) * int(params["hidden_layers"]),
        activation=params["activation"],
        batch_norm=bool(params["batch_norm"]),
        optimizer=params["optimizer"],
        batch_size=min(int(params["batch_size"]), len(dataset.y_train)),
        task=dataset.task,
        use_dropout=float(params["dropout"]) > 0,
    )


def continuous_hparams(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """The trial's continuous hyperparameters (everything of the engine's that is not the shape)."""
    values = {name: params[name] for name in HPARAM_DEFAULTS if name in params}
    values["seed"] = seed
    return values


def trial_seed(spec_seed: int, stage: int, number: int) -> int:
    """A stable per-trial seed for initialisation and dropout."""
    return zlib.crc32(f"{spec_seed}/{stage}/{number}".encode()) & 0x7FFFFFFF


#: Asks the driver for up to n more trials of the stage: as many as its budget leaves, or none.
AskMore = Callable[[int], list[Trial]]


class _Asked(NamedTuple):
    """An asked trial with its sampled hyperparameters and the shape they make."""

    trial: Trial
    params: dict[str, Any]
    shape: Shape


def train_trials(
    study: optuna.Study,
    ctx: SearchContext,
    space: dict[str, Param],
    stage: int,
    trials: list[Trial],
    *,
    should_stop: StopCheck | None = None,
    on_trial: Callable[[TrialOutcome], None] | None = None,
    on_epoch: Callable[[list[Trial]], None] | None = None,
    group_size: int | None = None,
    strategy: str | None = None,
    ask_more: AskMore | None = None,
) -> list[TrialOutcome]:
    """Sample and train already-asked trials of `stage`, their buckets side by side in one
    round loop (`models.train.train_buckets`); tell Optuna each result as it ends.

    `strategy` (default `$CAVIAR_BUCKETS`, else `auto`) is the planner's; `group_size` trials of
    a bucket share one compiled call (default: by backend, `models.train.default_group_size`).
    With `ask_more`, the slot of a trial that ends (pruned, diverged, complete) goes at once to
    a new trial of the stage, as many as `ask_more` grants: one that an earlier slot asked for
    and could not take, if one fits the slot's bucket, else a new one. Asked trials that fit no
    bucket with a free slot wait (a claim's worth at most); they get buckets of their own, which
    join the loop as their programs compile, as lanes leave room: the trials in lanes stay
    within the claim's size, so that a promoted trial's epochs do not slow down as more trials
    come. A lane that finds no trial for its free slots takes no more and empties.
    """
    if not trials:
        return []
    pending = _prepare(study, ctx, space, stage, trials)
    loop = _StageLoop(
        study,
        ctx,
        space,
        stage,
        should_stop,
        on_trial,
        on_epoch,
        group_size or default_group_size(),
        strategy,
        ask_more,
        pending,
    )
    try:
        lanes = loop.more_lanes(False)
        if lanes:
            train_buckets(
                lanes,
                ctx.data,
                epochs=ctx.spec.budget.epochs,
                more=loop.more_lanes,
                data_seed=ctx.spec.seed,
                monitor=_monitor(ctx),
                group_size=loop.group_size,
            )
    except _DATABASE_ERRORS:
        raise  # the database, not the trials, failed: the worker retries, the reaper reruns them
    except Exception as error:  # a bug or a resource error outside the lanes: all untold fail
        loop.fail_untold(*_failure(error))
    finally:
        for future in loop.compiling:  # a compile not started yet is dropped
            future.cancel()
    return loop.outcomes()


#: Errors of the database rather than of the trials: raised on, never a trial's failure.
_DATABASE_ERRORS = (optuna.exceptions.StorageInternalError, SQLAlchemyError)


def _failure(error: Exception) -> tuple[str, str]:
    """The reason (`oom` or `error`) and message a trial fails with when `error` stopped it."""
    reason = "oom" if is_out_of_memory(error) else "error"
    return reason, "".join(traceback.format_exception_only(error)).strip()


class _StageLoop:
    """A claim's trials in one `train_buckets` loop: its lanes (one `_LaneTraining` each), the
    pool of asked trials waiting for a free slot of a bucket they fit, and the lanes planned
    for them.

    Trials in lanes stay about the claim's size (each lane's slots are rounded up to whole
    groups): pooled trials get a lane of their own only when lanes leave room for a group of
    them, or once no more trials will come, or when nothing else trains. Once `ask_more` has
    granted nothing, the loop asks no more (the driver's next claim asks again)."""

    def __init__(
        self,
        study: optuna.Study,
        ctx: SearchContext,
        space: dict[str, Param],
        stage: int,
        should_stop: StopCheck | None,
        on_trial: Callable[[TrialOutcome], None] | None,
        on_epoch: Callable[[list[Trial]], None] | None,
        group_size: int,
        strategy: str | None,
        ask_more: AskMore | None,
        claim: list[_Asked],
    ) -> None:
        """`claim`: the claim's trials, pooled until `more_lanes` plans them (nothing trains
        yet); their number is the most trials the lanes hold."""
        self.study, self.ctx, self.space, self.stage = study, ctx, space, stage
        self.should_stop, self.on_trial, self.on_epoch = should_stop, on_trial, on_epoch
        self.group_size, self.strategy, self.ask_more = group_size, strategy, ask_more
        self.claim = len(claim)
        self.lanes: list[_LaneTraining] = []
        self.pool = list(claim)  # asked trials that fit no bucket with a free slot
        self.granting = ask_more is not None  # whether `ask_more` may grant more
        self.compiling: list[Future[None]] = []
        self.given_back: list[TrialOutcome] = []

    def plan_lanes(self, asked: list[_Asked], *, first_ahead: bool) -> list[Lane]:
        """Plan `asked` into buckets, one lane each. Their programs compile in the background
        (the first one too with `first_ahead`, else as it starts, with nothing else to train)."""
        buckets = _plan(self.ctx, asked, self.group_size, self.strategy)
        refills = self.granting
        ahead = buckets if first_ahead else buckets[1:]
        self.compiling += _compile_ahead(self.ctx, ahead, self.group_size, refills=refills)
        lanes = []
        for bucket, members in buckets:
            lane = _LaneTraining(self, bucket, members)
            self.lanes.append(lane)
            lanes.append(
                Lane(
                    [a.shape for a in members],
                    [lane.seeded(a) for a in members],
                    bucket,
                    callback=lane.epoch_done,
                    refill=lane.more if refills else None,
                    on_end=lane.ended,
                    on_error=lane.failed,
                )
            )
        return lanes

    def in_lanes(self) -> int:
        """Trials in the lanes and not told yet: training, or waiting for a slot of their lane."""
        return sum(len(lane.asked) - len(lane.outcomes) for lane in self.lanes)

    def take(self, bucket: Bucket, free: int) -> list[_Asked]:
        """Up to `free` trials for `bucket`'s free slots: pooled ones that fit it first, then
        new ones while `ask_more` grants them; those asked that do not fit go to the pool, a
        claim's worth at most (then no more are asked)."""
        fitting = [a for a in self.pool if bucket.fits(a.shape)][:free]
        self.pool = [a for a in self.pool if a not in fitting]
        while self.granting and len(fitting) < free and len(self.pool) < self.claim:
            assert self.ask_more is not None
            new = self.ask_more(free - len(fitting))
            if not new:
                self.granting = False
                break
            for asked in _prepare(self.study, self.ctx, self.space, self.stage, new):
                (fitting if bucket.fits(asked.shape) else self.pool).append(asked)
        return fitting

    def more_lanes(self, training: bool) -> list[Lane]:
        """Lanes for pooled trials: all of them when nothing else trains; else as many as the
        room the lanes leave, when that is a group's worth or all that is left to come."""
        count = len(self.pool)
        if training:
            count = min(count, self.claim - self.in_lanes())
            if count < self.group_size and (self.granting or count < len(self.pool)):
                return []
        if count <= 0:
            return []
        waiting = self.pool[:count]
        reason = self.should_stop() if self.should_stop is not None else None
        if reason:  # stopped before they started: give them back at once
            self.pool = self.pool[count:]
            self._give_back(waiting, reason, f"not started: {reason}")
            return []
        lanes = self.plan_lanes(waiting, first_ahead=training)
        self.pool = self.pool[count:]  # only once they are in lanes: else `fail_untold` fails them
        return lanes

    def fail_untold(self, reason: str, message: str) -> None:
        """Fail every trial asked and not told yet (after the loop itself failed)."""
        for lane in self.lanes:
            lane.fail_untold(reason, message)
        waiting, self.pool = self.pool, []
        self._give_back(waiting, reason, message)

    def _give_back(self, waiting: list[_Asked], reason: str, message: str) -> None:
        """Fail trials that were asked but never trained."""
        for a in waiting:
            outcome = _fail(
                self.study, a.trial, a.params, self.stage, reason, message, self.on_trial
            )
            self.given_back.append(outcome)

    def outcomes(self) -> list[TrialOutcome]:
        """Every trial's outcome, lane by lane, then those given back unstarted."""
        told = [lane.outcomes[i] for lane in self.lanes for i in sorted(lane.outcomes)]
        return told + self.given_back


def _compile_ahead(
    ctx: SearchContext,
    buckets: list[tuple[Bucket, list[_Asked]]],
    group_size: int,
    *,
    refills: bool,
) -> list[Future[None]]:
    """Start compiling these buckets' programs in the background, in order (unless
    `$CAVIAR_COMPILE_AHEAD` is 0): each compiles while the buckets before it train; with
    `refills` (new trials may join), their slot programs too."""
    if compile_ahead_override() is False:
        return []
    futures = []
    for bucket, members in buckets:
        future = compile_ahead(
            [a.shape for a in members],
            [continuous_hparams(a.params, 0) for a in members],
            ctx.data,
            group_size=group_size,
            monitor=_monitor(ctx),
            bucket=bucket,
            refills=refills,
        )
        if future is not None:
            futures.append(future)
    return futures


def _prepare(
    study: optuna.Study, ctx: SearchContext, space: dict[str, Param], stage: int, trials: list
) -> list[_Asked]:
    """Sample the asked trials' parameters, all written in one transaction."""
    asked = []
    with deferred_writes(study, trials):
        for trial in trials:
            trial.set_user_attr("stage", stage)
            params = sample_trial(trial, space, ctx.spec.fixed)
            asked.append(_Asked(trial, params, shape_of(params, ctx.dataset)))
    return asked


def _plan(
    ctx: SearchContext, asked: list[_Asked], group_size: int, strategy: str | None
) -> list[tuple[Bucket, list[_Asked]]]:
    """The planner's buckets for these trials, each with its members."""
    shapes = [a.shape for a in asked]
    costs = planning_costs(
        ctx.data, epochs=expected_epochs(ctx.spec), group_size=group_size, trials=len(asked)
    )
    chosen = plan(
        shapes,
        costs,
        strategy=strategy or strategy_from_env(),
        compiled=compiled_buckets(ctx.data, _monitor(ctx)),
        cached=cached_buckets(ctx.data, _monitor(ctx)),
    )
    logger.info(
        "%d trials of %d shapes in %d buckets: %s",
        len(asked),
        len(set(shapes)),
        len(chosen.assignments),
        chosen.describe(),
        extra={"plan": chosen},
    )
    return [(a.bucket, [asked[i] for i in a.members]) for a in chosen.assignments]


def _monitor(ctx: SearchContext) -> tuple[str, bool]:
    """The search's objective as the engine's monitor: metric, and whether higher is better."""
    return ctx.objective.metric, ctx.objective.resolved_direction == "maximize"


class _LaneTraining:
    """The engine's callbacks for one lane (a bucket's trials): report each epoch and ask the
    pruner, take refills, tell each trial as it ends, and hold the weights of the best complete
    one."""

    def __init__(self, loop: _StageLoop, bucket: Bucket, members: list[_Asked]) -> None:
        self.loop, self.bucket = loop, bucket
        self.study, self.ctx, self.stage = loop.study, loop.ctx, loop.stage
        self.should_stop, self.on_trial, self.on_epoch = (
            loop.should_stop,
            loop.on_trial,
            loop.on_epoch,
        )
        self.asked = list(members)  # by engine index: the given trials, then the refills
        self.pruner = RoundPruner(self.study)
        self.pruned = [False] * len(self.asked)
        self.outcomes: dict[int, TrialOutcome] = {}
        self.stop_reason: str | None = None
        self.maximize = self.ctx.objective.resolved_direction == "maximize"
        self.kept: int | None = None  # the complete trial whose weights are held: the best yet

    def seeded(self, a: _Asked) -> dict[str, Any]:
        """The trial's continuous hyperparameters with its own seed."""
        seed = trial_seed(self.ctx.spec.seed, self.stage, a.trial.number)
        return continuous_hparams(a.params, seed)

    def more(self, free: int) -> list[tuple[Shape, dict[str, Any]]]:
        """Up to `free` new trials for freed slots (none once the lane is stopping)."""
        new = [] if self.stop_reason else self.loop.take(self.bucket, free)
        self.asked.extend(new)
        self.pruned.extend([False] * len(new))
        return [(a.shape, self.seeded(a)) for a in new]

    def failed(self, error: Exception) -> None:
        """The lane's program or callbacks raised `error`: its untold trials fail with it (a
        database error is raised on)."""
        if isinstance(error, _DATABASE_ERRORS):
            raise error
        self.fail_untold(*_failure(error))

    def fail_untold(self, reason: str, message: str) -> None:
        """Fail the lane's trials that were not told yet."""
        for index, a in enumerate(self.asked):
            if index not in self.outcomes:
                self.outcomes[index] = _fail(
                    self.study, a.trial, a.params, self.stage, reason, message, self.on_trial
                )

    def epoch_done(self, report: EpochReport) -> np.ndarray:
        """Report the round's values, ask the pruner; the mask of trials to stop."""
        reporting = np.flatnonzero(report.trained & ~report.diverged)
        values = report.metrics[self.ctx.objective.metric]
        report_epoch(
            self.study,
            [(self.asked[i].trial, float(values[i]), int(report.epochs[i])) for i in reporting],
        )
        decisions = self.pruner.decide([self.asked[i].trial for i in reporting])
        for i, prune in zip(reporting, decisions, strict=True):
            self.pruned[i] = self.pruned[i] or prune
        if self.on_epoch is not None:
            self.on_epoch([a.trial for i, a in enumerate(self.asked) if report.trained[i]])
        if self.should_stop is not None and (reason := self.should_stop()):
            self.stop_reason = reason
            return np.ones(len(self.asked), bool)
        return np.asarray(self.pruned)

    def ended(self, ended: list[EndedTrial]) -> None:
        """Tell the trials that left their slots in a round, each outcome recorded as it is
        told; keep the weights of the best complete trial so far."""
        metric = self.ctx.objective.metric
        leaving = [
            (
                self.asked[e.trial],
                e.result,
                _fate(e.result, self.pruned[e.trial], self.stop_reason, metric),
                e.variables,
            )
            for e in ended
        ]
        told = _tell(self.study, leaving, self.stage, self.stop_reason, metric, self.on_trial)
        for position, outcome in told:
            self._hold(ended[position].trial, outcome)

    def _hold(self, index: int, outcome: TrialOutcome) -> None:
        """Record the trial's outcome; keep its weights only if it is the best so far."""
        if outcome.value is not None and self.kept is not None:
            held = self.outcomes[self.kept]
            assert held.value is not None, "only complete trials are kept"
            better = max if self.maximize else min
            if better(held.value, outcome.value) == held.value:  # a tie keeps the earlier
                outcome = replace(outcome, variables=None)
            else:
                self.outcomes[self.kept] = replace(held, variables=None)
        if outcome.variables is not None:
            self.kept = index
        self.outcomes[index] = outcome


def _tell(
    study: optuna.Study,
    ended: list[tuple[_Asked, TrialResult, str, Callable[[], dict]]],
    stage: int,
    stop_reason: str | None,
    metric: str,
    on_trial: Callable[[TrialOutcome], None] | None,
) -> Iterator[tuple[int, TrialOutcome]]:
    """Record trials that left their slots in one round, each with its fate and weights, and
    tell Optuna how they ended: complete and pruned ones in one transaction, then the failed
    ones. Yields (position in `ended`, outcome) as each is recorded."""
    finished, failed = [], []
    for asked, result, fate, _ in ended:
        attrs: dict[str, Any] = {"epochs": result.epochs}
        if fate == "diverged":
            attrs["diverged_epoch"] = result.epochs
        elif fate != "stopped":
            attrs |= {**result.best, "best_epoch": result.best_epoch}
        if fate in ("pruned", "complete"):
            state = TrialState.PRUNED if fate == "pruned" else TrialState.COMPLETE
            value = float(result.best[metric]) if fate == "complete" else None
            finished.append(Finished(asked.trial, state, value, attrs))
        else:
            failed.append((asked.trial, attrs))
    told = {f.trial._trial_id for f in finish_trials(study, finished)}
    for position, (asked, result, fate, variables) in enumerate(ended):
        trial, values = asked.trial, asked.params
        if fate == "pruned" or fate == "complete":
            if trial._trial_id not in told:  # the reaper failed it meanwhile: it runs again
                outcome = _outcome(trial, stage, TrialState.FAIL, None, values, on_trial, "stale")
            elif fate == "pruned":
                outcome = _outcome(trial, stage, TrialState.PRUNED, None, values, on_trial)
            else:
                value = float(result.best[metric])
                complete = TrialState.COMPLETE
                outcome = _outcome(trial, stage, complete, value, values, on_trial, None, variables)
            yield position, outcome
    if failed:
        set_user_attrs(study, failed)
    for position, (asked, result, fate, _) in enumerate(ended):
        trial, values = asked.trial, asked.params
        if fate == "diverged":
            message = "loss became NaN or infinite"
            yield position, _fail(study, trial, values, stage, "diverged", message, on_trial)
        elif fate == "stopped":
            message = f"stopped after {result.epochs} epochs: {stop_reason}"
            reason = stop_reason or "stopped"
            yield position, _fail(study, trial, values, stage, reason, message, on_trial)


def _fate(outcome: TrialResult, pruned: bool, stop_reason: str | None, metric: str) -> str:
    """How a trained trial ends: diverged (also when it would complete without a finite value
    of `metric`), stopped (by a stop reason), pruned or complete."""
    if outcome.status == "diverged":
        return "diverged"
    if stop_reason and outcome.status == "stopped" and not pruned:
        return "stopped"
    if pruned:
        return "pruned"
    value = outcome.best.get(metric)
    return "complete" if value is not None and not math.isnan(value) else "diverged"


#: How XLA, CUDA, cuBLAS and cuDNN word an allocation failure (compared in lower case).
OUT_OF_MEMORY_MARKERS = (
    "resource_exhausted",
    "out of memory",
    "cuda_error_out_of_memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "failed to allocate",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the accelerator (or host) running out of memory, in any wording."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(m in text for m in OUT_OF_MEMORY_MARKERS)


def give_back(study: optuna.Study, trials: Sequence[Trial], reason: str, message: str) -> None:
    """Fail those of `trials` still running with `reason` (enqueued again when it is a retried
    reason); trials that finish meanwhile, on another thread, are left as they are."""
    for trial in trials:
        if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            continue
        try:
            _fail(study, trial, {}, 0, reason, message, None)
        except (RuntimeError, ValueError):  # told in between
            continue


def _fail(study, trial, values, stage, reason, message, on_trial) -> TrialOutcome:
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("message", message[:1000])
    study.tell(trial, state=TrialState.FAIL)
    if reason in RETRIED_REASONS:
        retry_trial(study, study._storage.get_trial(trial._trial_id))
    return _outcome(trial, stage, TrialState.FAIL, None, values, on_trial, reason)


def _outcome(
    trial, stage, state, value, values, on_trial, reason=None, variables=None
) -> TrialOutcome:
    maximize = trial.study.direction == StudyDirection.MAXIMIZE
    direction: Direction = "maximize" if maximize else "minimize"
    epochs = int(trial.user_attrs.get("epochs", 0))  # cached with the trial when recorded
    outcome = TrialOutcome(
        trial.number, stage, state, value, values, reason, direction, epochs, variables
    )
    if on_trial is not None:
        on_trial(outcome)
    return outcome
