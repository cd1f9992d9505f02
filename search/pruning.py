"""Optuna's pruning decisions for rounds of trials, reading the study only when a decision needs it.

`Trial.should_prune()` reads the trial's attributes back from the database, and Optuna's
successive-halving and percentile (median) pruners then read every trial of the study: with
many trials ending after an epoch or two, those reads cost as much as training them.
`RoundPruner.decide` asks the study's own pruner about each trial that reported this round, in
order, as `should_prune` would, but the trial comes from what this process already knows of it
(its reports, and the rungs the pruner recorded for it here), and the study's trials are read at
most once a round, when a decision first needs them (a trial reaching a rung). What the pruner
writes goes into that reading from the next decision on, as each later `should_prune` would see
it, and to the database at the end of the round, in one transaction. Successive halving
compares a trial only with the rungs other trials recorded, so its reading is those attributes
alone. The decisions stay Optuna's; only the reads and writes are shared.
Other pruners (Hyperband wraps the study in a study of its own) go through `should_prune`.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Sequence
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from caviar.db.storage import TrialAttrs, set_system_attrs, system_attrs_with_prefix

__all__ = ["RoundPruner"]

#: The pruners whose `prune` only reads `study.get_trials`, `study.direction` and writes
#: through `study._storage.set_trial_system_attr`: what `_RoundStudy` serves.
_ROUND_PRUNERS = (
    optuna.pruners.SuccessiveHalvingPruner,
    optuna.pruners.PercentilePruner,
    optuna.pruners.NopPruner,
)
#: The system attributes in which `SuccessiveHalvingPruner` records a trial's rungs.
_RUNG_PREFIX = "completed_rung_"


class RoundPruner:
    """The pruning decisions of one group of trials of `study`, round after round."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        #: Trial id → what the pruner recorded for it here (its completed rungs).
        self.recorded: dict[int, dict[str, Any]] = {}

    def decide(self, trials: Sequence[Trial]) -> list[bool]:
        """Whether each of `trials` (running trials that reported this round) should be pruned,
        decided by the study's pruner as `trial.should_prune()` would, one after another."""
        if not isinstance(self.study.pruner, _ROUND_PRUNERS):
            return [trial.should_prune() for trial in trials]
        view = _RoundStudy(self.study, self.recorded, trials)
        as_study = cast(optuna.Study, view)
        decisions = [self.study.pruner.prune(as_study, view.trial(trial)) for trial in trials]
        view.settle()
        view.write()
        return decisions


class _RoundStudy:
    """The study as its pruner sees it during one round: its trials read once, on demand, and
    the pruner's writes applied to that reading as well as to the database."""

    def __init__(
        self, study: optuna.Study, recorded: dict[int, dict[str, Any]], trials: Sequence[Trial]
    ) -> None:
        self._study, self._recorded = study, recorded
        self._deciding = {trial._trial_id: trial for trial in trials}
        self._trials: dict[int, FrozenTrial | TrialAttrs] | None = None
        self._written: list[tuple[int, str, Any]] = []  # shown from the next decision on
        self._unsaved: dict[int, dict[str, Any]] = {}  # written at the end of the round
        self._storage = self  # the pruner writes rung values through `study._storage`
        self.direction = study.direction

    def trial(self, trial: Trial) -> FrozenTrial:
        """The trial as its decision starts: its reports, and what earlier decisions wrote."""
        self.settle()
        known = trial._cached_frozen_trial
        latest = copy.copy(known)
        latest.system_attrs = {**known.system_attrs, **self._recorded.get(trial._trial_id, {})}
        return latest

    def settle(self) -> None:
        """Show what the last decision wrote, to the decisions after it."""
        for trial_id, key, value in self._written:
            self._recorded.setdefault(trial_id, {})[key] = value
            if self._trials is not None:
                self._trials[trial_id].system_attrs[key] = value
        self._written.clear()

    def write(self) -> None:
        """Write what this round's decisions recorded to the database, in one transaction."""
        if self._unsaved:
            attrs = [
                (self._deciding[trial_id], values) for trial_id, values in self._unsaved.items()
            ]
            set_system_attrs(self._study, attrs)

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if self._trials is None:
            self._trials = self._read()
        trials = [t for t in self._trials.values() if states is None or t.state in states]
        return cast(list[FrozenTrial], trials)

    def _read(self) -> dict[int, FrozenTrial | TrialAttrs]:
        pruner = self._study.pruner
        # Without a minimum resource, successive halving estimates one from complete trials'
        # reports: then it needs them whole.
        if isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and pruner._min_resource:
            return dict(system_attrs_with_prefix(self._study, _RUNG_PREFIX))
        return {t._trial_id: t for t in self._study.get_trials(deepcopy=False)}

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Hold the write for the end of the round; the reading shows it to the next decision
        only, as a decision's own reading of the study (taken before it writes) would not."""
        self._unsaved.setdefault(trial_id, {})[key] = value
        self._written.append((trial_id, key, value))
