"""Tests for search.refine: narrowing ranges on their sampling scale, choices, ranking."""

from __future__ import annotations

import json
import math
from typing import Any

import optuna
import pytest
from optuna.samplers import RandomSampler

from caviar.search.refine import describe_ranges, refine_space, top_fraction
from caviar.search.space import sample_trial
from caviar.search.spec import DEFAULTS, CategoricalParam, FloatParam, IntParam, Param

optuna.logging.set_verbosity(optuna.logging.WARNING)

ORIGINAL: dict[str, Param] = {
    "learning_rate": FloatParam(low=1e-4, high=1.0, scale="log"),
    "momentum": FloatParam(low=0.9, high=0.999, scale="one_minus_log"),
    "dropout": FloatParam(low=0.0, high=0.5),
    "hidden_units": IntParam(low=32, high=512, scale="log", type="int"),
    "hidden_layers": IntParam(low=1, high=3, type="int"),
    "optimizer": CategoricalParam(choices=["gd", "momentum", "adam"]),
}


def _trial(**values: Any) -> dict[str, Any]:
    """Full engine params, as the stage runner passes them: DEFAULTS overlaid with ``values``."""
    return {**DEFAULTS, **values}


def _refine(
    top: list[dict[str, Any]], margin: float = 0.1, space: dict[str, Param] | None = None
) -> dict[str, Any]:
    return refine_space(space or ORIGINAL, top, margin=margin, original=ORIGINAL)


def test_log_range_narrows_around_the_top_on_log10() -> None:
    rates = [1e-3, 2e-3, 3e-3]
    new = _refine([_trial(learning_rate=rate) for rate in rates])["learning_rate"]
    # log10 envelope [-3, -2.52] widened by 0.1 * 4 decades on each side.
    assert new.low == pytest.approx(10**-3.4)
    assert new.high == pytest.approx(10 ** (math.log10(3e-3) + 0.4))
    assert 1e-4 < new.low < min(rates) and max(rates) < new.high < 1.0
    assert new.scale == "log"


def test_linear_range_narrows_around_the_top() -> None:
    new = _refine([_trial(dropout=0.2), _trial(dropout=0.3)])["dropout"]
    assert (new.low, new.high) == pytest.approx((0.15, 0.35))


def test_one_minus_log_narrows_in_log_of_one_minus_beta() -> None:
    new = _refine([_trial(momentum=0.99), _trial(momentum=0.995)])["momentum"]
    # log10(1 - β) envelope [-2.301, -2] widened by 0.1 * 2 decades: 1 - β in [10^-2.501, 10^-1.8].
    assert new.low == pytest.approx(1 - 10**-1.8)  # 0.98415
    assert new.high == pytest.approx(1 - 10 ** (math.log10(0.005) - 0.2))  # 0.99685
    assert new.scale == "one_minus_log"
    # Narrowing β itself would have given [0.9801, 0.999] (clipped): a different range.
    assert new.low > 0.9801 and new.high < 0.998


def test_widening_is_relative_to_the_current_range() -> None:
    current = {**ORIGINAL, "dropout": FloatParam(low=0.2, high=0.3)}
    new = _refine([_trial(dropout=0.25)], space=current)["dropout"]
    assert (new.low, new.high) == pytest.approx((0.24, 0.26))


@pytest.mark.parametrize(
    ("name", "edge_values"),
    [
        ("learning_rate", [1e-4, 1.0]),
        ("learning_rate", [1.0]),
        ("momentum", [0.9]),
        ("momentum", [0.999]),
        ("dropout", [0.0, 0.5]),
        ("hidden_units", [32, 512]),
        ("hidden_layers", [3]),
    ],
)
def test_never_leaves_the_original_bounds(name: str, edge_values: list[Any]) -> None:
    top = [_trial(**{name: value}) for value in edge_values]
    new = _refine(top, margin=0.5)[name]
    original = ORIGINAL[name]
    assert isinstance(new, FloatParam | IntParam) and isinstance(original, FloatParam | IntParam)
    assert original.low <= new.low < new.high <= original.high
    assert all(new.low <= value <= new.high for value in edge_values)


def test_zoomed_range_may_grow_back_but_not_past_the_original() -> None:
    current = {**ORIGINAL, "learning_rate": FloatParam(low=1e-2, high=1.0, scale="log")}
    new = _refine([_trial(learning_rate=1.0)], space=current)["learning_rate"]
    assert new.high == 1.0
    assert new.low == pytest.approx(10**-0.2)


