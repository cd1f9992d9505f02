"""The search spec: what to tune, on which data, with how much compute.

A spec is a YAML (or JSON) document validated by :class:`SearchSpec`. Every problem is reported
with the path of the offending field (e.g. ``space.momentum``) and the reason, so that the user
who wrote the spec can fix it; :func:`parse_spec` turns them into one :class:`SpecError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, Self, TypedDict

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from caviar.models.bucket import SHAPE_DEFAULTS
from caviar.models.data import SYNTHETIC_FEATURES, Task, max_synthetic_classes
from caviar.models.errors import CaviarError
from caviar.models.mlp import ACTIVATIONS, INITS
from caviar.models.optim import (
    FIRST_MOMENT_FAMILIES,
    LR_DECAYS,
    OPTIMIZERS,
    RATED_DECAYS,
    SECOND_MOMENT_FAMILIES,
)
from caviar.models.train import HPARAM_DEFAULTS

Direction = Literal["maximize", "minimize"]
Metric = Literal["dev_accuracy", "dev_loss", "dev_mse", "dev_r2"]
Scale = Literal["linear", "log", "one_minus_log"]
SamplerName = Literal["random", "tpe", "qmc", "gp", "cmaes"]
Choice = bool | int | float | str

MAX_SEED = 2**32 - 1
"""Largest spec seed: NumPy, scikit-learn and mnist1d take 32-bit seeds."""


# --- engine hyperparameters -------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """The values one engine hyperparameter accepts: a set of choices or a numeric interval."""

    choices: tuple[Choice, ...] = ()
    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is valid for this hyperparameter."""
        if self.choices:
            return any(type(value) is type(c) and value == c for c in self.choices)
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """What the values must be, e.g. ``a number in (0, 1)`` or ``one of "relu", "tanh"``."""
        if self.choices:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"

    def problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not valid for hyperparameter ``name``, or None when it is."""
        return None if self.accepts(value) else f"{name} must be {self.describe()}, got {value!r}"


_POSITIVE = Domain(low=0, low_open=True)
_OPEN_UNIT = Domain(low=0, high=1, low_open=True, high_open=True)
_COUNT = Domain(integer=True, low=1)
DOMAINS: dict[str, Domain] = {
    "learning_rate": _POSITIVE,
    "momentum": _OPEN_UNIT,
    "beta2": _OPEN_UNIT,
    "epsilon": _POSITIVE,
    "l2": Domain(low=0),
    "dropout": Domain(low=0, high=1, high_open=True),
    "decay_rate": Domain(low=0),
    "hidden_layers": _COUNT,
    "hidden_units": _COUNT,
    "batch_size": _COUNT,
    "optimizer": Domain(choices=OPTIMIZERS),
    "activation": Domain(choices=tuple(ACTIVATIONS)),
    "init": Domain(choices=INITS),
    "batch_norm": Domain(choices=(True, False)),
    "lr_decay": Domain(choices=LR_DECAYS),
}
"""Every engine hyperparameter a spec may search or fix, with its valid values."""

DEFAULTS: dict[str, Any] = {
    **{name: value for name, value in HPARAM_DEFAULTS.items() if name != "seed"},
    **SHAPE_DEFAULTS,
}
"""Value of each engine hyperparameter that is neither searched nor fixed."""

APPLIES_TO: dict[str, frozenset[str]] = {
    "momentum": FIRST_MOMENT_FAMILIES,
    "beta2": SECOND_MOMENT_FAMILIES,
    "epsilon": SECOND_MOMENT_FAMILIES,
    "decay_rate": RATED_DECAYS,
}
"""Conditional hyperparameters: the values of their :data:`PARENT` under which they are used."""

PARENT: dict[str, str] = {
    "momentum": "optimizer",
    "beta2": "optimizer",
    "epsilon": "optimizer",
    "decay_rate": "lr_decay",
}
"""The categorical hyperparameter each conditional one depends on."""


def is_active(name: str, values: Mapping[str, Any]) -> bool:
    """Whether hyperparameter ``name`` is used given the (possibly partial) ``values``."""
    parent = PARENT.get(name)
    return parent is None or values.get(parent, DEFAULTS[parent]) in APPLIES_TO[name]


# --- spec models ------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


MAX_NAME_LENGTH = 200
"""Most characters of a search's name (the database's name columns hold this many)."""

MAX_SPEC_DEPTH = 32
"""Deepest nesting of mappings and lists a spec document may have."""

MAX_SPEC_NODES = 10_000
"""Most values (mappings, lists and scalars, aliases expanded) a spec document may hold."""


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text (a NUL character, a lone surrogate), or None."""
    if "\0" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    return None


