"""Optuna studies of a search: one per coarse-to-fine stage, with the spec's sampler and pruner.

A search `<search-id>` owns the studies `caviar/<search-id>/stage-<n>` (n from 1). Each stage is
its own study because Optuna's relative samplers drop a parameter whose distribution changes
inside one study. A stage study carries, as user attributes, the search id, its stage number,
the ranges it samples (after refinement) and the spec, so the dashboard and any process can
rebuild what the stage searches from the database alone.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from caviar.search.refine import describe_ranges
from caviar.search.spec import (
    CategoricalParam,
    Direction,
    FloatParam,
    IntParam,
    Param,
    SearchSpec,
    SpecError,
)

STUDY_PREFIX = "caviar"

#: Reasons (trial user attribute `reason`) of failures caused by the trial itself; they count
#: toward the budget. Any other failed trial (a worker died, was preempted) is retried.
FINAL_FAILURES = frozenset({"diverged", "error"})


def study_name(search_id: str, stage: int) -> str:
    """The Optuna study name of `stage` (1-based) of a search."""
    return f"{STUDY_PREFIX}/{search_id}/stage-{stage}"


def sampler_seed(spec_seed: int, stage: int, offset: int = 0) -> int:
    """The seed of a stage's sampler for trials asked once the stage holds `offset` trials,
    derived from the spec seed.

    Reduced modulo 2**32: Optuna's samplers seed NumPy, which takes 32-bit seeds only.
    """
    return (spec_seed * 1_000_003 + stage * 7_919 + offset) % 2**32


def make_sampler(spec: SearchSpec, stage: int, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler for trials asked once the stage holds `offset` trials, seeded from the
    spec seed, the stage and `offset`: the same trials whichever process asks for them.

    Sobol points keep one scramble per stage: the study counts the points drawn, so each new
    sampler goes on with the same sequence.
    """
    seed = sampler_seed(spec.seed, stage, 0 if spec.sampler == "qmc" else offset)
    match spec.sampler:
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "tpe":
            # constant_liar: trials asked in one batch do not all crowd the same point.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        case "qmc":
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        case "gp":
            try:
                import torch  # noqa: F401  (GPSampler needs it)
            except ImportError:
                message = "the gp sampler needs PyTorch: pip install 'caviar[gp]'"
                raise SpecError([{"loc": ["sampler"], "msg": message}]) from None
            return optuna.samplers.GPSampler(seed=seed)
    raise SpecError([{"loc": ["sampler"], "msg": f"unknown sampler {spec.sampler!r}"}])


def make_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    """Per-epoch early stopping on the dev metric, as the spec asks."""
    pruner = spec.pruner
    match pruner.name:
        case "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=5, n_warmup_steps=pruner.warmup_epochs
            )
        case "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=max(1, pruner.warmup_epochs),
                max_resource=spec.budget.epochs,
                reduction_factor=pruner.reduction_factor,
            )
        case "asha":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=pruner.min_epochs, reduction_factor=pruner.reduction_factor
            )
    return optuna.pruners.NopPruner()


def expected_epochs(spec: SearchSpec) -> float:
    """Epochs a trial trains on average: `budget.epochs`, or under asynchronous successive
    halving what its rungs leave (all trials train to the first, 1/reduction_factor of them on
    to each next one, up to `budget.epochs`); the planner weighs padding against compiles by it."""
    epochs, pruner = spec.budget.epochs, spec.pruner
    if pruner.name != "asha":
        return float(epochs)
    expected, start, share, rung = 0.0, 0, 1.0, pruner.min_epochs
    while start < epochs:
        end = min(rung, epochs)
        expected += share * (end - start)
        start, share, rung = end, share / pruner.reduction_factor, rung * pruner.reduction_factor
    return expected


def create_stage_study(
    storage: optuna.storages.BaseStorage,
    spec: SearchSpec,
    search_id: str,
    stage: int,
    space: dict[str, Param],
    direction: Direction,
    metric: str,
) -> optuna.Study:
    """Create the study of `stage` (or load it if another process already did)."""
    study = optuna.create_study(
        storage=storage,
        study_name=study_name(search_id, stage),
        direction=direction,
        load_if_exists=True,
    )
    with warnings.catch_warnings():  # experimental in Optuna, stable in use since 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])  # the dashboard says dev_accuracy, not "Objective 0"
    study.set_user_attr("search_id", search_id)
    study.set_user_attr("stage", stage)
    study.set_user_attr("ranges", describe_ranges(space))
    study.set_user_attr("spec", spec.model_dump(mode="json", exclude_none=True))
    return study


def load_stage_study(
    storage: optuna.storages.BaseStorage, spec: SearchSpec, search_id: str, stage: int
) -> optuna.Study:
    """An existing stage study with the spec's sampler (for its first trials) and pruner."""
    return optuna.load_study(
        study_name=study_name(search_id, stage),
        storage=storage,
        sampler=make_sampler(spec, stage),
        pruner=make_pruner(spec),
    )


def stage_space(study: optuna.Study) -> dict[str, Param]:
    """The search space a stage study samples, rebuilt from its `ranges` user attribute."""
    space: dict[str, Param] = {}
    for name, described in study.user_attrs["ranges"].items():
        if "choices" in described:
            space[name] = CategoricalParam(choices=described["choices"])
        elif described.get("type") == "int":
            space[name] = IntParam(**described)
        else:
            space[name] = FloatParam(**described)
    return space


def complete_value(trial: FrozenTrial) -> float:
    """The objective value of a complete trial (Optuna types it optional for the others)."""
    assert trial.value is not None, f"trial {trial.number} is not complete"
    return trial.value


def ends_in_budget(state: TrialState, reason: str | None) -> bool:
    """Whether a trial that ended in `state` (failed for `reason`) counts toward the budget."""
    if state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return state == TrialState.FAIL and reason in FINAL_FAILURES


def ask(study: optuna.Study) -> optuna.trial.Trial:
    """`study.ask()`, without Optuna's warning that heartbeats are meant for `Study.optimize`:
    with ask/tell the worker writes them itself (`search.heartbeat`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()
