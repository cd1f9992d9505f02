"""Optimizer update rules and learning-rate decay follow the formulas of the practice."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.optim import lr_factor, make_optimizer, set_hyperparams


def run(family, grads, **values):
    params = {"w": jnp.zeros(3)}
    tx = make_optimizer(family)
    state = set_hyperparams(tx.init(params), values)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["w"])


GRADS = [np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0])]


def test_momentum_is_the_exponentially_weighted_average():
    lr, beta = 0.1, 0.9
    v, w = np.zeros(3), np.zeros(3)
    for g in GRADS:
        v = beta * v + (1 - beta) * g
        w = w - lr * v
    np.testing.assert_allclose(
        run("momentum", GRADS, learning_rate=lr, momentum=beta), w, rtol=1e-6
    )


def test_rmsprop_divides_by_root_of_s_plus_epsilon():
    lr, beta2, eps = 0.01, 0.99, 1e-8
    s, w = np.zeros(3), np.zeros(3)
    for g in GRADS:
        s = beta2 * s + (1 - beta2) * g**2
        w = w - lr * g / np.sqrt(s + eps)
    got = run("rmsprop", GRADS, learning_rate=lr, beta2=beta2, epsilon=eps)
    np.testing.assert_allclose(got, w, rtol=1e-5)


def test_adam_is_bias_corrected():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    v, s, w = np.zeros(3), np.zeros(3), np.zeros(3)
    for t, g in enumerate(GRADS, start=1):
        v = b1 * v + (1 - b1) * g
        s = b2 * s + (1 - b2) * g**2
        w = w - lr * (v / (1 - b1**t)) / (np.sqrt(s / (1 - b2**t)) + eps)
    got = run("adam", GRADS, learning_rate=lr, momentum=b1, beta2=b2, epsilon=eps)
    np.testing.assert_allclose(got, w, rtol=1e-5)


@pytest.mark.parametrize(
    ("code", "rate", "epoch", "expected"),
    [
        (0, 0.5, 7, 1.0),  # none
        (1, 0.95, 3, 0.95**3),  # exponential
        (2, 1.0, 4, 1 / 5),  # inverse_time
        (3, 0.0, 3, 0.5),  # inverse_sqrt: 1/sqrt(epoch+1)
        (4, 0.5, 25, 0.25),  # step every 10 epochs
    ],
)
def test_learning_rate_decay(code, rate, epoch, expected):
    got = lr_factor(jnp.int32(code), jnp.float32(rate), jnp.int32(epoch), decay_every=10)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
        make_optimizer("sgdx")