def _document_issues(data: Any) -> Iterator[InitErrorDetails]:
    """Problems of a raw spec document found before validation, at their path: nesting deeper
    than MAX_SPEC_DEPTH, more than MAX_SPEC_NODES values, unstorable text, non-finite numbers.

    The walk is iterative and stops at the node limit, so an alias bomb's shared lists are never
    expanded.
    """
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    nodes = 0
    while pending:
        loc, value = pending.pop()
        nodes += 1
        if nodes > MAX_SPEC_NODES:
            message = f"the spec holds more than {MAX_SPEC_NODES} values"
            yield _issue((), message, None)
            return
        if isinstance(value, Mapping | list) and len(loc) >= MAX_SPEC_DEPTH:
            yield _issue(loc, f"nested deeper than {MAX_SPEC_DEPTH} levels", None)
            continue
        if isinstance(value, Mapping):
            for key, item in value.items():
                name = printable(key if isinstance(key, str) else str(key))
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    yield _issue((*loc, name), f"key {problem}", None)
                pending.append(((*loc, name), item))
        elif isinstance(value, list):
            pending.extend(((*loc, i), item) for i, item in enumerate(value))
        elif isinstance(value, str) and text_problem(value):
            yield _issue(loc, f"text {text_problem(value)}", printable(value))
        elif isinstance(value, float) and not math.isfinite(value):
            yield _issue(loc, "must be a finite number", str(value))


