"""The training engine: pure JAX/Flax/optax, no Optuna, no database, no HTTP."""

from caviar.models.namespace import lazy_members

__getattr__, __all__ = lazy_members(
    __name__,
    bucket="Bucket SHAPE_DEFAULTS Shape",
    data="Task Dataset DatasetError load_dataset",
    errors="CaviarError",
    export="ModelFileError TrainedModel load_model save_model",
    optim="OPTIMIZERS",
    program="HPARAM_DEFAULTS",
    runtime="use_every_core",
    train="TrainData evaluate predict train_batch",
)
