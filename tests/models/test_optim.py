"""The one traced optimizer update follows optax's own optimizers step by step, for every family."""

import jax
import jax.numpy as jnp
import numpy as np
import optax  # type: ignore[import-untyped]  # optax ships no py.typed marker
import pytest

from caviar.models.optim import OPTIMIZERS, Hyper, init_moments, lr_factor, update

LR, B1, B2, EPS, WD = 0.03, 0.8, 0.95, 1e-3, 0.1
PARAMS = {"kernel": (jnp.asarray([[0.5, -1.0], [2.0, 0.1]]),), "bias": (jnp.asarray([0.3, -0.2]),)}
DECAYS = {"kernel": (True,), "bias": (False,)}


def optax_reference(family: str) -> optax.GradientTransformation:
    """optax's optimizer with the practice's update rule for each family."""
    return {
        "gd": optax.sgd(LR),
        # v = β·v + (1-β)·dW: optax's exponential moving average, not sgd's trace (v = β·v + dW).
        "momentum": optax.chain(optax.ema(B1, debias=False), optax.scale_by_learning_rate(LR)),
        "rmsprop": optax.rmsprop(LR, decay=B2, eps=EPS, eps_in_sqrt=True),
        "adam": optax.adam(LR, b1=B1, b2=B2, eps=EPS),
        "adamw": optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, mask=DECAYS),
    }[family]


def gradients(step: int):
    rng = np.random.default_rng(step)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS)


def hyper(family: str) -> Hyper:
    values = (OPTIMIZERS.index(family), LR, B1, B2, EPS, WD)
    return Hyper(*(jnp.asarray(v) for v in values))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("family", OPTIMIZERS)
def test_every_family_matches_optax_step_by_step(family, jit):
    """In a program built for every family, each family's trial follows optax's optimizer."""

    def step(h, g, m, p):
        return update(OPTIMIZERS, h, g, m, p, DECAYS)

    step = jax.jit(step) if jit else step
    tx = optax_reference(family)
    ours, moments = PARAMS, init_moments(PARAMS)
    theirs, state = PARAMS, tx.init(PARAMS)
    for t in range(6):
        grads = gradients(t)
        ours, moments = step(hyper(family), grads, moments, ours)
        updates, state = tx.update(grads, state, theirs)
        theirs = optax.apply_updates(theirs, updates)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ours, theirs
        )


def test_families_side_by_side_in_one_vmapped_update():
    """Trials of five families in one vmapped call each take their own family's step."""
    grads = gradients(0)
    batched = jax.vmap(
        lambda h, g, m, p: update(OPTIMIZERS, h, g, m, p, DECAYS), in_axes=(0, None, None, None)
    )
    stacked = Hyper(*(jnp.stack(column) for column in zip(*map(hyper, OPTIMIZERS), strict=True)))
    params, _ = jax.jit(batched)(stacked, grads, init_moments(PARAMS), PARAMS)
    for row, family in enumerate(OPTIMIZERS):
        tx = optax_reference(family)
        updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
        want = optax.apply_updates(PARAMS, updates)
        jax.tree_util.tree_map(
            lambda a, b, r=row: np.testing.assert_allclose(a[r], b, rtol=1e-5), params, want
        )


def test_momentum_is_the_exponentially_weighted_average():
    grads = [np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, -1.0])]
    v, w = np.zeros(3), np.zeros(3)
    params = {"w": jnp.zeros(3)}
    moments = init_moments(params)
    for g in grads:
        v = B1 * v + (1 - B1) * g
        w = w - LR * v
        params, moments = update(
            ("momentum",), hyper("momentum"), {"w": jnp.asarray(g)}, moments, params, {"w": True}
        )
    np.testing.assert_allclose(params["w"], w, rtol=1e-6)


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
