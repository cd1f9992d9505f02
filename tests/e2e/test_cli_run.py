"""`caviar run` as a user runs it: a real process, a real SQLite file, its JSON and its report."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from caviar.models.data import load_dataset
from caviar.models.export import load_model

SPEC = """
name: cli-tiny
dataset: {name: synthetic, samples: 300, features: 5, classes: 2}
budget: {trials: 6, epochs: 3}
space:
  learning_rate: {low: 1.0e-3, high: 0.1, scale: log}
  momentum: {low: 0.9, high: 0.999, scale: one_minus_log}
fixed: {optimizer: momentum, batch_size: 32, hidden_units: 8, hidden_layers: 1}
stages: [{trials: 4}, {trials: 2}]
"""


def caviar(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "caviar.service.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_prints_progress_best_trials_json_and_writes_a_report(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    db = tmp_path / "caviar.db"
    done = caviar(
        "run",
        "spec.yaml",
        "--json",
        "--report",
        "report.html",
        "--model",
        "best.npz",
        "--database-url",
        f"sqlite:///{db}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    first, *_, last = done.stdout.strip().splitlines()
    summary = json.loads(last)
    assert summary["search_id"].startswith("cli-tiny-")
    assert first == summary["search_id"]  # printed first, before anything runs
    assert summary["studies"] == [f"caviar/{summary['search_id']}/stage-{n}" for n in (1, 2)]
    assert summary["trials"]["total"] == 6
    best = summary["best"]
    assert {"params", "dev_accuracy", "test_accuracy"} <= set(best)
    assert 0.9 <= best["params"]["momentum"] < 1  # β, not 1-β
    assert "Best trials by dev_accuracy" in done.stderr
    assert "diagnosis" in done.stderr
    report = (tmp_path / "report.html").read_text()
    assert "Optimization history by stage" in report and "1 - momentum (log axis)" in report
    assert "plotly" in report.lower() and "<script src=" not in report  # self-contained
    model = load_model(tmp_path / "best.npz")
    ds = load_dataset({"name": "synthetic", "samples": 300, "features": 5, "classes": 2})
    raw_test = ds.x_test * ds.feature_std + ds.feature_mean
    accuracy = float(np.mean(model.predict(raw_test) == ds.y_test))
    assert accuracy == pytest.approx(best["test_accuracy"], abs=1e-6)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    names = set(optuna.get_all_study_names(storage))
    assert set(summary["studies"]) <= names


def trials_by_number(db, search_id):
    """The search's trials in the SQLite file `db`, by (stage, number)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as connection:
        studies = json.loads(
            connection.execute(
                text("SELECT studies FROM caviar_searches WHERE id = :id"), {"id": search_id}
            ).scalar_one()
        )
    engine.dispose()
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    return {
        (stage, t.number): t
        for stage, name in enumerate(studies, start=1)
        for t in optuna.load_study(study_name=name, storage=storage).trials
    }


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_a_stopped_run_resumes_with_its_finished_trials_and_ends_with_its_budget(tmp_path, stop):
    # Slow enough that a poll finds a trial half way on a fast machine: at 200 epochs a trial
    # took under a second there, and the run could end between two polls.
    epochs = 1000
    slow = SPEC.replace("epochs: 3", f"epochs: {epochs}").replace("samples: 300", "samples: 3000")
    (tmp_path / "spec.yaml").write_text(slow)
    db = tmp_path / "caviar.db"
    url = f"sqlite:///{db}"
    run = subprocess.Popen(
        [sys.executable, "-m", "caviar.service.cli", "run", "spec.yaml", "--batch", "2"],
        cwd=tmp_path,
        env={**os.environ, "CAVIAR_DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert run.stdout is not None
    search_id = run.stdout.readline().strip()

    def in_flight_after_a_complete_one() -> bool:
        # In flight: not yet half way. A trial told its last epoch is still RUNNING until its
        # result is written, and a kill then would find nothing left to stop.
        trials = trials_by_number(db, search_id).values()
        complete = any(t.state == TrialState.COMPLETE for t in trials)
        return complete and any(
            t.state == TrialState.RUNNING and 0 < len(t.intermediate_values) < epochs // 2
            for t in trials
        )

    deadline = time.monotonic() + 240
    while not in_flight_after_a_complete_one():
        assert run.poll() is None and time.monotonic() < deadline, "no second batch in time"
        time.sleep(0.2)
    run.send_signal(stop)
    output = run.communicate(timeout=120)[0]
    if stop == signal.SIGINT:
        assert run.returncode == 130, output
        assert f"continue it with: caviar run --resume {search_id}" in output
    finished = {
        key: (t.params, t.value)
        for key, t in trials_by_number(db, search_id).items()
        if t.state == TrialState.COMPLETE
    }

    done = caviar("run", "--resume", search_id, "--json", "--database-url", url, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["search_id"] == search_id
    trials = trials_by_number(db, search_id)
    assert {key: (trials[key].params, trials[key].value) for key in finished} == finished
    counted = [t for t in trials.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 6  # exactly the budget: 4 in stage 1, 2 in stage 2
    assert not [t for t in trials.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    stopped = [t for t in trials.values() if t.user_attrs.get("reason") == "interrupted"]
    assert stopped, "the trials in flight were stopped"
    rerun = {t.system_attrs.get("failed_trial") for t in trials.values()}
    assert {t.number for t in stopped} <= rerun  # and run again

    again = caviar("run", "--resume", search_id, "--database-url", url, cwd=tmp_path)
    assert again.returncode == 2
    assert f"search {search_id!r} is completed: there is nothing to resume" in again.stderr


REGRESSION_SPEC = """
name: cli-regression
dataset: {name: synthetic, samples: 300, features: 5, task: regression, noise: 5.0}
budget: {trials: 6, epochs: 3}
space:
  learning_rate: {low: 1.0e-4, high: 0.3, scale: log}
fixed: {optimizer: adam, batch_size: 32, hidden_units: 8, hidden_layers: 1}
"""


def test_a_regression_run_calls_the_lowest_dev_mse_best(tmp_path):
    """The objective (dev_mse, minimized) comes with the results: the progress bar, the table's
    order and the best line all pick the lowest dev MSE, not the highest."""
    (tmp_path / "spec.yaml").write_text(REGRESSION_SPEC)
    done = caviar("run", "spec.yaml", "--database-url", f"sqlite:///{tmp_path}/c.db", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = [line.split("│") for line in lines if line.startswith("│")]
    values = [float(row[3]) for row in rows]
    assert len(values) == 6 and values == sorted(values), "the table lists the lowest MSE first"
    shown = next(line for line in lines if " · best " in line).split(" · best ")[1].split()[0]
    assert float(shown) == pytest.approx(values[0], rel=1e-3), "the bar shows the lowest MSE"
    best_line = next(line for line in lines if line.startswith("best: trial"))
    assert f"dev_mse {values[0]:.4f}" in best_line


def test_bad_spec_exits_with_the_field_and_reason(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        SPEC.replace("scale: log}", "scale: log, low: 0}", 1).replace("low: 1.0e-3, ", "")
    )
    done = caviar("run", "bad.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert "space.learning_rate" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("dataset", "extra", "problem"),
    [
        ("{name: synthetic, samples: 300, features: 5, classes: 2}", "seed: 4294967296", "seed:"),
        ("{name: synthetic, samples: 1000000000}", "", "dataset.samples: samples 1,000,000,000"),
        ("{name: synthetic, features: 40000000}", "", "dataset.features: features 40,000,000"),
    ],
)
def test_a_seed_or_dataset_size_no_worker_can_take_is_a_clear_error(
    tmp_path, dataset, extra, problem
):
    spec = SPEC.replace("{name: synthetic, samples: 300, features: 5, classes: 2}", dataset)
    (tmp_path / "big.yaml").write_text(spec + extra + "\n")
    done = caviar("run", "big.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert problem in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_missing_spec_file_is_a_clear_error(tmp_path):
    done = caviar("run", "nope.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert "nope.yaml" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("CAVIAR_CPU_DEVICES", "a whole number"),
        ("CAVIAR_GROUP_SIZE", "a whole number"),
        ("CAVIAR_DISPATCH_AHEAD", "0 or 1"),
        ("CAVIAR_COMPILE_AHEAD", "0 or 1"),
    ],
)
def test_a_bad_engine_setting_is_a_clear_error(tmp_path, variable, expected):
    (tmp_path / "spec.yaml").write_text(SPEC)
    done = caviar("run", "spec.yaml", cwd=tmp_path, env={variable: "two"})
    assert done.returncode == 2
    assert f"{variable}='two': expected {expected}" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def _alias_bomb() -> str:
    """Under 700 bytes of YAML whose last list expands to 9 ** 9 strings."""
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (SPEC + "seed: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested deeper than 32 levels"),
        (SPEC + _alias_bomb(), "more than 50 aliases"),
        (SPEC + "name: again\n", "name: duplicate key (line 10)"),
    ],
    ids=["deep", "alias-bomb", "duplicate-key"],
)
@pytest.mark.parametrize("command", ["run", "submit"])
def test_hostile_yaml_specs_are_one_line_errors(tmp_path, command, spec, reason):
    (tmp_path / "spec.yaml").write_text(spec)
    done = caviar(command, "spec.yaml", cwd=tmp_path, env={"CAVIAR_API_URL": "http://127.0.0.1:1"})
    assert done.returncode == 2, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], lines


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://someone:hunter2@127.0.0.1:1/caviar", "port 1 failed: Connection refused"),
        ("not a url", "not a valid SQLAlchemy URL"),
    ],
    ids=["unreachable", "unparseable"],
)
@pytest.mark.parametrize("command", [["db", "upgrade"], ["worker"], ["serve"]], ids=" ".join)
def test_a_wrong_database_url_is_one_line_and_exit_code_2(tmp_path, command, url, reason):
    done = caviar(*command, "--database-url", url, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], lines
    assert "hunter2" not in lines[0]


CACHED_SPEC = """
name: cli-cached
dataset: {{name: synthetic, samples: 300, features: 5, classes: 2}}
budget: {{trials: 3, epochs: 2}}
seed: {seed}
space:
  learning_rate: {{low: 1.0e-3, high: 0.1, scale: log}}
  hidden_units: {{low: {low}, high: {high}, type: int}}
fixed: {{optimizer: momentum, batch_size: 32, hidden_layers: 1}}
"""


def test_a_second_run_with_the_compilation_cache_trains_in_the_buckets_of_the_first(tmp_path):
    env = {"CAVIAR_COMPILE_CACHE": str(tmp_path / "xla-cache"), "CAVIAR_BUCKETS": "single"}
    env["COLUMNS"] = "1000"  # a plan on one line
    outputs = []
    for seed, low, high in ((0, 20, 24), (1, 8, 16)):  # the second run's widths fit the first's
        (tmp_path / "spec.yaml").write_text(CACHED_SPEC.format(seed=seed, low=low, high=high))
        done = caviar(
            "run", "spec.yaml", "-v", "--database-url", f"sqlite:///{tmp_path / 'c.db'}",
            cwd=tmp_path, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    first, second = outputs
    assert "3 trials of" in first and "(new, ~" in first and "(cached, ~" not in first
    assert "(cached, ~" in second and "(new, ~" not in second
    assert "padding waste" in second
    # Without -v the plans are not shown.
    done = caviar("run", "spec.yaml", "--database-url", f"sqlite:///{tmp_path / 'c.db'}",
                  cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 0 and "padding waste" not in done.stdout + done.stderr
