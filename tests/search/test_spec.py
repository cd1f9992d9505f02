"""Tests for search.spec: the spec format, its defaults, and the errors bad specs produce."""

from __future__ import annotations

import copy
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from caviar.search.spec import (
    MAX_SPEC_DOCUMENT_BYTES,
    Budget,
    CategoricalParam,
    DatasetRef,
    FloatParam,
    IntParam,
    Objective,
    PrunerSpec,
    SearchSpec,
    SpecError,
    Stage,
    load_spec,
    parse_spec,
)

EXAMPLE = """\
name: quickstart
dataset: {name: mnist1d}
task: classification
objective: {metric: dev_accuracy, direction: maximize}
budget: {trials: 64, epochs: 30, timeout_s: 600}
sampler: random
pruner: {name: none}
seed: 0
space:
  learning_rate: {low: 1.0e-4, high: 1.0, scale: log}
  momentum:      {low: 0.9, high: 0.999, scale: one_minus_log}
  l2:            {low: 1.0e-6, high: 1.0e-2, scale: log}
  hidden_units:  {low: 32, high: 512, scale: log, type: int}
  hidden_layers: {low: 1, high: 3, type: int}
  optimizer:     {choices: [momentum, adam]}
fixed: {batch_size: 128, activation: relu}
stages:
  - {trials: 32}
  - {trials: 32, keep_top: 0.25, margin: 0.1}
final_fit: train
"""

MINIMAL: dict[str, Any] = {
    "name": "tiny",
    "dataset": {"name": "digits"},
    "budget": {"trials": 10, "epochs": 5},
    "space": {"learning_rate": {"low": 1e-4, "high": 1.0, "scale": "log"}},
}


def _spec(**changes: Any) -> dict[str, Any]:
    """MINIMAL with top-level fields replaced (None removes one)."""
    spec = {**copy.deepcopy(MINIMAL), **changes}
    return {key: value for key, value in spec.items() if value is not None}


def _with_space(**params: Any) -> dict[str, Any]:
    return _spec(space={**MINIMAL["space"], **params})


