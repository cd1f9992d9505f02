"""One traced optimizer update for every family, and learning-rate decay.

gd, momentum, rmsprop, adam and adamw share one state (first moment, second moment, step count);
each trial's family is a traced integer, so trials of different families train in one compiled
program. A program computes only the families it is built for (`families`) and selects a trial's
own. Every hyperparameter is an array, so changing one never recompiles.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

OPTIMIZERS: tuple[str, ...] = ("gd", "momentum", "rmsprop", "adam", "adamw")
LR_DECAYS: tuple[str, ...] = ("none", "exponential", "inverse_time", "inverse_sqrt", "step")
#: The families that keep a first moment (use β1, `momentum`) and a second one (use β2 and ε).
FIRST_MOMENT_FAMILIES = frozenset({"momentum", "adam", "adamw"})
SECOND_MOMENT_FAMILIES = frozenset({"rmsprop", "adam", "adamw"})
#: The decays whose schedule reads `decay_rate` (see `lr_factor`).
RATED_DECAYS = frozenset({"exponential", "inverse_time", "step"})

Params = Any  # a pytree of arrays


class Moments(NamedTuple):
    """Optimizer state: first moment (momentum, adam, adamw), second (rmsprop, adam, adamw)."""

    first: Params
    second: Params
    # A NamedTuple field may shadow tuple.count at runtime; mypy rejects the override.
    count: jax.Array | np.int32  # type: ignore[assignment]  # steps taken (host: init_moments)


class Hyper(NamedTuple):
    """A trial's optimizer hyperparameters (traced scalars)."""

    family: jax.Array  # index into OPTIMIZERS
    learning_rate: jax.Array
    momentum: jax.Array  # β1
    beta2: jax.Array
    epsilon: jax.Array
    weight_decay: jax.Array  # adamw's decoupled decay (on `decay_mask` leaves)


def init_moments(params: Params) -> Moments:
    """Zero moments and step count (host arrays)."""
    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    return Moments(zeros, jax.tree_util.tree_map(np.zeros_like, params), np.int32(0))


def update(
    families: tuple[str, ...],
    hyper: Hyper,
    grads: Params,
    moments: Moments,
    params: Params,
    decay_mask: Params,
) -> tuple[Params, Moments]:
    """One step of the trial's family among `families`; returns (new params, new moments).

    gd: W -= α·dW. momentum: v = β1·v + (1-β1)·dW, W -= α·v. rmsprop: s = β2·s + (1-β2)·dW²,
    W -= α·dW/√(s+ε). adam: both moments, bias-corrected, W -= α·v̂/(√ŝ+ε). adamw: adam plus
    decoupled decay, W -= α·(v̂/(√ŝ+ε) + λ·W) on the `decay_mask` leaves.
    """
    b1, b2, eps = hyper.momentum, hyper.beta2, hyper.epsilon
    count = moments.count + 1
    uses_first = FIRST_MOMENT_FAMILIES & set(families)
    uses_second = SECOND_MOMENT_FAMILIES & set(families)
    tree = jax.tree_util.tree_map
    first = tree(lambda g, m: (1 - b1) * g + b1 * m, grads, moments.first) if uses_first else None
    second = (
        tree(lambda g, s: (1 - b2) * jnp.square(g) + b2 * s, grads, moments.second)
        if uses_second
        else None
    )
    t = count.astype(jnp.float32)

    def direction(family: str, g, m, s, w, decays):
        if family == "gd":
            return g
        if family == "momentum":
            return m
        if family == "rmsprop":
            return g * jax.lax.rsqrt(s + eps)
        adam = (m / (1 - b1**t)) / (jnp.sqrt(s / (1 - b2**t)) + eps)
        return adam + hyper.weight_decay * w if family == "adamw" and decays else adam

    def step(g, m, s, w, decays):
        chosen = direction(families[0], g, m, s, w, decays)
        for family in families[1:]:
            code = OPTIMIZERS.index(family)
            chosen = jnp.where(hyper.family == code, direction(family, g, m, s, w, decays), chosen)
        return w - hyper.learning_rate * chosen

    leaves, treedef = jax.tree_util.tree_flatten(params)
    up_to = treedef.flatten_up_to  # type: ignore[attr-defined]  # jaxlib has no PyTreeDef stub
    grads_, masks = up_to(grads), up_to(decay_mask)
    firsts = up_to(first) if first is not None else [None] * len(leaves)
    seconds = up_to(second) if second is not None else [None] * len(leaves)
    new = [step(*args) for args in zip(grads_, firsts, seconds, leaves, masks, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new), Moments(
        moments.first if first is None else first,
        moments.second if second is None else second,
        count,
    )


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
