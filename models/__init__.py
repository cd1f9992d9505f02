"""The training engine: pure JAX/Flax/optax, no Optuna, no database, no HTTP."""

from typing import TYPE_CHECKING

from caviar.models.namespace import lazy_members

if TYPE_CHECKING:  # what each name is, for type checkers; imported on first use otherwise
    from caviar.models.bucket import SHAPE_DEFAULTS, Bucket, Shape
    from caviar.models.data import Dataset, DatasetError, Task, load_dataset
    from caviar.models.errors import CaviarError
    from caviar.models.export import ModelFileError, TrainedModel, load_model, save_model
    from caviar.models.optim import OPTIMIZERS
    from caviar.models.program import HPARAM_DEFAULTS
    from caviar.models.runtime import use_every_core
    from caviar.models.train import (
        Lane,
        TrainData,
        evaluate,
        predict,
        train_batch,
        train_buckets,
    )

__all__ = [
    "HPARAM_DEFAULTS",
    "OPTIMIZERS",
    "SHAPE_DEFAULTS",
    "Bucket",
    "CaviarError",
    "Dataset",
    "DatasetError",
    "Lane",
    "ModelFileError",
    "Shape",
    "Task",
    "TrainData",
    "TrainedModel",
    "evaluate",
    "load_dataset",
    "load_model",
    "predict",
    "save_model",
    "train_batch",
    "train_buckets",
    "use_every_core",
]
__getattr__ = lazy_members(__name__, __file__)
