"""Coarse to fine: narrow the search space around the best trials of the previous stage.

Each numeric range is narrowed on the scale it is sampled on (log10 of the value for log, log10
of 1 - β for one_minus_log), so the zoom follows what the sampler sees. These are pure functions
of spec params and engine hyperparameter dicts; no Optuna storage is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from caviar.search.spec import CategoricalParam, Direction, FloatParam, IntParam, Param, is_active

_AXES: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "linear": (float, float),
    "log": (math.log10, lambda y: 10.0**y),
    "one_minus_log": (lambda beta: math.log10(1 - beta), lambda y: 1 - 10.0**y),
}
"""Per scale: (value -> position on the sampling axis, position -> value)."""

_POINT_PAD = 1e-3
"""Widening of a single-point envelope when the margin is 0, as a fraction of the range."""


def refine_space(
    space: Mapping[str, Param],
    top: Sequence[Mapping[str, Any]],
    *,
    margin: float,
    original: Mapping[str, Param],
) -> dict[str, Param]:
    """Narrow ``space`` around ``top``, the engine hyperparameters of the best trials.

    A numeric range becomes the envelope of the top values on its sampling axis, widened on each
    side by ``margin`` times the current range's width there and clipped to the ``original``
    range (int ranges round outward). A categorical keeps the choices the top trials took. A param
    that no top trial used (a conditional one) keeps its current range.
    """
    return {
        name: _refine(param, _used_values(name, top), margin, original[name])
        for name, param in space.items()
    }


def _used_values(name: str, top: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Values of ``name`` in the trials that used it (a conditional param may be inactive)."""
    return [trial[name] for trial in top if name in trial and is_active(name, trial)]


def _refine(param: Param, values: list[Any], margin: float, original: Param) -> Param:
    if not values:
        return param
    if isinstance(param, CategoricalParam):
        kept = [choice for choice in param.choices if choice in values]
        return CategoricalParam(choices=kept) if kept else param
    assert isinstance(original, FloatParam | IntParam)
    return _narrow(param, values, margin, original)


def _narrow(
    param: FloatParam | IntParam,
    values: list[float],
    margin: float,
    original: FloatParam | IntParam,
) -> FloatParam | IntParam:
    to_axis, from_axis = _AXES[param.scale]
    low, high = _axis_interval(param, [to_axis(value) for value in values], margin, original)
    new_low, new_high = sorted((from_axis(low), from_axis(high)))
    new_low, new_high = max(new_low, original.low), min(new_high, original.high)
    if isinstance(param, IntParam):
        new_low, new_high = _outward_ints(new_low, new_high, original.high)
    if new_low >= new_high:  # a float range too narrow to represent: keep the current one
        return param
    return type(param).model_validate({**param.model_dump(), "low": new_low, "high": new_high})


def _axis_interval(
    param: FloatParam | IntParam,
    points: list[float],
    margin: float,
    original: FloatParam | IntParam,
) -> tuple[float, float]:
    """The envelope of ``points`` widened by the margin and clipped, on the sampling axis."""
    to_axis = _AXES[param.scale][0]
    current_low, current_high = sorted((to_axis(param.low), to_axis(param.high)))
    bound_low, bound_high = sorted((to_axis(original.low), to_axis(original.high)))
    width = current_high - current_low
    pad = margin * width
    if pad == 0 and min(points) == max(points) and isinstance(param, FloatParam):
        pad = _POINT_PAD * width  # (an int range is kept non-empty by _outward_ints)
    return max(min(points) - pad, bound_low), min(max(points) + pad, bound_high)


def _outward_ints(low: float, high: float, ceiling: float) -> tuple[int, int]:
    """``[low, high]`` rounded outward to ints, at least one apart, the high one <= ``ceiling``."""
    int_low, int_high = math.floor(round(low, 9)), math.ceil(round(high, 9))
    if int_low < int_high:
        return int_low, int_high
    return (int_low, int_low + 1) if int_low < ceiling else (int_high - 1, int_high)


def describe_ranges(space: Mapping[str, Param]) -> dict[str, Any]:
    """JSON-able ranges, e.g. ``{"learning_rate": {"low", "high", "scale", "type"}}``.

    Categorical params give ``{"choices": [...]}``; each entry is also a valid spec param.
    """
    return {name: param.model_dump(mode="json") for name, param in space.items()}


def top_fraction(
    trials: Sequence[tuple[float, dict[str, Any]]], keep_top: float, direction: Direction
) -> list[dict[str, Any]]:
    """The params of the best ``ceil(keep_top * n)`` (at least one) of ``(value, params)`` trials.

    Trials whose value is NaN are left out.
    """
    ranked = sorted(
        (trial for trial in trials if not math.isnan(trial[0])),
        key=lambda trial: trial[0],
        reverse=direction == "maximize",
    )
    count = max(1, math.ceil(keep_top * len(ranked) - 1e-9))
    return [params for _, params in ranked[:count]]