def printable(value: str) -> str:
    """``value`` with lone surrogates escaped, so that it can be encoded in an error."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_spec", message)


def _issue(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=_invalid(message), loc=loc, input=value)


_SOURCE_OPTIONS: dict[str, set[str]] = {
    "digits": set(),
    "mnist1d": {"samples"},
    "synthetic": {"samples", "features", "classes", "noise", "task"},
    "path": {"target", "task"},
    "id": {"task"},
}


class DatasetRef(_Model):
    """The data to tune on: a built-in dataset (``name``), a file (``path``) or an upload (``id``).

    Exactly one of ``name``, ``path`` and ``id``; the other fields only apply to some sources.
    """

    name: Literal["mnist1d", "digits", "synthetic"] | None = Field(
        None, description="Built-in dataset."
    )
    path: str | None = Field(None, description="A .csv or .npz file on the server.")
    target: str | None = Field(None, description="Target column of a .csv file.")
    id: str | None = Field(None, description="Id of an uploaded dataset.")
    samples: int | None = Field(None, ge=1, description="Examples to make (mnist1d, synthetic).")
    features: int | None = Field(None, ge=1, description="Features to generate (synthetic).")
    classes: int | None = Field(None, ge=2, description="Classes to generate (synthetic).")
    noise: float | None = Field(None, ge=0, description="Label/target noise (synthetic).")
    task: Task | None = Field(
        None, description="Task of a synthetic or file dataset (None: the default or inferred)."
    )

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        sources = [key for key in ("name", "path", "id") if getattr(self, key) is not None]
        if len(sources) != 1:
            raise _invalid("give exactly one of 'name', 'path' or 'id'")
        source = self.name or sources[0]
        issues = [
            _issue((key,), f"'{key}' does not apply to dataset source {source!r}", value)
            for key, value in self
            if value is not None and key not in {sources[0], *_SOURCE_OPTIONS[source]}
        ]
        features = self.features or SYNTHETIC_FEATURES
        if self.name == "synthetic" and self.classes is not None:
            most = max_synthetic_classes(features)
            if self.classes > most:
                message = f"at most {most} classes can be made from {features} features"
                issues.append(_issue(("classes",), message, self.classes))
        if issues:
            raise ValidationError.from_exception_data(type(self).__name__, issues)
        return self


@dataclass(frozen=True)
class _MetricInfo:
    direction: Direction
    tasks: frozenset[str]


METRICS: dict[str, _MetricInfo] = {
    "dev_accuracy": _MetricInfo("maximize", frozenset({"classification"})),
    "dev_loss": _MetricInfo("minimize", frozenset({"classification", "regression"})),
    "dev_mse": _MetricInfo("minimize", frozenset({"regression"})),
    "dev_r2": _MetricInfo("maximize", frozenset({"regression"})),
}
_DEFAULT_METRIC: dict[str, Metric] = {"classification": "dev_accuracy", "regression": "dev_mse"}


def _metric_problem(metric: str, task: Task | None) -> str | None:
    if task is None or task in METRICS[metric].tasks:
        return None
    return f"{metric} does not fit a {task} task"


class Objective(_Model):
    """The dev-set metric trials are ranked by."""

    metric: Metric = Field(description="Metric measured on the dev split.")
    direction: Direction | None = Field(
        None,
        validate_default=True,
        description="maximize or minimize; defaults to (and must match) the metric's direction.",
    )

    @field_validator("direction")
    @classmethod
    def _metric_direction(
        cls, direction: Direction | None, info: ValidationInfo
    ) -> Direction | None:
        metric = info.data.get("metric")
        if metric is None:  # the metric itself is invalid and already reported
            return direction
        natural = METRICS[metric].direction
        if direction not in (None, natural):
            raise _invalid(f"{metric} must be {natural}d, not {direction}d")
        return natural

    @property
    def resolved_direction(self) -> Direction:
        """The direction, which validation always sets (None only in the schema's default)."""
        return self.direction or METRICS[self.metric].direction


def _trials_optional(schema: dict[str, Any]) -> None:
    schema["required"].remove("trials")


class Budget(_Model):
    """How much compute the whole search may use."""

    # `trials` may be left out of a spec whose stages give theirs (see `_budget_from_stages`).
    model_config = ConfigDict(json_schema_extra=_trials_optional)

    trials: int = Field(
        ge=1,
        description="Trials over all stages; may be omitted when `stages` give their trials "
        "(it is then their sum) or when `trial_epochs` is given (it is then at most one trial "
        "per trial-epoch: the trial-epochs decide).",
    )
    epochs: int = Field(ge=1, description="Most epochs a trial trains for.")
    trial_epochs: int | None = Field(
        None,
        ge=1,
        description="Most epochs summed over all trials (one stage only). With pruning the "
        "number of trials is then the outcome: a trial starts while `epochs` more still fit, "
        "counting each running trial at `epochs`, so the search ends having recorded between "
        "trial_epochs - epochs + 1 and trial_epochs of them (trials run again after a "
        "preemption are not counted twice).",
    )
    timeout_s: float | None = Field(None, gt=0, description="Wall-clock limit of the search.")


class PrunerSpec(_Model):
    """Early stopping of unpromising trials, compared with the others at the same epoch."""

    name: Literal["none", "median", "hyperband", "asha"] = Field(
        "none",
        description="Pruner: median (below the median of earlier trials at the same epoch), "
        "hyperband, or asha (asynchronous successive halving: Optuna's SuccessiveHalvingPruner).",
    )
    warmup_epochs: int = Field(
        2, ge=0, description="median, hyperband: epochs before a trial can be pruned."
    )
    min_epochs: int = Field(
        1, ge=1, description="asha: epochs every trial trains before its first rung."
    )
    reduction_factor: int = Field(
        3,
        ge=2,
        description="asha, hyperband: each rung keeps the top 1/reduction_factor of the trials "
        "that reached it, and sits reduction_factor times more epochs in.",
    )


class _RangeParam(_Model):
    low: float = Field(description="Lowest value.")
    high: float = Field(description="Highest value.")
    scale: Scale = Field(
        "linear",
        description="linear, log (uniform in log10), or one_minus_log (1 - value uniform in "
        "log10; for averaging betas such as momentum).",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        low, high, scale = self.low, self.high, self.scale
        if low >= high:
            raise _invalid(f"empty range: low ({low}) must be below high ({high})")
        if scale == "log" and low <= 0:
            raise _invalid(f"log scale needs low > 0, got {low}")
        if scale == "one_minus_log" and not (low > 0 and high < 1):
            raise _invalid(
                f"one_minus_log scale needs 0 < low < high < 1 (it samples 1 - value on a log "
                f"scale), got [{low}, {high}]"
            )
        return self


class FloatParam(_RangeParam):
    """A real-valued range, sampled uniformly on its scale."""

    type: Literal["float"] = Field("float", description="float.")


class IntParam(_RangeParam):
    """An integer range, sampled uniformly on its scale."""

    low: int = Field(description="Lowest value (an integer).")
    high: int = Field(description="Highest value (an integer).")
    scale: Literal["linear", "log"] = Field("linear", description="linear or log.")
    type: Literal["int"] = Field(description="int.")


class CategoricalParam(_Model):
    """A choice among listed values."""

    choices: list[Choice] = Field(min_length=1, description="The values to choose among.")

    @field_validator("choices")
    @classmethod
    def _unique(cls, choices: list[Choice]) -> list[Choice]:
        if len(set(choices)) != len(choices):
            raise _invalid("choices must be unique")
        return choices


Param = FloatParam | IntParam | CategoricalParam


def _parse_param(value: Any) -> Any:
    """Pick the param model from a mapping's keys: ``choices``, else ``type`` (default float)."""
    if not isinstance(value, Mapping):
        return value
    if "choices" in value:
        return CategoricalParam.model_validate(value)
    kind = value.get("type", "float")
    if kind == "int":
        return IntParam.model_validate(value)
    if kind == "float":
        return FloatParam.model_validate(value)
    raise _invalid(f"type must be 'float' or 'int', got {kind!r}")


class Stage(_Model):
    """One round of coarse-to-fine search."""

    trials: int = Field(ge=1, description="Trials in this stage.")
    # Defaults that really zoom in: the top quarter of a random stage is spread out, so
    # narrowing to it (plus 10%) left most ranges almost as wide as they were.
    keep_top: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Fraction of the previous stage's best trials whose region this stage "
        "zooms into (ignored on the first stage).",
    )
    margin: float = Field(
        0.05,
        ge=0,
        description="Widening of the zoomed range on each side, as a fraction of the width of "
        "the range it narrows.",
    )


class SearchSpec(_Model):
    """A hyperparameter search: data, objective, budget, search space and search strategy.

    Rules across fields, each reported at its field: a hyperparameter is searched (``space``)
    or fixed, not both, and takes the values of its domain (rates and betas in their intervals,
    counts as integers >= 1, the categorical ones from their choices); momentum needs an
    optimizer among momentum, adam and adamw, beta2 and epsilon one among rmsprop, adam and
    adamw, decay_rate an lr_decay among exponential, inverse_time and step; a range has
    low < high, a log scale low > 0, one_minus_log 0 < low < high < 1; the stages' trials sum to
    ``budget.trials``; the objective's metric fits the task. A document holds at most 10,000
    values nested at most 32 deep, and no NUL character, lone surrogate, NaN or infinity.
    """

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Name of the search (and of its Optuna study).",
    )
    dataset: DatasetRef = Field(description="The data to tune on.")
    task: Task | None = Field(None, description="classification or regression; None: inferred.")
    objective: Objective | None = Field(
        None,
        description="Metric to optimise; defaults to dev_accuracy (classification) or dev_mse "
        "(regression).",
    )
    budget: Budget = Field(description="Compute budget.")
    sampler: SamplerName = Field("random", description="Optuna sampler (qmc: Sobol).")
    pruner: PrunerSpec = Field(default_factory=PrunerSpec, description="Early stopping of trials.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the sampler and the data split.")
    space: dict[str, Annotated[Param, BeforeValidator(_parse_param)]] = Field(
        min_length=1,
        description=f"Hyperparameters to search, by engine name: {', '.join(DOMAINS)}.",
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="Hyperparameters set to one value, by engine name (as in space).",
    )
    stages: list[Stage] | None = Field(
        None,
        min_length=1,
        description="Coarse-to-fine stages; their trials sum to budget.trials (which they set "
        "when it is left out). None: one stage of budget.trials.",
    )
    final_fit: Literal["train", "train_dev"] = Field(
        "train",
        description="Data the best configuration is refit on before the single test evaluation.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_document(cls, data: Any) -> Any:
        issues = list(_document_issues(data))
        if issues:
            raise ValidationError.from_exception_data(cls.__name__, issues)
        return _budget_from_stages(data)

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        issues = [
            *_space_issues(self.space, self.fixed),
            *_fixed_issues(self.space, self.fixed),
            *self._stage_and_objective_issues(),
        ]
        if issues:
            raise ValidationError.from_exception_data(type(self).__name__, issues)
        return self

    def _stage_and_objective_issues(self) -> Iterator[InitErrorDetails]:
        if self.stages is not None:
            total = sum(stage.trials for stage in self.stages)
            if total != self.budget.trials:
                message = f"stage trials sum to {total} but budget.trials is {self.budget.trials}"
                yield _issue(("stages",), message, total)
        budget = self.budget
        if budget.trial_epochs is not None:
            if budget.trial_epochs < budget.epochs:
                message = (
                    f"{budget.trial_epochs} trial-epochs do not fit one trial of {budget.epochs}"
                )
                yield _issue(("budget", "trial_epochs"), message, budget.trial_epochs)
            if self.stages is not None and len(self.stages) > 1:
                message = "a trial-epoch budget takes one stage: give the stages' trials instead"
                yield _issue(("budget", "trial_epochs"), message, budget.trial_epochs)
        if self.task and self.dataset.task and self.task != self.dataset.task:
            message = f"task {self.task} conflicts with dataset.task {self.dataset.task}; give one"
            yield _issue(("task",), message, self.task)
        elif self.objective is not None:
            problem = _metric_problem(self.objective.metric, self.declared_task)
            if problem:
                yield _issue(("objective", "metric"), problem, self.objective.metric)

    @property
    def declared_task(self) -> Task | None:
        """The task the spec gives (``task`` or ``dataset.task``); None: inferred from the data."""
        return self.task or self.dataset.task

    def stage_plan(self) -> list[Stage]:
        """The stages to run: ``stages``, or one stage of ``budget.trials``."""
        return list(self.stages) if self.stages else [Stage(trials=self.budget.trials)]

    def resolved_objective(self, task: Task) -> Objective:
        """The objective for ``task`` (known once the dataset is loaded); SpecError if unfit."""
        if self.objective is None:
            return Objective(metric=_DEFAULT_METRIC[task])
        problem = _metric_problem(self.objective.metric, task)
        if problem:
            raise SpecError([{"loc": ["objective", "metric"], "msg": problem}])
        return self.objective


def _budget_from_stages(data: Any) -> Any:
    """The spec document with ``budget.trials`` set to the stages' sum where only they give it,
    or to ``budget.trial_epochs`` (every trial trains at least one epoch) where that is given.

    Left as it is when the stages' trial counts are not all whole numbers >= 1: their own errors
    (and a missing ``budget.trials``) are reported at their fields.
    """
    if not isinstance(data, Mapping):
        return data
    budget, stages = data.get("budget"), data.get("stages")
    if not isinstance(budget, Mapping) or budget.get("trials") is not None:
        return data
    epochs = budget.get("trial_epochs")
    if stages is None and isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
        return {**data, "budget": {**budget, "trials": epochs}}
    if not isinstance(stages, list) or not stages:
        return data
    counts = [stage.get("trials") if isinstance(stage, Mapping) else None for stage in stages]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        return data
    return {**data, "budget": {**budget, "trials": sum(counts)}}


def _space_issues(
    space: Mapping[str, Param], fixed: Mapping[str, Any]
) -> Iterator[InitErrorDetails]:
    for name, param in space.items():
        domain = DOMAINS.get(name)
        if domain is None:
            yield _issue(("space", name), _unknown(name), name)
            continue
        if isinstance(param, CategoricalParam):
            yield from _choice_issues(name, domain, param)
        else:
            yield from _range_issues(name, domain, param)
        unused = _never_used(name, space, fixed)
        if unused:
            yield _issue(("space", name), unused, name)


def _choice_issues(
    name: str, domain: Domain, param: CategoricalParam
) -> Iterator[InitErrorDetails]:
    for i, choice in enumerate(param.choices):
        problem = domain.problem(name, choice)
        if problem:
            yield _issue(("space", name, "choices", i), problem, choice)


def _range_issues(
    name: str, domain: Domain, param: FloatParam | IntParam
) -> Iterator[InitErrorDetails]:
    loc = ("space", name)
    if domain.choices:
        message = f"{name} takes one of a set of values, not a range: use choices: [...]"
        yield _issue(loc, message, param)
    elif domain.integer != isinstance(param, IntParam):
        message = f"{name} takes {'integers' if domain.integer else 'real numbers'}: set type: "
        yield _issue((*loc, "type"), message + ("int" if domain.integer else "float"), param.type)
    else:
        for bound in ("low", "high"):
            problem = domain.problem(name, getattr(param, bound))
            if problem:
                yield _issue((*loc, bound), problem, getattr(param, bound))


def _never_used(name: str, space: Mapping[str, Param], fixed: Mapping[str, Any]) -> str | None:
    """Why conditional ``name`` would never be sampled, or None when some trials use it."""
    parent = PARENT.get(name)
    if parent is None:
        return None
    searched = space.get(parent)
    if isinstance(searched, CategoricalParam):
        options = list(searched.choices)
    else:
        options = [fixed.get(parent, DEFAULTS[parent])]
    used_with = APPLIES_TO[name]
    if any(isinstance(option, str) and option in used_with for option in options):
        return None
    return (
        f"{name} is only used when {parent} is one of {', '.join(sorted(used_with))}, which "
        f"this spec never chooses; search or fix {parent} accordingly"
    )


def _fixed_issues(
    space: Mapping[str, Param], fixed: Mapping[str, Any]
) -> Iterator[InitErrorDetails]:
    for name, value in fixed.items():
        loc = ("fixed", name)
        domain = DOMAINS.get(name)
        if domain is None:
            yield _issue(loc, _unknown(name), name)
        elif name in space:
            yield _issue(loc, f"{name} is both searched (space) and fixed; keep one", value)
        else:
            problem = domain.problem(name, value)
            if problem:
                yield _issue(loc, problem, value)


def _unknown(name: str) -> str:
    return f"unknown hyperparameter {name!r}; known: {', '.join(DOMAINS)}"


# --- parsing ----------------------------------------------------------------------------------


class SpecIssue(TypedDict):
    """One problem in a spec: where (field path) and why."""

    loc: list[str | int]
    msg: str
    type: NotRequired[str]  # pydantic's error type, where the problem comes from a check of ours


class SpecError(CaviarError, ValueError):
    """An invalid search spec; ``errors`` lists every problem found, one line each in str()."""

    def __init__(self, errors: list[SpecIssue]) -> None:
        self.errors = errors
        super().__init__("\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))

    @classmethod
    def from_validation_error(cls, error: ValidationError) -> SpecError:
        """The SpecError listing a pydantic ValidationError's problems (root problems: ``spec``)."""
        return cls([{"loc": list(e["loc"]) or ["spec"], "msg": e["msg"]} for e in error.errors()])


MAX_SPEC_DOCUMENT_BYTES = 2**20
"""Largest spec document :func:`parse_spec` reads."""

MAX_YAML_ALIASES = 50
"""Most aliases (``*name``) a YAML spec may use."""


class _DuplicateKey(yaml.YAMLError):
    """A mapping of the YAML document gives one key twice."""

    def __init__(self, loc: list[str | int], mark: yaml.Mark) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: duplicate key")
        self.loc = loc
        self.line = mark.line + 1


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot, such as ``1e-4`` (YAML 1.2).

    While composing it refuses, before anything is constructed, nesting deeper than
    MAX_SPEC_DEPTH, more than MAX_YAML_ALIASES aliases, and a key given twice in one mapping.
    """

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._path: list[str | int] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases", mark
                )
        if self._depth >= MAX_SPEC_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels", mark
            )
        # A mapping's value is composed with its key node as `index`, a list item with its index.
        step = index.value if isinstance(index, yaml.ScalarNode) else index
        if step is not None:
            self._path.append(step)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if step is not None:
                self._path.pop()

    # types-PyYAML types `anchor` as a dict; PyYAML passes the anchor's name (or None).
    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:  # type: ignore[override]
        node = super().compose_mapping_node(anchor)  # type: ignore[arg-type]
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise _DuplicateKey([*self._path, key.value], key.start_mark)
                seen.add((key.tag, key.value))
        return node


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {key!r}")
        data[key] = value
    return data


def parse_spec(text: str | bytes, *, format: Literal["yaml", "json"] | None = None) -> SearchSpec:
    """Parse and validate a spec document; YAML (a superset of JSON) unless ``format`` says json.

    Raises SpecError: at ``spec`` for a syntax error, a document over the size, depth or alias
    caps, or one that is not a mapping; at the key for a duplicate key; else at the path of each
    invalid field.
    """
    if len(text) > MAX_SPEC_DOCUMENT_BYTES:
        message = f"the document is larger than {MAX_SPEC_DOCUMENT_BYTES} bytes"
        raise SpecError([{"loc": ["spec"], "msg": message}])
    try:
        if format == "json":
            data = json.loads(text, object_pairs_hook=_json_object)
        else:
            data = yaml.load(text, Loader=_YamlLoader)
    except _DuplicateKey as error:
        message = f"duplicate key (line {error.line}): give each key once"
        raise SpecError([{"loc": error.loc, "msg": message}]) from None
    except RecursionError:
        message = f"not valid {format or 'yaml'}: nested deeper than {MAX_SPEC_DEPTH} levels"
        raise SpecError([{"loc": ["spec"], "msg": message}]) from None
    except (yaml.YAMLError, ValueError) as error:
        message = f"not valid {format or 'yaml'}: {_syntax_problem(error)}"
        raise SpecError([{"loc": ["spec"], "msg": message}]) from None
    if not isinstance(data, dict):
        message = f"the spec must be a mapping of fields, got {type(data).__name__}"
        raise SpecError([{"loc": ["spec"], "msg": message}])
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError.from_validation_error(error) from None


def _syntax_problem(error: Exception) -> str:
    """One line saying what is wrong where, without YAML's multi-line source excerpt."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def load_spec(path: str | os.PathLike[str]) -> SearchSpec:
    """Read and validate the spec file at ``path`` (JSON if it ends in .json, else YAML)."""
    file = Path(path)
    with file.open("rb") as stream:  # past the cap parse_spec refuses it: read no further
        text = stream.read(MAX_SPEC_DOCUMENT_BYTES + 1)
    return parse_spec(text, format="json" if file.suffix == ".json" else "yaml")