def _errors(text: str) -> dict[tuple[str | int, ...], str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    return {tuple(error["loc"]): error["msg"] for error in caught.value.errors}


def test_example_parses() -> None:
    spec = parse_spec(EXAMPLE)
    assert spec.name == "quickstart"
    assert spec.dataset.name == "mnist1d"
    assert spec.objective == Objective(metric="dev_accuracy", direction="maximize")
    assert (spec.budget.trials, spec.budget.epochs, spec.budget.timeout_s) == (64, 30, 600)
    assert spec.space["learning_rate"] == FloatParam(low=1e-4, high=1.0, scale="log")
    momentum = spec.space["momentum"]
    assert isinstance(momentum, FloatParam) and momentum.scale == "one_minus_log"
    assert spec.space["hidden_units"] == IntParam(low=32, high=512, scale="log", type="int")
    assert spec.space["optimizer"] == CategoricalParam(choices=["momentum", "adam"])
    assert spec.fixed == {"batch_size": 128, "activation": "relu"}
    assert spec.stage_plan() == [Stage(trials=32), Stage(trials=32, keep_top=0.25, margin=0.1)]


def test_json_form_parses_to_the_same_spec() -> None:
    as_json = json.dumps(yaml.safe_load(EXAMPLE))
    assert parse_spec(as_json, format="json") == parse_spec(EXAMPLE)
    assert parse_spec(as_json.encode()) == parse_spec(EXAMPLE)  # YAML reads JSON too


def test_dumped_spec_parses_back() -> None:
    spec = parse_spec(EXAMPLE)
    assert parse_spec(spec.model_dump_json(), format="json") == spec


def test_load_spec_reads_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(EXAMPLE)
    (tmp_path / "spec.json").write_text(json.dumps(yaml.safe_load(EXAMPLE)))
    assert load_spec(tmp_path / "spec.yaml") == load_spec(str(tmp_path / "spec.json"))


def test_load_spec_reads_no_further_than_the_size_cap(tmp_path: Path) -> None:
    """A spec "file" that never ends (`/dev/zero`, a pipe) is refused once past the cap, rather
    than read until memory runs out."""
    pipe = tmp_path / "spec.yaml"
    os.mkfifo(pipe)
    done = threading.Event()

    def endless_writer() -> None:
        with open(pipe, "wb") as stream:
            stream.write(b"#" * (MAX_SPEC_DOCUMENT_BYTES + 1))
            done.wait(60)  # the pipe stays open: a reader waiting for its end waits on

    errors: list[SpecError] = []

    def read() -> None:
        with pytest.raises(SpecError) as raised:
            load_spec(pipe)
        errors.append(raised.value)

    writer, reader = threading.Thread(target=endless_writer), threading.Thread(target=read)
    writer.start()
    reader.start()
    reader.join(timeout=30)
    waited = reader.is_alive()
    done.set()  # ends the pipe, and with it a reader still waiting
    writer.join()
    reader.join()
    assert not waited, "load_spec waited for the end of an endless file"
    assert "larger than 1048576 bytes" in str(errors[0])


def test_defaults() -> None:
    spec = SearchSpec.model_validate(MINIMAL)
    assert (spec.sampler, spec.pruner.name, spec.pruner.warmup_epochs) == ("random", "none", 2)
    assert (spec.seed, spec.task, spec.objective, spec.fixed) == (0, None, None, {})
    assert spec.final_fit == "train"
    assert spec.stage_plan() == [Stage(trials=10, keep_top=0.1, margin=0.05)]
    assert isinstance(spec.space["learning_rate"], FloatParam)


def test_objective_defaults_follow_the_task() -> None:
    spec = SearchSpec.model_validate(MINIMAL)
    assert spec.resolved_objective("regression") == Objective(
        metric="dev_mse", direction="minimize"
    )
    assert spec.resolved_objective("classification") == Objective(
        metric="dev_accuracy", direction="maximize"
    )


@pytest.mark.parametrize(
    ("metric", "direction"),
    [
        ("dev_accuracy", "maximize"),
        ("dev_loss", "minimize"),
        ("dev_mse", "minimize"),
        ("dev_r2", "maximize"),
    ],
)
def test_direction_defaults_to_the_metric_direction(metric: str, direction: str) -> None:
    assert Objective.model_validate({"metric": metric}).direction == direction


def test_objective_that_does_not_fit_the_inferred_task() -> None:
    spec = SearchSpec.model_validate(_spec(objective={"metric": "dev_accuracy"}))
    with pytest.raises(SpecError, match=r"objective\.metric: dev_accuracy .* regression"):
        spec.resolved_objective("regression")


def test_budget_trials_may_be_left_to_the_stages() -> None:
    spec = SearchSpec.model_validate(
        _spec(budget={"epochs": 5}, stages=[{"trials": 6}, {"trials": 2, "keep_top": 0.5}])
    )
    assert spec.budget.trials == 8
    assert [stage.trials for stage in spec.stage_plan()] == [6, 2]
    stored = spec.model_dump(mode="json", exclude_none=True)  # as a search row keeps it
    assert stored["budget"] == {"trials": 8, "epochs": 5}
    assert "trials" not in SearchSpec.model_json_schema()["$defs"]["Budget"]["required"]


def test_a_trial_epoch_budget_leaves_the_trials_to_the_search() -> None:
    spec = SearchSpec.model_validate(_spec(budget={"trial_epochs": 90, "epochs": 9}))
    assert (spec.budget.trial_epochs, spec.budget.trials) == (90, 90)  # at most a trial an epoch
    assert spec.stage_plan()[0].trials == 90


def test_a_task_given_twice_the_same_way_is_accepted() -> None:
    spec = SearchSpec.model_validate(
        _spec(task="regression", dataset={"id": "ds_1", "task": "regression"})
    )
    assert spec.declared_task == "regression"
    assert SearchSpec.model_validate(_spec(dataset={"id": "ds_1"})).declared_task is None


@pytest.mark.parametrize(
    "dataset",
    [
        {"name": "digits"},
        {"name": "synthetic", "samples": 20000, "features": 64, "classes": 10, "noise": 0.1},
        {"name": "synthetic", "task": "regression"},
        {"name": "mnist1d", "samples": 4000},
        {"path": "data.csv", "target": "label"},
        {"path": "data.npz"},
        {"id": "ds_123"},
    ],
)
def test_dataset_sources(dataset: dict[str, Any]) -> None:
    spec = SearchSpec.model_validate(_spec(dataset=dataset))
    assert spec.dataset.model_dump(exclude_none=True) == dataset


def test_yaml_exponent_floats_without_a_dot_are_numbers() -> None:
    text = yaml.safe_dump(_spec(fixed={"l2": "1e-4"})).replace("'1e-4'", "1e-4")
    assert parse_spec(text).fixed == {"l2": 1e-4}


def test_categorical_values_for_numeric_params_are_allowed() -> None:
    spec = SearchSpec.model_validate(
        _with_space(batch_size={"choices": [64, 128, 256]}, l2={"choices": [0, 1e-4]})
    )
    assert spec.space["batch_size"] == CategoricalParam(choices=[64, 128, 256])


BAD = [
    # (spec, field path, words of the reason)
    (_with_space(lr={"low": 0.1, "high": 1}), ("space", "lr"), "unknown hyperparameter 'lr'"),
    (_with_space(l2={"low": 0.1, "high": 0.1}), ("space", "l2"), "empty range"),
    (_with_space(l2={"low": 0.2, "high": 0.1}), ("space", "l2"), "empty range"),
    (
        _with_space(learning_rate={"low": 0, "high": 1, "scale": "log"}),
        ("space", "learning_rate"),
        "log scale needs low > 0",
    ),
    (
        _with_space(momentum={"low": 0.9, "high": 1.0, "scale": "one_minus_log"}),
        ("space", "momentum"),
        "one_minus_log scale needs 0 < low < high < 1",
    ),
    (
        _with_space(l2={"low": 0.0, "high": 0.5, "scale": "one_minus_log"}),
        ("space", "l2"),
        "one_minus_log",
    ),
    (
        _with_space(hidden_units={"low": 32.5, "high": 512, "type": "int"}),
        ("space", "hidden_units", "low"),
        "integer",
    ),
    (
        _with_space(hidden_units={"low": 32, "high": 512, "type": "int", "scale": "one_minus_log"}),
        ("space", "hidden_units", "scale"),
        "'linear' or 'log'",
    ),
    (
        _with_space(hidden_units={"low": 32, "high": 512}),
        ("space", "hidden_units", "type"),
        "integers",
    ),
    (
        _with_space(hidden_units={"low": 32, "high": 512, "type": "str"}),
        ("space", "hidden_units"),
        "type must be 'float' or 'int'",
    ),
    (_with_space(optimizer={"low": 0, "high": 1}), ("space", "optimizer"), "not a range"),
    (
        _with_space(optimizer={"choices": ["adam", "sgd"]}),
        ("space", "optimizer", "choices", 1),
        "optimizer must be one of",
    ),
    (
        _with_space(optimizer={"choices": ["adam", "adam"]}),
        ("space", "optimizer", "choices"),
        "unique",
    ),
    (_with_space(optimizer={"choices": []}), ("space", "optimizer", "choices"), "at least 1"),
    (
        _with_space(dropout={"low": 0, "high": 1}),
        ("space", "dropout", "high"),
        "dropout must be a number in [0, 1)",
    ),
    (
        _with_space(decay_rate={"low": 0.5, "high": 0.99}),
        ("space", "decay_rate"),
        "only used when lr_decay is one of",
    ),
    (
        _spec(fixed={"learning_rate": 0.1}),
        ("fixed", "learning_rate"),
        "both searched (space) and fixed",
    ),
    (_spec(fixed={"dropout": 1.5}), ("fixed", "dropout"), "dropout must be a number in [0, 1)"),
    (_spec(fixed={"batch_size": 0}), ("fixed", "batch_size"), "an integer >= 1"),
    (_spec(fixed={"batch_norm": "yes"}), ("fixed", "batch_norm"), "one of true, false"),
    (_spec(fixed={"widths": 3}), ("fixed", "widths"), "unknown hyperparameter"),
    (_spec(sampler="grid"), ("sampler",), "'random', 'tpe', 'qmc', 'gp' or 'cmaes'"),
    (_spec(pruner={"name": "sha"}), ("pruner", "name"), "'median', 'hyperband' or 'asha'"),
    (
        _spec(pruner={"name": "asha", "reduction_factor": 1}),
        ("pruner", "reduction_factor"),
        "greater than or equal to 2",
    ),
    (_spec(stages=[{"trials": 4}, {"trials": 4}]), ("stages",), "sum to 8 but budget.trials is 10"),
    (_spec(budget={"epochs": 1}), ("budget", "trials"), "required"),
    (
        _spec(budget={"trial_epochs": 8, "epochs": 9}),
        ("budget", "trial_epochs"),
        "8 trial-epochs do not fit one trial of 9",
    ),
    (
        _spec(budget={"trial_epochs": 90, "epochs": 9}, stages=[{"trials": 5}, {"trials": 5}]),
        ("budget", "trial_epochs"),
        "a trial-epoch budget takes one stage",
    ),
    (
        _spec(budget={"epochs": 1}, stages=[{"trials": 0}]),
        ("stages", 0, "trials"),
        "greater than or equal to 1",
    ),
    (
        _spec(task="classification", dataset={"id": "ds_1", "task": "regression"}),
        ("task",),
        "task classification conflicts with dataset.task regression",
    ),
    (
        _spec(
            dataset={"name": "synthetic", "task": "regression"},
            objective={"metric": "dev_accuracy"},
        ),
        ("objective", "metric"),
        "dev_accuracy does not fit a regression task",
    ),
    (_spec(stages=[{"trials": 5}, {"trials": 5, "keep_top": 0}]), ("stages", 1, "keep_top"), "0"),
    (_spec(budget={"trials": 0, "epochs": 1}), ("budget", "trials"), "greater than or equal to 1"),
    (_spec(budget={"trials": 1, "epochs": 1, "timeout_s": 0}), ("budget", "timeout_s"), "0"),
    (
        _spec(task="regression", objective={"metric": "dev_accuracy"}),
        ("objective", "metric"),
        "dev_accuracy does not fit a regression task",
    ),
    (
        _spec(objective={"metric": "dev_loss", "direction": "maximize"}),
        ("objective", "direction"),
        "dev_loss must be minimized",
    ),
    (_spec(dataset={"name": "digits", "path": "x.csv"}), ("dataset",), "exactly one of"),
    (_spec(dataset={"target": "y"}), ("dataset",), "exactly one of"),
    (_spec(dataset={"name": "imagenet"}), ("dataset", "name"), "'mnist1d', 'digits'"),
    (
        _spec(dataset={"name": "digits", "features": 8}),
        ("dataset", "features"),
        "does not apply to dataset source 'digits'",
    ),
    (
        _spec(dataset={"name": "synthetic", "features": 1, "classes": 1000}),
        ("dataset", "classes"),
        "at most 2 classes can be made from 1 features",
    ),
    (
        _spec(dataset={"name": "synthetic", "classes": 1025}),
        ("dataset", "classes"),
        "at most 1024 classes can be made from 20 features",
    ),
    (_spec(space={}), ("space",), "at least 1"),
    (_spec(budget=None), ("budget",), "required"),
    (_spec(trials=10), ("trials",), "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("spec", "loc", "reason"), BAD)
def test_bad_spec_names_the_field_and_the_reason(
    spec: dict[str, Any], loc: tuple[str | int, ...], reason: str
) -> None:
    errors = _errors(yaml.safe_dump(spec))
    assert loc in errors, errors
    assert reason in errors[loc]


def test_all_problems_are_reported_at_once() -> None:
    spec = _spec(
        space={**MINIMAL["space"], "lr": {"low": 0.1, "high": 1}},
        fixed={"dropout": 1.5, "learning_rate": 0.1},
    )
    errors = _errors(json.dumps(spec))
    assert set(errors) == {("space", "lr"), ("fixed", "dropout"), ("fixed", "learning_rate")}


def test_error_message_has_one_line_per_problem() -> None:
    spec = _with_space(momentum={"low": 0.9, "high": 1.0, "scale": "one_minus_log"})
    spec["fixed"] = {"dropout": 1.5}
    with pytest.raises(SpecError) as caught:
        parse_spec(json.dumps(spec))
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("space.momentum: one_minus_log scale needs")
    assert len(lines) == len(caught.value.errors)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("name: [unclosed\n", "not valid yaml"),
        ("name: x\n  bad: indent\n", "not valid yaml"),
        ("- name: x\n", "must be a mapping"),
        ("just a string", "must be a mapping"),
        ("", "must be a mapping"),
    ],
)
def test_unreadable_document_is_reported_at_spec(text: str, reason: str) -> None:
    errors = _errors(text)
    assert list(errors) == [("spec",)]
    assert reason in errors[("spec",)]
    assert "\n" not in errors[("spec",)]


def test_bad_json_is_reported_at_spec() -> None:
    with pytest.raises(SpecError, match=r"^spec: not valid json"):
        parse_spec("{'name': 1}", format="json")


@pytest.mark.parametrize(
    "model",
    [
        SearchSpec,
        DatasetRef,
        Objective,
        Budget,
        PrunerSpec,
        FloatParam,
        IntParam,
        CategoricalParam,
        Stage,
    ],
)
def test_models_are_documented_for_openapi(model: type[BaseModel]) -> None:
    assert model.__doc__
    assert all(field.description for field in model.model_fields.values())
    assert model.model_json_schema()["additionalProperties"] is False


def _yaml(**fields: Any) -> str:
    """MINIMAL as YAML with top-level fields added as raw YAML text."""
    return yaml.safe_dump(MINIMAL) + "".join(f"{key}: {text}\n" for key, text in fields.items())


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_yaml(fixed="{l2: " + "[" * 10_000 + "]" * 10_000 + "}"), "nested deeper than 32"),
        (_yaml(fixed="{l2: " + "{a: " * 10_000 + "1" + "}" * 10_001), "nested deeper than 32"),
        ("name: " + "x" * 2**20, "larger than 1048576 bytes"),
    ],
    ids=["flow-lists", "flow-mappings", "huge"],
)
def test_documents_over_the_depth_or_size_caps_are_refused(text: str, reason: str) -> None:
    errors = _errors(text)
    assert list(errors) == [("spec",)]
    assert reason in errors[("spec",)]


