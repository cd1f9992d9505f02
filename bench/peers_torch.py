"""The Optuna + PyTorch contender of `bench.peers`, run by the benchmark in its own virtualenv.

    <torch-venv>/bin/python bench/peers_torch.py DATA.npz --trials 32 --epochs 20 --seed S
    <torch-venv>/bin/python bench/peers_torch.py DATA.npz --configs CONFIGS.json --epochs 20

Imports only NumPy, PyTorch and Optuna (never Caviar): a plain Optuna script with a per-trial
PyTorch loop on the CPU (with `--configs`, no Optuna: it trains the listed configurations, each
with optional `hidden` widths and `optimizer`, momentum or adam). DATA.npz holds the ready splits
(x, y, x_dev, y_dev, x_test, y_test).
The update rule matches Caviar's momentum (v = β·v + (1-β)·dW): PyTorch's SGD keeps
v = β·v + dW, so its learning rate is lr·(1-β). The L2 cost is λ/(2m)·Σ‖W‖², weights only, and
minibatches are drawn by indexing tensors with a permutation (faster than a DataLoader).
Prints one JSON line: wall time, and per trial epochs, best dev accuracy, test accuracy there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Iterator

import numpy as np
import optuna
import torch
from torch import nn

HIDDEN = (256, 256)
BATCH = 128


def mlp(features: int, classes: int, seed: int, hidden=HIDDEN) -> nn.Sequential:
    """features→hidden→classes ReLU with He-normal weights and zero biases, as Caviar does."""
    torch.manual_seed(seed)
    sizes = [features, *hidden, classes]
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def epochs_of(
    hp: dict, data: dict[str, torch.Tensor], epochs: int
) -> Iterator[tuple[int, float, float, float]]:
    """Train one trial, yielding (epoch, dev accuracy, best dev so far, test accuracy at that
    best) after each epoch; a diverged trial yields a NaN dev accuracy and stops."""
    model = mlp(data["x"].shape[1], int(data["y"].max()) + 1, hp["seed"], hp.get("hidden", HIDDEN))
    beta = hp["momentum"]
    if hp.get("optimizer", "momentum") == "adam":
        betas = (beta, hp.get("beta2", 0.999))
        optimizer = torch.optim.Adam(model.parameters(), lr=hp["learning_rate"], betas=betas)
    else:  # Caviar's v = β·v + (1-β)·dW is PyTorch's SGD with lr·(1-β)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=hp["learning_rate"] * (1 - beta), momentum=beta
        )
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    best_dev, best_test = -1.0, math.nan
    n = len(data["y"])
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        for step in range(n // BATCH):
            rows = order[step * BATCH : (step + 1) * BATCH]
            loss = loss_fn(model(data["x"][rows]), data["y"][rows])
            loss = loss + hp["l2"] / (2 * BATCH) * sum((w * w).sum() for w in weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not math.isfinite(float(loss)):
            yield epoch, math.nan, best_dev, best_test
            return
        dev = accuracy(model, data["x_dev"], data["y_dev"])
        if dev > best_dev:
            best_dev, best_test = dev, accuracy(model, data["x_test"], data["y_test"])
        yield epoch, dev, best_dev, best_test


def train_trial(hp: dict, data: dict[str, torch.Tensor], epochs: int) -> tuple[int, float, float]:
    """(epochs trained, best dev accuracy, test accuracy at that epoch); NaN ones if diverged."""
    last = (0, math.nan, math.nan, math.nan)
    for last in epochs_of(hp, data, epochs):  # noqa: B007 (the last epoch's figures are kept)
        pass
    epoch, dev, best_dev, best_test = last
    if math.isnan(dev):
        return epoch, math.nan, math.nan
    return epoch, best_dev, best_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of Optuna's RandomSampler")
    parser.add_argument("--configs", help="JSON list of configurations to train instead")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with np.load(args.data) as arrays:
        data = {
            name: torch.from_numpy(arrays[name]).to(
                torch.long if name.startswith("y") else torch.float32
            )
            for name in ("x", "y", "x_dev", "y_dev", "x_test", "y_test")
        }
    outcomes: list[tuple[int, float, float]] = []

    def objective(trial: optuna.Trial) -> float:
        hp = {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1.0, log=True),
            "momentum": 1 - trial.suggest_float("one_minus_momentum", 1e-3, 1e-1, log=True),
            "l2": trial.suggest_float("l2", 1e-6, 1e-2, log=True),
            "seed": trial.number,
        }
        outcomes.append(train_trial(hp, data, args.epochs))
        return outcomes[-1][1]  # NaN (diverged): Optuna records a failed trial

    if args.configs:
        with open(args.configs) as file:
            configs = json.load(file)
        start = time.perf_counter()
        outcomes = [train_trial(hp, data, args.epochs) for hp in configs]
    else:
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.RandomSampler(seed=args.seed)
        )
        start = time.perf_counter()
        study.optimize(objective, n_trials=args.trials)
    wall = time.perf_counter() - start
    epochs, devs, tests = (list(column) for column in zip(*outcomes, strict=True))
    print(json.dumps({"wall_s": wall, "epochs": epochs, "devs": devs, "tests": tests}))


if __name__ == "__main__":
    main()
