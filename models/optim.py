"""Optimizers and learning-rate decay, with every continuous hyperparameter injected as an array.

One optimizer object is built per (family, parameter structure); the per-trial values live in
`opt_state.hyperparams` (optax `inject_hyperparams`), so changing them never recompiles.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS: tuple[str, ...] = ("gd", "momentum", "rmsprop", "adam", "adamw")
LR_DECAYS: tuple[str, ...] = ("none", "exponential", "inverse_time", "inverse_sqrt", "step")


def _gd(learning_rate):
    return optax.sgd(learning_rate)


def _momentum(learning_rate, momentum):
    # v = β·v + (1-β)·dW ; W -= α·v   (the exponentially weighted form, no bias correction)
    return optax.chain(
        optax.ema(momentum, debias=False), optax.scale_by_learning_rate(learning_rate)
    )


def _rmsprop(learning_rate, beta2, epsilon):
    # s = β2·s + (1-β2)·dW² ; W -= α·dW/√(s+ε)
    return optax.rmsprop(learning_rate, decay=beta2, eps=epsilon, eps_in_sqrt=True)


def _adam(learning_rate, momentum, beta2, epsilon):
    return optax.adam(learning_rate, b1=momentum, b2=beta2, eps=epsilon)


def _adamw(learning_rate, momentum, beta2, epsilon, weight_decay, mask):
    return optax.adamw(
        learning_rate, b1=momentum, b2=beta2, eps=epsilon, weight_decay=weight_decay, mask=mask
    )


# Values the state starts with before `set_hyperparams` writes the trial's own.
_PLACEHOLDERS = {"learning_rate": 0.0, "momentum": 0.9, "beta2": 0.999, "epsilon": 1e-8}

_FACTORIES = {"gd": _gd, "momentum": _momentum, "rmsprop": _rmsprop, "adam": _adam, "adamw": _adamw}


def make_optimizer(family: str, weight_mask=None) -> optax.GradientTransformation:
    """The shape's single optimizer object; its hyperparameters are set per trial in the state.

    `weight_mask` (adamw only) selects the weights that decoupled weight decay applies to.
    """
    if family not in _FACTORIES:
        raise ValueError(f"unknown optimizer {family!r}; expected one of {OPTIMIZERS}")
    if family == "adamw":
        return optax.inject_hyperparams(_adamw, static_args="mask")(
            **_PLACEHOLDERS, weight_decay=0.0, mask=weight_mask
        )
    factory = _FACTORIES[family]
    names = inspect.signature(factory).parameters
    return optax.inject_hyperparams(factory)(**{name: _PLACEHOLDERS[name] for name in names})


def set_hyperparams(opt_state, values: dict[str, jax.Array]):
    """Return `opt_state` with the injected hyperparameters it has replaced by `values`."""
    hp = dict(opt_state.hyperparams)
    for name in hp:
        if name in values:
            hp[name] = jnp.asarray(values[name], dtype=jnp.asarray(hp[name]).dtype)
    return opt_state._replace(hyperparams=hp)


def lr_factor(
    decay_code: jax.Array, decay_rate: jax.Array, epoch: jax.Array, decay_every: int
) -> jax.Array:
    """Multiplier of the initial learning rate at `epoch` (0-based) for `LR_DECAYS[decay_code]`.

    exponential: rate^epoch; inverse_time: 1/(1+rate·epoch); inverse_sqrt: 1/√(epoch+1);
    step: rate^⌊epoch/decay_every⌋ (a staircase).
    """
    e = jnp.asarray(epoch, jnp.float32)
    factors = jnp.stack(
        [
            jnp.ones_like(e),
            decay_rate**e,
            1.0 / (1.0 + decay_rate * e),
            1.0 / jnp.sqrt(e + 1.0),
            decay_rate ** jnp.floor(e / decay_every),
        ]
    )
    return factors[decay_code]
