"""Limits on what one search may ask for, checked at submit (each one configurable)."""

from __future__ import annotations

from caviar.models.mlp import count_parameters
from caviar.search.datadir import DataPathError, resolve_data_path
from caviar.search.spec import DEFAULTS, CategoricalParam, SearchSpec, SpecIssue
from caviar.service.settings import Settings

#: Input and output sizes of the built-in datasets (for the parameter-count limit).
_BUILTIN_SIZES = {"mnist1d": (40, 10), "digits": (64, 10)}

#: Samples and features of a generated dataset whose spec leaves them out.
_GENERATED = {"mnist1d": (5000, 40), "synthetic": (2000, 20)}


def spec_limit_errors(
    spec: SearchSpec, settings: Settings, input_output: tuple[int, int] | None = None
) -> list[SpecIssue]:
    """Every limit the spec exceeds, as pydantic-style errors naming the field; `input_output`
    gives the dataset's sizes where the spec alone does not (an uploaded dataset)."""
    errors = []

    def check(loc: tuple, value: float, limit: int, what: str) -> None:
        if value > limit:
            errors.append(_limit_error(loc, f"{what} {value:g} exceeds the limit {limit}"))

    check(("budget", "trials"), spec.budget.trials, settings.max_trials, "trials")
    check(("budget", "epochs"), spec.budget.epochs, settings.max_epochs, "epochs")
    layers_loc, layers = _largest(spec, "hidden_layers")
    units_loc, units = _largest(spec, "hidden_units")
    check(layers_loc, layers, settings.max_hidden_layers, "hidden_layers")
    check(units_loc, units, settings.max_hidden_units, "hidden_units")
    errors += data_path_errors(spec, settings) + dataset_size_errors(spec, settings)
    inputs, outputs = input_output or _sizes(spec)
    parameters = count_parameters(inputs, (int(units),) * int(layers), outputs)
    if parameters > settings.max_parameters:
        message = (
            f"the largest model has {parameters:,} parameters, over the limit "
            f"{settings.max_parameters:,}"
        )
        errors.append(_limit_error(("space",), message))
    return errors


def data_path_errors(spec: SearchSpec, settings: Settings) -> list[SpecIssue]:
    """A `dataset.path` the service may not read: any, without a data directory; else one that
    leads out of it or names no file in it."""
    if spec.dataset.path is None:
        return []
    try:
        resolve_data_path(spec.dataset.path, settings.data_dir)
    except DataPathError as error:
        return [{"loc": ["dataset", "path"], "msg": str(error), "type": "path"}]
    return []


def dataset_size_errors(spec: SearchSpec, settings: Settings) -> list[SpecIssue]:
    """The limits a generated dataset exceeds (samples, features, classes, samples x features),
    as errors naming the field."""
    ref = spec.dataset
    if ref.name not in _GENERATED:
        return []
    default_samples, default_features = _GENERATED[ref.name]
    samples, features = ref.samples or default_samples, ref.features or default_features
    sizes = [
        ("samples", samples, settings.max_samples),
        ("features", features, settings.max_features),
        ("classes", ref.classes or 2, settings.max_classes),
    ]
    errors = [
        _limit_error(("dataset", key), f"{key} {value:,} exceeds the limit {limit:,}")
        for key, value, limit in sizes
        if value > limit
    ]
    if not errors and samples * features > settings.max_dataset_values:
        loc = ("dataset", "samples")
        message = (
            f"{samples:,} samples x {features:,} features = {samples * features:,} values, over "
            f"the limit {settings.max_dataset_values:,}"
        )
        errors.append(_limit_error(loc, message))
    return errors


def _limit_error(loc: tuple[str, ...], message: str) -> SpecIssue:
    return {"loc": list(loc), "msg": message, "type": "limit"}


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