def test_categorical_keeps_only_the_top_choices_in_order() -> None:
    top = [_trial(optimizer="adam"), _trial(optimizer="gd"), _trial(optimizer="adam")]
    assert _refine(top)["optimizer"].choices == ["gd", "adam"]


def test_categorical_is_never_emptied() -> None:
    top = [_trial(optimizer="rmsprop")]  # not among the current choices
    assert _refine(top)["optimizer"] == ORIGINAL["optimizer"]


def test_int_ranges_stay_int_and_round_outward() -> None:
    new = _refine([_trial(hidden_units=100), _trial(hidden_units=120)])["hidden_units"]
    assert isinstance(new, IntParam)
    assert isinstance(new.low, int) and isinstance(new.high, int)
    assert 32 < new.low <= 100 and 120 <= new.high < 512
    assert new.low == math.floor(10 ** (math.log10(100) - 0.1 * math.log10(16)))
    assert new.high == math.ceil(10 ** (math.log10(120) + 0.1 * math.log10(16)))


@pytest.mark.parametrize("margin", [0.1, 0.0])
def test_collapsed_float_envelope_stays_non_empty(margin: float) -> None:
    top = [_trial(learning_rate=1e-2)] * 3
    new = _refine(top, margin=margin)["learning_rate"]
    assert new.low < 1e-2 < new.high


@pytest.mark.parametrize(("value", "expected"), [(2, (2, 3)), (3, (2, 3)), (1, (1, 2))])
def test_collapsed_int_envelope_keeps_two_values(value: int, expected: tuple[int, int]) -> None:
    new = _refine([_trial(hidden_layers=value)], margin=0.0)["hidden_layers"]
    assert (new.low, new.high) == expected


def test_params_no_top_trial_used_keep_their_range() -> None:
    # momentum does not apply to gd: the default β in the engine dicts must not count.
    top = [_trial(optimizer="gd", momentum=0.9), _trial(optimizer="gd", momentum=0.9)]
    new = _refine(top)
    assert new["momentum"] == ORIGINAL["momentum"]
    assert new["optimizer"].choices == ["gd"]


def test_empty_top_changes_nothing() -> None:
    assert _refine([]) == ORIGINAL


def test_describe_ranges_is_json_and_valid_spec_params() -> None:
    summary = json.loads(json.dumps(describe_ranges(ORIGINAL)))
    assert summary["learning_rate"] == {"low": 1e-4, "high": 1.0, "scale": "log", "type": "float"}
    assert summary["optimizer"] == {"choices": ["gd", "momentum", "adam"]}
    assert summary["hidden_layers"]["type"] == "int"


def test_top_fraction_rounds_up_and_follows_the_direction() -> None:
    trials = [(float(i), {"i": i}) for i in range(30)]
    assert [p["i"] for p in top_fraction(trials, 0.1, "maximize")] == [29, 28, 27]
    assert [p["i"] for p in top_fraction(trials, 0.1, "minimize")] == [0, 1, 2]
    assert len(top_fraction(trials, 0.25, "minimize")) == 8  # ceil(7.5)
    assert len(top_fraction(trials[:3], 0.01, "minimize")) == 1
    assert top_fraction([], 0.25, "maximize") == []


def test_top_fraction_skips_nan_values() -> None:
    trials = [(math.nan, {"i": 0}), (1.0, {"i": 1}), (2.0, {"i": 2})]
    assert top_fraction(trials, 1.0, "maximize") == [{"i": 2}, {"i": 1}]


def test_second_stage_samples_inside_the_refined_space() -> None:
    space = {name: ORIGINAL[name] for name in ("learning_rate", "momentum", "hidden_units")}
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    scored = []
    for _ in range(40):
        trial = study.ask()
        values = sample_trial(trial, space, {})
        score = -abs(math.log10(values["learning_rate"]) + 2)  # best near 1e-2
        study.tell(trial, score)
        scored.append((score, values))
    refined = refine_space(
        space, top_fraction(scored, 0.25, "maximize"), margin=0.1, original=space
    )
    learning_rate = refined["learning_rate"]
    assert isinstance(learning_rate, FloatParam)
    assert learning_rate.high - learning_rate.low < 0.5
    for _ in range(40):  # same study: numeric ranges may change between stages
        values = sample_trial(study.ask(), refined, {})
        for name, param in refined.items():
            assert isinstance(param, FloatParam | IntParam)
            assert param.low <= values[name] <= param.high
