"""Tests for search.space: sampling scales, conditional params and the round trip through Optuna."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import RandomSampler

from caviar.search.space import APPLIES_TO, distribution, engine_params, optuna_name, sample_trial
from caviar.search.spec import DEFAULTS, CategoricalParam, FloatParam, IntParam, Param

optuna.logging.set_verbosity(optuna.logging.WARNING)

# optimizer comes after the params it conditions: sample_trial must still sample it first.
SPACE: dict[str, Param] = {
    "learning_rate": FloatParam(low=1e-4, high=1.0, scale="log"),
    "momentum": FloatParam(low=0.9, high=0.999, scale="one_minus_log"),
    "beta2": FloatParam(low=0.99, high=0.9999, scale="one_minus_log"),
    "hidden_units": IntParam(low=32, high=512, scale="log", type="int"),
    "optimizer": CategoricalParam(choices=["momentum", "adam"]),
}
FIXED = {"batch_size": 64, "activation": "tanh"}
DRAWS = 4000

Draw = tuple[optuna.trial.FrozenTrial, dict[str, Any]]


def _sample(study: optuna.Study, n: int) -> list[dict[str, Any]]:
    samples = []
    for _ in range(n):
        trial = study.ask()
        samples.append(sample_trial(trial, SPACE, FIXED))
        study.tell(trial, 0.0)
    return samples


@pytest.fixture(scope="module")
def draws() -> list[Draw]:
    """DRAWS random trials: each finished trial with the engine params sample_trial returned."""
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    samples = _sample(study, DRAWS)
    return list(zip(study.trials, samples, strict=True))


def _column(draws: list[Draw], name: str) -> list[Any]:
    return [values[name] for _, values in draws]


def test_one_minus_log_centres_beta_on_its_log_midpoint(draws: list[Draw]) -> None:
    betas = _column(draws, "momentum")
    assert all(0.9 <= beta <= 0.999 for beta in betas)
    # 1 - β log-uniform in [1e-3, 1e-1] has median 1e-2; a uniform β would give 0.9495.
    assert statistics.median(betas) == pytest.approx(0.99, abs=0.003)


def test_log_scale_gives_each_decade_the_same_share(draws: list[Draw]) -> None:
    rates = _column(draws, "learning_rate")
    share = sum(1e-4 <= rate <= 1e-3 for rate in rates) / len(rates)
    assert 0.22 <= share <= 0.28


def test_random_sampling_never_repeats_a_value(draws: list[Draw]) -> None:
    for name in ("learning_rate", "momentum"):
        column = _column(draws, name)
        assert len(set(column)) == len(column)


def test_one_minus_log_param_is_stored_as_one_minus_name(draws: list[Draw]) -> None:
    trial, values = draws[0]
    assert "momentum" not in trial.params
    dist = trial.distributions["one_minus_momentum"]
    assert isinstance(dist, FloatDistribution)
    assert dist.log
    assert (dist.low, dist.high) == pytest.approx((1e-3, 1e-1))
    one_minus = trial.params["one_minus_momentum"]
    assert trial.user_attrs["momentum"] == values["momentum"] == 1 - one_minus


def test_beta2_is_only_sampled_for_optimizers_that_use_it(draws: list[Draw]) -> None:
    assert "momentum" not in APPLIES_TO["beta2"]
    by_optimizer: dict[str, list[Draw]] = {"momentum": [], "adam": []}
    for trial, values in draws:
        by_optimizer[values["optimizer"]].append((trial, values))
    assert all(by_optimizer.values())
    for trial, values in by_optimizer["momentum"]:
        assert "one_minus_beta2" not in trial.params
        assert "beta2" not in trial.user_attrs
        assert values["beta2"] == DEFAULTS["beta2"]
    for trial, _ in by_optimizer["adam"]:
        assert "one_minus_beta2" in trial.params
    # β1 is momentum's β and Adam's β1: both optimizers sample it.
    assert all("one_minus_momentum" in trial.params for trial, _ in draws)


def test_int_log_param_stays_an_int_in_range(draws: list[Draw]) -> None:
    units = _column(draws, "hidden_units")
    assert all(isinstance(unit, int) and 32 <= unit <= 512 for unit in units)
    # Log-uniform on [32, 512]: half the draws below the geometric midpoint 128.
    assert 0.45 <= sum(unit < 128 for unit in units) / len(units) <= 0.55


def test_result_is_the_full_engine_dict(draws: list[Draw]) -> None:
    _, values = draws[0]
    assert set(values) == set(DEFAULTS)
    assert values["batch_size"] == 64
    assert values["activation"] == "tanh"
    assert values["l2"] == DEFAULTS["l2"]


def test_engine_params_rebuilds_what_sample_trial_returned(draws: list[Draw]) -> None:
    for trial, values in draws:
        assert engine_params(trial, SPACE, FIXED) == values


def test_round_trip_through_sqlite_storage(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", sampler=RandomSampler(seed=1))
    samples = _sample(study, 20)
    reloaded = optuna.load_study(study_name="s", storage=storage)
    assert [engine_params(t, SPACE, FIXED) for t in reloaded.trials] == samples


def test_fixed_parent_decides_which_conditional_params_are_sampled() -> None:
    space = {name: SPACE[name] for name in ("momentum", "beta2")}
    trial = optuna.create_study(sampler=RandomSampler(seed=0)).ask()
    values = sample_trial(trial, space, {"optimizer": "rmsprop"})
    assert set(trial.params) == {"one_minus_beta2"}
    assert values["momentum"] == DEFAULTS["momentum"]


def test_decay_rate_follows_lr_decay() -> None:
    space: dict[str, Param] = {
        "decay_rate": FloatParam(low=0.5, high=0.99),
        "lr_decay": CategoricalParam(choices=["inverse_sqrt", "step"]),
    }
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    for _ in range(50):
        trial = study.ask()
        values = sample_trial(trial, space, {})
        assert ("decay_rate" in trial.params) == (values["lr_decay"] == "step")


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (FloatParam(low=1e-4, high=1.0, scale="log"), FloatDistribution(1e-4, 1.0, log=True)),
        (FloatParam(low=0.0, high=0.5), FloatDistribution(0.0, 0.5)),
        (IntParam(low=32, high=512, scale="log", type="int"), IntDistribution(32, 512, log=True)),
        (IntParam(low=1, high=3, type="int"), IntDistribution(1, 3)),
        (CategoricalParam(choices=["adam", "gd"]), CategoricalDistribution(["adam", "gd"])),
    ],
)
def test_distribution(param: Param, expected: optuna.distributions.BaseDistribution) -> None:
    assert distribution(param) == expected
    assert optuna_name("x", param) == "x"


def test_one_minus_log_distribution_and_name() -> None:
    param = FloatParam(low=0.9, high=0.999, scale="one_minus_log")
    dist = distribution(param)
    assert isinstance(dist, FloatDistribution)
    assert dist.log
    assert (dist.low, dist.high) == pytest.approx((1e-3, 1e-1))
    assert optuna_name("momentum", param) == "one_minus_momentum"
