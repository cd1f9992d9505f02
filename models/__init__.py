"""The training engine: pure JAX/Flax/optax, no Optuna, no database, no HTTP."""

from caviar.models.namespace import lazy_members

_MEMBERS = {
    "Bucket": "bucket",
    "SHAPE_DEFAULTS": "bucket",
    "Shape": "bucket",
    "Task": "data",
    "Dataset": "data",
    "DatasetError": "data",
    "load_dataset": "data",
    "CaviarError": "errors",
    "ModelFileError": "export",
    "TrainedModel": "export",
    "load_model": "export",
    "save_model": "export",
    "OPTIMIZERS": "optim",
    "HPARAM_DEFAULTS": "program",
    "use_every_core": "runtime",
    "TrainData": "train",
    "evaluate": "train",
    "predict": "train",
    "train_batch": "train",
}
__all__ = sorted(_MEMBERS)
__getattr__ = lazy_members(__name__, _MEMBERS)
