"""Spec parameters as Optuna distributions, and trials back to engine hyperparameters.

A ``one_minus_log`` parameter such as momentum is handed to Optuna as ``one_minus_momentum``,
sampled log-uniformly: β in [0.9, 0.999] is searched as 1 - β in [1e-3, 1e-1]. The β itself is
stored as a user attribute of the trial, so the dashboard shows both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import BaseTrial, FrozenTrial

from caviar.search.spec import (
    APPLIES_TO,
    DEFAULTS,
    PARENT,
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    is_active,
)

__all__ = ["APPLIES_TO", "distribution", "engine_params", "optuna_name", "sample_trial"]


def _is_one_minus(param: Param) -> bool:
    return isinstance(param, FloatParam) and param.scale == "one_minus_log"


def optuna_name(name: str, param: Param) -> str:
    """The Optuna parameter name: ``one_minus_NAME`` for one_minus_log params, else ``name``."""
    return f"one_minus_{name}" if _is_one_minus(param) else name


def distribution(param: Param) -> BaseDistribution:
    """The Optuna distribution ``param`` is sampled from (of 1 - value for one_minus_log)."""
    if isinstance(param, CategoricalParam):
        return CategoricalDistribution(param.choices)
    if isinstance(param, IntParam):
        return IntDistribution(param.low, param.high, log=param.scale == "log")
    if param.scale == "one_minus_log":
        return FloatDistribution(1 - param.high, 1 - param.low, log=True)
    return FloatDistribution(param.low, param.high, log=param.scale == "log")


def _suggest(trial: BaseTrial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def _engine_value(param: Param, sampled: Any) -> Any:
    """The engine's value for an Optuna sample: β = 1 - sampled for one_minus_log params."""
    return 1 - sampled if _is_one_minus(param) else sampled


def _sampling_order(space: Mapping[str, Param]) -> list[str]:
    """Space names with the parents of conditional params (optimizer, lr_decay) first."""
    parents = set(PARENT.values())
    return sorted(space, key=lambda name: name not in parents)


def sample_trial(
    trial: BaseTrial, space: Mapping[str, Param], fixed: Mapping[str, Any]
) -> dict[str, Any]:
    """Sample ``space`` on ``trial``; return the full engine hyperparameters of the trial.

    Conditional params that the chosen (or fixed, or default) optimizer/lr_decay does not use are
    not sampled. The result is DEFAULTS overlaid with ``fixed`` and the sampled values, β for a
    one_minus_log param (also set as the trial's user attribute NAME).
    """
    values = {**DEFAULTS, **fixed}
    for name in _sampling_order(space):
        if not is_active(name, values):
            continue
        param = space[name]
        sampled = _suggest(trial, optuna_name(name, param), distribution(param))
        values[name] = _engine_value(param, sampled)
        if _is_one_minus(param):
            trial.set_user_attr(name, values[name])
    return values


def engine_params(
    trial: FrozenTrial, space: Mapping[str, Param], fixed: Mapping[str, Any]
) -> dict[str, Any]:
    """The full engine hyperparameters of a finished trial, as :func:`sample_trial` returned."""
    values = {**DEFAULTS, **fixed}
    for name, param in space.items():
        key = optuna_name(name, param)
        if key in trial.params:
            values[name] = _engine_value(param, trial.params[key])
    return values