def _alias_bomb(width: int, levels: int) -> str:
    """``levels`` lists of ``width`` aliases of the previous one: width ** levels values."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("width", "levels", "reason"),
    [(9, 8, "more than 50 aliases"), (12, 4, "more than 10000 values")],
    ids=["many-aliases", "few-aliases"],
)
def test_alias_bombs_are_refused_without_expanding_them(
    width: int, levels: int, reason: str
) -> None:
    bomb = _alias_bomb(width, levels)
    assert len(bomb) < 600 and width ** (levels + 1) > 10**5
    with pytest.raises(SpecError) as caught:
        parse_spec(_yaml() + bomb)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        (_yaml(name="again"), ("name",)),
        (
            _yaml().replace("space:\n", "space:\n  learning_rate: {low: 0.1, high: 1.0}\n"),
            ("space", "learning_rate"),
        ),
        (_yaml(fixed="{hidden_units: 8, hidden_units: 16}"), ("fixed", "hidden_units")),
        (_yaml(stages="[{trials: 5}, {trials: 5, trials: 6}]"), ("stages", 1, "trials")),
    ],
    ids=["top", "space", "fixed", "in-a-list"],
)
def test_duplicate_yaml_keys_are_refused_by_name(text: str, loc: tuple) -> None:
    errors = _errors(text)
    assert list(errors) == [loc]
    assert errors[loc].startswith("duplicate key (line ")


def test_duplicate_json_keys_are_refused() -> None:
    with pytest.raises(SpecError, match=r"^spec: not valid json: duplicate key 'name'$"):
        parse_spec('{"name": "a", "name": "b"}', format="json")


def test_yaml_merge_keys_are_not_duplicates() -> None:
    text = _yaml(common="&c {hidden_units: 8}", fixed="{<<: *c, batch_size: 32}")
    text = text.replace("common:", "x-common:")
    errors = _errors(text)
    assert list(errors) == [("x-common",)]  # only the unknown field, no duplicate key


@pytest.mark.parametrize(
    ("spec", "loc", "reason"),
    [
        (_spec(name="x" * 201), ("name",), "at most 200 characters"),
        (_spec(name="a\0b"), ("name",), "NUL character"),
        (_spec(name="\ud800"), ("name",), "lone surrogate"),
        (_spec(dataset={"id": "ds-\0"}), ("dataset", "id"), "NUL character"),
        (_spec(dataset={"path": "d\0.csv", "target": "y"}), ("dataset", "path"), "NUL"),
        (_with_space(**{"l2\0": {"low": 0.0, "high": 1.0}}), ("space", "l2\0"), "key must not"),
        (_spec(fixed={"l2": math.nan}), ("fixed", "l2"), "finite number"),
        (_spec(fixed={"l2": math.inf}), ("fixed", "l2"), "finite number"),
        (
            _with_space(dropout={"choices": [0.1, -math.inf]}),
            ("space", "dropout", "choices", 1),
            "finite number",
        ),
    ],
)
def test_text_that_cannot_be_stored_and_non_finite_numbers_name_the_field(
    spec: dict[str, Any], loc: tuple, reason: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        SearchSpec.model_validate(spec)
    errors = {tuple(e["loc"]): e["msg"] for e in caught.value.errors()}
    assert loc in errors, errors
    assert reason in errors[loc]


def test_a_name_of_200_characters_is_accepted() -> None:
    assert SearchSpec.model_validate(_spec(name="x" * 200)).name == "x" * 200
