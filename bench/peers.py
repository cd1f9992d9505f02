"""Caviar against what users would otherwise run: one workload, every contender in turn.

    python -m bench.peers [--trials 32] [--epochs 20] [--rounds 3]
                          [--contenders caviar,optuna-flax,optuna-torch,sklearn]

Workload: a random search of `--trials` trials on MNIST-1D (4000 train / 1000 dev / 1250 test),
MLP 40→256→256→10 ReLU, SGD with momentum, minibatch 128, `--epochs` epochs, learning rate
log-uniform in [1e-4, 1], 1-β log-uniform in [1e-3, 1e-1], L2 log-uniform in [1e-6, 1e-2].
Every contender trains the same configurations: the Optuna ones draw them with the
RandomSampler seed Caviar's stage 1 uses, and scikit-learn gets the same list. Contenders:

- caviar (cold): the real path, a spec → Optuna on SQLite → `search.runner.run_search` → the
  engine; its wall time includes the refit and single test of the best trial.
- caviar (warm cache): the same in a second process reusing the first one's persistent
  compilation cache (`CAVIAR_COMPILE_CACHE`).
- optuna-flax: a plain Optuna script, one Flax model and jitted step per trial.
- optuna-torch: a plain Optuna script with a per-trial PyTorch loop on the CPU
  (`bench/peers_torch.py`), run in its own virtualenv with torch==2.13.0, which this benchmark
  creates on first use under `.cache/` (never a dependency of Caviar).
- sklearn: `MLPClassifier` (solver sgd, same momentum rule, alpha = L2) for each configuration.

Each contender runs in a fresh process, in turn (A B C D A B C D …), `--rounds` times; the table
has medians and each contender's wall time over Caviar's (cold). Figures: trials per minute,
test accuracy of the trial picked on dev, best and median test accuracy over the trials
(Caviar tests only the picked trial, once, so it has neither), median dev accuracy, GFLOP/s and
the share of this machine's float32 matmul peak. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench.common import (
    benchmark_venv,
    chosen_contenders,
    machine,
    median,
    print_table,
    run_contender,
)
from bench.engine import BATCH, DATASET, HIDDEN, summarise, train_flax_trial

CONTENDERS = ("caviar", "optuna-flax", "optuna-torch", "sklearn")
TORCH = "torch==2.13.0"
TORCH_VENV = Path(__file__).resolve().parent.parent / ".cache" / "bench-torch-2.13.0"
SPACE = {  # Optuna parameter name → (low, high), all log-uniform, in Caviar's sampling order
    "learning_rate": (1e-4, 1.0),
    "one_minus_momentum": (1e-3, 1e-1),
    "l2": (1e-6, 1e-2),
}
SEED = 0  # the spec seed; the Optuna contenders use the sampler seed Caviar derives from it


def sampler_seed() -> int:
    """The RandomSampler seed of Caviar's stage 1, so that every contender draws the same trials."""
    from caviar.search.studies import sampler_seed as caviar_sampler_seed

    return caviar_sampler_seed(SEED, stage=1)


def write_data(directory: Path) -> Path:
    """MNIST-1D's ready splits as one .npz, the same file for every contender."""
    from caviar.models.data import load_dataset

    ds = load_dataset(DATASET)
    path = directory / "mnist1d.npz"
    splits = ("x_train", "y_train", "x_dev", "y_dev", "x_test", "y_test")
    arrays = {name.removesuffix("_train"): getattr(ds, name) for name in splits}
    np.savez(path, **arrays)
    return path


def spec_text(data: Path, trials: int, epochs: int) -> str:
    """The Caviar spec of the workload (SPACE, with 1-β written as β on its one_minus_log scale)."""
    return f"""
name: peers
dataset: {{path: {data}}}
budget: {{trials: {trials}, epochs: {epochs}}}
sampler: random
seed: {SEED}
space:
  learning_rate: {{low: 1.0e-4, high: 1.0, scale: log}}
  momentum: {{low: 0.9, high: 0.999, scale: one_minus_log}}
  l2: {{low: 1.0e-6, high: 1.0e-2, scale: log}}
fixed: {{optimizer: momentum, batch_size: {BATCH}, hidden_units: {HIDDEN[0]},
        hidden_layers: {len(HIDDEN)}, activation: relu}}
"""


def configurations(trials: int) -> list[dict]:
    """The trials' hyperparameters as the Optuna scripts draw them (for scikit-learn)."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sampler_seed()))
    drawn = []
    for _ in range(trials):
        trial = study.ask()
        drawn.append(suggest(trial))
        study.tell(trial, 0.0)
    return drawn


def suggest(trial) -> dict:
    """Draw one trial's SPACE with Optuna; return its engine hyperparameters (β as β)."""
    values = {n: trial.suggest_float(n, low, high, log=True) for n, (low, high) in SPACE.items()}
    return {
        "learning_rate": values["learning_rate"],
        "momentum": 1 - values["one_minus_momentum"],
        "l2": values["l2"],
        "seed": trial.number,
    }


