"""The Optuna + PyTorch SHA contender of `bench.pruning`, run in the PyTorch virtualenv.

    <torch-venv>/bin/python bench/pruning_torch.py DATA.npz --budget-s 120 --epochs 20 --seed S
        --target 0.65 [--min-epochs 1] [--reduction-factor 3]

Imports only NumPy, PyTorch and Optuna (never Caviar): a plain Optuna script, RandomSampler and
`optuna.pruners.SuccessiveHalvingPruner`, with a per-trial PyTorch loop on the CPU over the
mixed-shape space of `bench.mixed` (width, hidden layers, momentum or Adam), reporting the dev
accuracy every epoch. `study.optimize(timeout=...)` starts no trial after the budget; the trial
in flight when it runs out is stopped there (it fails, as Caviar's in-flight trials do).
The model and update rules are `bench/peers_torch.py`'s; `epochs_of` is also the trainable's
loop of `bench/pruning_ray.py`. Prints one JSON line: wall time, the time until a trial first
reached `--target` dev accuracy (None: never), trials started, complete and pruned, and the
picked trial's (best complete trial on dev) dev and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import cast

import numpy as np
import optuna
import torch
from peers_torch import epochs_of  # type: ignore[import-not-found]  # sibling script


def load(path: str) -> dict[str, torch.Tensor]:
    """The ready splits of DATA.npz as tensors."""
    with np.load(path) as arrays:
        return {
            name: torch.from_numpy(arrays[name]).to(
                torch.long if name.startswith("y") else torch.float32
            )
            for name in ("x", "y", "x_dev", "y_dev", "x_test", "y_test")
        }


def hparams(values: dict, seed: int) -> dict:
    """The engine hyperparameters of one trial's sampled values (1-β as β)."""
    return {
        "hidden": [int(values["hidden_units"])] * int(values["hidden_layers"]),
        "optimizer": values["optimizer"],
        "learning_rate": float(values["learning_rate"]),
        "momentum": 1 - float(values["one_minus_momentum"]),
        "l2": float(values["l2"]),
        "seed": seed,
    }


class OutOfTime(Exception):
    """The budget ran out during a trial: it fails, and the study stops."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of Optuna's RandomSampler")
    parser.add_argument("--target", type=float, default=0.65)
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=3)
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load(args.data)
    tests: dict[int, float] = {}
    reached: list[float] = []
    started = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal started
        started += 1
        values = {
            "hidden_units": trial.suggest_int("hidden_units", 32, 512, log=True),
            "hidden_layers": trial.suggest_int("hidden_layers", 1, 3),
            "optimizer": trial.suggest_categorical("optimizer", ["momentum", "adam"]),
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1.0, log=True),
            "one_minus_momentum": trial.suggest_float("one_minus_momentum", 1e-3, 1e-1, log=True),
            "l2": trial.suggest_float("l2", 1e-6, 1e-2, log=True),
        }
        best = math.nan
        for epoch, dev, best_so_far, test in epochs_of(
            hparams(values, trial.number), data, args.epochs
        ):
            best = best_so_far
            if math.isnan(dev):
                return math.nan  # diverged: Optuna records a failed trial
            if dev >= args.target and not reached:
                reached.append(time.perf_counter() - start)
            tests[trial.number] = test
            trial.report(dev, epoch)
            if time.perf_counter() - start > args.budget_s:
                study.stop()
                raise OutOfTime
            if trial.should_prune():
                raise optuna.TrialPruned
        return best

    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=args.seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=args.min_epochs, reduction_factor=args.reduction_factor
        ),
    )
    start = time.perf_counter()
    study.optimize(objective, timeout=args.budget_s, catch=(OutOfTime,))
    wall = time.perf_counter() - start
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Complete trials have a value.
    picked = max(complete, key=lambda t: cast(float, t.value)) if complete else None
    print(
        json.dumps(
            {
                "wall_s": wall,
                "time_to_target_s": reached[0] if reached else None,
                "trials_started": started,
                "complete": len(complete),
                "pruned": states.count(optuna.trial.TrialState.PRUNED),
                "picked_dev_accuracy": picked.value if picked else None,
                "picked_test_accuracy": tests[picked.number] if picked else None,
            }
        )
    )


if __name__ == "__main__":
    main()
