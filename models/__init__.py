"""The training engine: pure JAX/Flax/optax, no Optuna, no database, no HTTP."""