# --- contenders, each in its own process ------------------------------------------------------


def run_caviar(data: Path, trials: int, epochs: int, workdir: Path) -> dict:
    """Contender: `caviar run`'s path, a spec → Optuna on SQLite → worker → engine."""
    from caviar.db.migrate import upgrade
    from caviar.db.storage import optuna_storage
    from caviar.search.runner import run_search, search_trials, start_search
    from caviar.search.spec import parse_spec

    spec = parse_spec(spec_text(data, trials, epochs))
    url = f"sqlite:///{workdir / 'caviar.db'}"
    upgrade(url)
    storage = optuna_storage(url)
    start = time.perf_counter()
    result = run_search(url, start_search(url, spec))
    wall = time.perf_counter() - start
    found = search_trials(storage, spec, result.studies)
    epochs_done = [t.trial.user_attrs.get("epochs", 0) for t in found]
    devs = [t.trial.value if t.trial.value is not None else np.nan for t in found]
    assert result.best is not None  # the search completed trials
    test = result.best["test_accuracy"]
    return {
        **summarise(wall, epochs_done, devs, None, *split_sizes(data), selected_test=test),
        "params": [_rounded(t.params) for t in found],
    }


def run_optuna_flax(data: Path, trials: int, epochs: int) -> dict:
    """Contender: a plain Optuna script training one Flax model per trial."""
    import optuna

    from caviar.models.data import load_dataset

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ds = load_dataset({"path": str(data)})
    outcomes = []
    params = []

    def objective(trial: optuna.Trial) -> float:
        hp = suggest(trial)
        params.append(_rounded(hp))
        outcomes.append(train_flax_trial(hp, ds, epochs))
        return outcomes[-1][1]  # NaN (diverged): Optuna records a failed trial

    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=sampler_seed())
    )
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    wall = time.perf_counter() - start
    epochs_done, devs, tests = (list(column) for column in zip(*outcomes, strict=True))
    return {
        **summarise(wall, epochs_done, devs, tests, len(ds.y_train), len(ds.y_dev)),
        "params": params,
    }


def run_sklearn(data: Path, trials: int, epochs: int) -> dict:
    """Contender: scikit-learn's MLPClassifier over the same configurations, one after another.

    scikit-learn's momentum keeps v = β·v - lr·dW, so its learning rate is lr·(1-β) for the same
    update as Caviar's; its alpha is the same λ/(2m)·Σ‖W‖² on the weights.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    with np.load(data) as file:
        arrays = dict(file)
    drawn = configurations(trials)
    outcomes = []
    start = time.perf_counter()
    for hp in drawn:
        model = MLPClassifier(
            hidden_layer_sizes=HIDDEN,
            solver="sgd",
            learning_rate_init=hp["learning_rate"] * (1 - hp["momentum"]),
            momentum=hp["momentum"],
            nesterovs_momentum=False,
            alpha=hp["l2"],
            batch_size=BATCH,
            max_iter=epochs,
            n_iter_no_change=epochs + 1,  # train every epoch, as the other contenders do
            random_state=hp["seed"],
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(arrays["x"], arrays["y"])
            dev = model.score(arrays["x_dev"], arrays["y_dev"])
            test = model.score(arrays["x_test"], arrays["y_test"])
        except ValueError:  # "Solver produced non-finite parameter weights": diverged
            dev = test = np.nan
        outcomes.append((model.n_iter_ if np.isfinite(dev) else epochs, dev, test))
    wall = time.perf_counter() - start
    epochs_done, devs, tests = (list(column) for column in zip(*outcomes, strict=True))
    return {
        **summarise(wall, epochs_done, devs, tests, len(arrays["y"]), len(arrays["y_dev"])),
        "params": [_rounded(hp) for hp in drawn],
    }


def torch_python() -> Path:
    """The PyTorch contender's interpreter: a virtualenv of its own, created on first use."""
    return benchmark_venv(TORCH_VENV, [TORCH])


