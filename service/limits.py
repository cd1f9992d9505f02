"""Limits on what one search may ask for, checked at submit (each one configurable)."""

from __future__ import annotations

from typing import Any

from models.mlp import count_parameters
from search.spec import DEFAULTS, CategoricalParam, SearchSpec
from service.settings import Settings

#: Input and output sizes of the built-in datasets (for the parameter-count limit).
_BUILTIN_SIZES = {"mnist1d": (40, 10), "digits": (64, 10)}


def spec_limit_errors(
    spec: SearchSpec, settings: Settings, input_output: tuple[int, int] | None = None
) -> list[dict[str, Any]]:
    """Every limit the spec exceeds, as pydantic-style errors naming the field."""
    errors = []

    def check(loc: tuple, value: float, limit: int, what: str) -> None:
        if value > limit:
            errors.append(
                {
                    "loc": list(loc),
                    "msg": f"{what} {value:g} exceeds the limit {limit}",
                    "type": "limit",
                }
            )

    check(("budget", "trials"), spec.budget.trials, settings.max_trials, "trials")
    check(("budget", "epochs"), spec.budget.epochs, settings.max_epochs, "epochs")
    layers_loc, layers = _largest(spec, "hidden_layers")
    units_loc, units = _largest(spec, "hidden_units")
    check(layers_loc, layers, settings.max_hidden_layers, "hidden_layers")
    check(units_loc, units, settings.max_hidden_units, "hidden_units")
    inputs, outputs = input_output or _sizes(spec)
    parameters = count_parameters(inputs, (int(units),) * int(layers), outputs)
    if parameters > settings.max_parameters:
        errors.append(
            {
                "loc": ["space"],
                "type": "limit",
                "msg": f"the largest model has {parameters:,} parameters, over the limit "
                f"{settings.max_parameters:,}",
            }
        )
    return errors


def _largest(spec: SearchSpec, name: str) -> tuple[tuple, float]:
    if name in spec.space:
        param = spec.space[name]
        if isinstance(param, CategoricalParam):
            return ("space", name, "choices"), max(float(c) for c in param.choices)
        return ("space", name, "high"), float(param.high)
    return ("fixed", name), float(spec.fixed.get(name, DEFAULTS[name]))


def _sizes(spec: SearchSpec) -> tuple[int, int]:
    ref = spec.dataset
    if ref.name in _BUILTIN_SIZES:
        return _BUILTIN_SIZES[ref.name]
    if ref.name == "synthetic":
        return ref.features or 20, ref.classes or 2
    return 1, 1  # unknown until loaded: count the hidden layers alone
