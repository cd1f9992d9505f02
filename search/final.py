"""The end of a search: refit the best configuration, test it once, read bias and variance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from caviar.models.data import Dataset
from caviar.models.train import Shape, TrainData, evaluate_splits, train_batch
from caviar.search.spec import SearchSpec
from caviar.search.trials import continuous_hparams, shape_of

#: Error above which a model underfits (avoidable bias, taking the best possible error as ~0),
#: and dev-minus-train gap above which it overfits (variance), both in points of error.
HIGH_BIAS_ERROR = 0.05
HIGH_VARIANCE_GAP = 0.03


@dataclass
class FinalFit:
    """The refit best model, its figures on every split, and the trained variables."""

    shape: Shape
    variables: dict
    figures: dict[str, float]  # train_*, dev_*, test_* metrics
    diagnosis: str
    epochs: int


def final_fit(
    spec: SearchSpec,
    dataset: Dataset,
    params: dict[str, Any],
    seed: int,
    best_epoch: int,
    trained: dict | None = None,
) -> FinalFit:
    """Retrain the best trial's configuration and evaluate it once on the held-out test split.

    `final_fit: train` retrains on train with the same seed, keeping the best dev epoch (early
    stopping), which reproduces the trial; `trained`, the trial's own best-epoch variables when
    this process has them, is used instead of retraining. `train_dev` refits on train+dev for the
    trial's best number of epochs, so dev no longer measures it; its dev figures are left out.
    """
    shape = shape_of(params, dataset)
    hparams = [continuous_hparams(params, seed)]
    if spec.final_fit == "train" and trained is not None:
        variables, epochs = trained, best_epoch
    elif spec.final_fit == "train_dev":
        x = np.concatenate([dataset.x_train, dataset.x_dev])
        y = np.concatenate([dataset.y_train, dataset.y_dev])
        data = TrainData.from_arrays(x, y, dataset.x_dev, dataset.y_dev, dataset.target_std)
        # No held-out data is left to pick an epoch with: train exactly best_epoch epochs.
        result = train_batch(
            shape, hparams, data, epochs=best_epoch, data_seed=spec.seed, keep_best=False
        )
        variables = result.trial_variables(0)
        epochs = best_epoch
    else:
        data = TrainData.from_arrays(
            dataset.x_train, dataset.y_train, dataset.x_dev, dataset.y_dev, dataset.target_std
        )
        result = train_batch(shape, hparams, data, epochs=best_epoch, data_seed=spec.seed)
        variables = result.trial_variables(0)
        epochs = result.trials[0].best_epoch or best_epoch
    figures: dict[str, float] = {}
    splits = {"train": (dataset.x_train, dataset.y_train), "test": (dataset.x_test, dataset.y_test)}
    if spec.final_fit == "train":
        splits["dev"] = (dataset.x_dev, dataset.y_dev)
    found = evaluate_splits(shape, variables, splits, dataset.target_std)
    for split, metrics in found.items():
        figures.update({f"{split}_{name}": value for name, value in metrics.items()})
    return FinalFit(shape, variables, figures, diagnose(figures, dataset.task), epochs)


def diagnose(figures: dict[str, float], task: str) -> str:
    """A bias/variance reading from train against dev (or test) error.

    Classification uses error = 1 - accuracy; regression uses 1 - R² (unexplained variance).
    """
    held_out = "dev" if "dev_loss" in figures else "test"
    if task == "classification":
        train, other = 1 - figures["train_accuracy"], 1 - figures[f"{held_out}_accuracy"]
        unit = "error"
    else:
        train, other = 1 - figures["train_r2"], 1 - figures[f"{held_out}_r2"]
        unit = "unexplained variance"
    high_bias = train > HIGH_BIAS_ERROR
    high_variance = other - train > HIGH_VARIANCE_GAP
    reading = {
        (True, True): "high bias and high variance",
        (True, False): "high bias",
        (False, True): "high variance",
        (False, False): "low bias and low variance",
    }[(high_bias, high_variance)]
    return f"{reading}: train {train:.1%} {unit}, {held_out} {other:.1%}"