def run_optuna_torch(data: Path, trials: int, epochs: int) -> dict:
    """Contender: `bench/peers_torch.py` in the PyTorch virtualenv."""
    script = Path(__file__).with_name("peers_torch.py")
    args = [str(data), "--trials", str(trials), "--epochs", str(epochs)]
    completed = subprocess.run(
        [torch_python(), script, *args, "--seed", str(sampler_seed())],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the PyTorch contender failed:\n{completed.stderr[-3000:]}")
    raw = json.loads(completed.stdout.strip().splitlines()[-1])
    return summarise(raw["wall_s"], raw["epochs"], raw["devs"], raw["tests"], *split_sizes(data))


def split_sizes(data: Path) -> tuple[int, int]:
    """(training examples, dev examples) of the workload's file."""
    with np.load(data) as arrays:
        return len(arrays["y"]), len(arrays["y_dev"])


def _rounded(params: dict) -> dict:
    names = ("learning_rate", "momentum", "l2")
    return {name: float(f"{params[name]:.6g}") for name in names}


# --- the side-by-side run ---------------------------------------------------------------------


def one_round(contenders: list[str], data: Path, trials: int, epochs: int) -> dict[str, dict]:
    """Every contender once, in turn, each in a fresh process."""
    common = ["--data", str(data), "--trials", str(trials), "--epochs", str(epochs)]
    results: dict[str, dict] = {}
    for name in contenders:
        if name == "caviar":
            with tempfile.TemporaryDirectory() as cache:
                env = {"CAVIAR_COMPILE_CACHE": cache}
                caviar = [*common, "--contender", "caviar"]
                results["caviar (cold)"] = run_contender("bench.peers", caviar, env)
                results["caviar (warm cache)"] = run_contender("bench.peers", caviar, env)
        elif name == "optuna-torch":
            results[name] = run_optuna_torch(data, trials, epochs)
        else:
            results[name] = run_contender("bench.peers", [*common, "--contender", name])
        print(f"  {name}: done", file=sys.stderr)
    return results


def table(runs: dict[str, list[dict]], trials: int, peak: float) -> list[dict]:
    """Medians over rounds per contender, with wall time relative to Caviar (cold)."""
    reference = median([r["wall_s"] for r in runs.get("caviar (cold)", [])] or [np.nan])
    rows = []
    for name, results in runs.items():
        wall = median([r["wall_s"] for r in results])
        gflops = median([r["gflop"] / r["wall_s"] for r in results])

        def figure(key: str, results: list[dict] = results) -> float | None:
            values = [r[key] for r in results if r.get(key) is not None]
            return median(values) if values else None

        rows.append(
            {
                "contender": name,
                "wall_s": wall,
                "trials_per_min": 60 * trials / wall,
                "wall_over_caviar": wall / reference,
                "selected_test_acc": figure("selected_test_accuracy"),
                "best_test_acc": figure("best_test_accuracy"),
                "median_test_acc": figure("median_test_accuracy"),
                "median_dev_acc": figure("median_dev_accuracy"),
                "gflop_per_s": gflops,
                "share_of_peak": gflops / peak,
                "diverged": results[-1]["diverged"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="contenders run in turn, N times")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.contender:  # inside a contender's own process
        data = Path(args.data)
        if args.contender == "caviar":
            from caviar.models.runtime import enable_compilation_cache, use_every_core

            use_every_core()  # as `caviar run` does
            enable_compilation_cache(os.environ["CAVIAR_COMPILE_CACHE"])
            with tempfile.TemporaryDirectory() as workdir:
                out = run_caviar(data, args.trials, args.epochs, Path(workdir))
        elif args.contender == "optuna-flax":
            out = run_optuna_flax(data, args.trials, args.epochs)
        else:
            out = run_sklearn(data, args.trials, args.epochs)
        print(json.dumps(out))
        return

    contenders = chosen_contenders(parser, args.contenders, CONTENDERS)
    if "optuna-torch" in contenders:
        torch_python()  # create its virtualenv before any timing
    from caviar.models.runtime import matmul_peak_gflops

    peak = matmul_peak_gflops()
    info = machine()
    print(f"machine: {info}")
    print(
        f"workload: {args.trials} trials, MNIST-1D 4000 train / 1000 dev / 1250 test, "
        f"MLP 40→256→256→10 relu, momentum SGD, batch {BATCH}, {args.epochs} epochs, random "
        f"search over log lr [1e-4, 1], log 1-β [1e-3, 1e-1], log L2 [1e-6, 1e-2]; "
        f"{args.rounds} rounds; float32 matmul peak {peak:.0f} GFLOP/s"
    )
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as directory:
        data = write_data(Path(directory))
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}", file=sys.stderr)
            for name, result in one_round(contenders, data, args.trials, args.epochs).items():
                runs.setdefault(name, []).append(result)
    rows = table(runs, args.trials, peak)
    print_table(rows, list(rows[0]))
    same = {name: results[-1].get("params") for name, results in runs.items()}
    drawn = [p for p in same.values() if p is not None]
    print(
        json.dumps(
            {
                "benchmark": "peers",
                "machine": info,
                "peak_gflops": peak,
                "trials": args.trials,
                "epochs": args.epochs,
                "rounds": args.rounds,
                "same_configurations": all(p == drawn[0] for p in drawn),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
