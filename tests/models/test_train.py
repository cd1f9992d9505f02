"""The batched training engine, on the CPU with tiny data."""

from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from caviar.models.data import load_dataset
from caviar.models.mlp import MLP, sum_squared_weights
from caviar.models.program import cost, init_trial, trial_arrays
from caviar.models.train import (
    Bucket,
    Shape,
    TrainData,
    compile_count,
    evaluate,
    evaluate_splits,
    initial_variables,
    predict,
    train_batch,
)


@pytest.fixture(scope="module")
def blobs():
    return load_dataset({"name": "synthetic", "samples": 700, "features": 8, "classes": 3}, seed=1)


@pytest.fixture(scope="module")
def data(blobs):
    return TrainData.from_arrays(blobs.x_train, blobs.y_train, blobs.x_dev, blobs.y_dev)


def shape_for(blobs, **overrides):
    fields = dict(
        input_dim=blobs.num_features,
        num_outputs=blobs.num_outputs,
        hidden=(16, 16),
        optimizer="momentum",
        batch_size=32,
    )
    return Shape(**{**fields, **overrides})


TRIALS = [
    {"learning_rate": 0.05, "momentum": 0.9, "l2": 1e-3, "seed": 0},
    {"learning_rate": 0.01, "momentum": 0.99, "l2": 0.0, "seed": 1},
    {"learning_rate": 0.2, "momentum": 0.5, "l2": 1e-2, "seed": 2},
    {"learning_rate": 0.003, "momentum": 0.95, "l2": 1e-4, "seed": 3},
]


def test_gradient_check_float64_of_the_engines_padded_cost_with_l2():
    """Two-sided differences agree with jax.grad to 1e-7 relative difference (Ng's check), on
    the engine's own minibatch cost (L2 included) of a trial padded inside a larger bucket."""
    shape = Shape(4, 3, (5, 4), activation="tanh", optimizer="momentum", batch_size=6)
    bucket = Bucket.envelope([shape, Shape(4, 3, (7, 6, 2), batch_size=6)])
    with jax.enable_x64(True):
        hp = {k: jnp.asarray(v[0]) for k, v in trial_arrays(bucket, [shape], [{"l2": 0.7}]).items()}
        state = jax.tree_util.tree_map(jnp.asarray, init_trial(bucket, shape, {}))
        real = [(k != 0).astype(jnp.float64) for k in state.params["kernel"]]
        masks = {"kernel": tuple(real), "bias": tuple(m.max(0) for m in real)}
        params = jax.tree_util.tree_map(
            lambda p, m: (p + 0.1) * m,
            state.params,
            masks,  # padding stays exactly zero
        )
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(6, 4)))
        y = jnp.asarray(rng.integers(0, 3, size=6))
        key = jax.random.PRNGKey(0)
        flat, unravel = ravel_pytree(params)
        assert flat.dtype == jnp.float64

        @jax.jit
        def total(flat):
            return cost(bucket, unravel(flat), state.stats, hp, x, y, key)[0]

        analytic = jax.grad(total)(flat)
        eps = 1e-6
        steps = jnp.eye(flat.size) * eps
        numeric = jax.vmap(lambda e: (total(flat + e) - total(flat - e)) / (2 * eps))(steps)
        difference = np.linalg.norm(numeric - analytic) / (
            np.linalg.norm(numeric) + np.linalg.norm(analytic)
        )
        assert difference < 1e-7
        padded = np.asarray(ravel_pytree(masks)[0]) == 0
        assert padded.any() and not np.any(np.asarray(analytic)[padded])


def test_l2_applies_to_weights_not_biases():
    params = {"Dense_0": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 5.0)}}
    assert float(sum_squared_weights(params)) == pytest.approx(24.0)


def test_one_epoch_changes_every_parameter(blobs, data):
    shape = shape_for(blobs)
    before = initial_variables(shape, TRIALS[:1])[0]
    result = train_batch(shape, TRIALS[:1], data, epochs=1)
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(a != b)), before["params"], result.trial_variables(0)["params"]
    )
    assert all(jax.tree_util.tree_leaves(changed))


def test_batch_matches_trials_trained_one_by_one(blobs, data):
    shape = shape_for(blobs, use_dropout=True)
    trials = [dict(t, dropout=d) for t, d in zip(TRIALS, [0.0, 0.2, 0.1, 0.3], strict=True)]
    together = train_batch(shape, trials, data, epochs=3, data_seed=7, group_size=4)
    for i, trial in enumerate(trials):
        alone = train_batch(shape, [trial], data, epochs=3, data_seed=7)
        for name in ("train_loss", "dev_loss", "dev_accuracy"):
            got = [h[name] for h in together.trials[i].history]
            want = [h[name] for h in alone.trials[0].history]
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


def test_one_compile_serves_every_trial_of_a_shape(blobs, data):
    shape = shape_for(blobs, hidden=(24,), optimizer="adam")
    first = [
        {"learning_rate": lr, "momentum": b1, "beta2": b2, "l2": l2, "seed": i}
        for i, (lr, b1, b2, l2) in enumerate(
            [
                (1e-3, 0.9, 0.999, 0.0),
                (1e-2, 0.8, 0.99, 1e-3),
                (3e-3, 0.95, 0.9, 1e-2),
                (1e-4, 0.5, 0.9999, 0.1),
            ]
        )
    ]
    before = compile_count()
    train_batch(shape, first, data, epochs=2)
    assert compile_count() == before + 1
    second = [dict(t, learning_rate=t["learning_rate"] * 3, seed=t["seed"] + 10) for t in first]
    train_batch(shape, second, data, epochs=2)
    assert compile_count() == before + 1


def test_diverging_trial_is_reported_and_the_rest_train_normally(blobs, data):
    shape = shape_for(blobs)
    exploding = {"learning_rate": 1e6, "momentum": 0.9, "seed": 9}
    result = train_batch(shape, [TRIALS[0], exploding, TRIALS[1]], data, epochs=4, group_size=3)
    assert [t.status for t in result.trials] == ["completed", "diverged", "completed"]
    assert result.trials[1].epochs < 4
    healthy = train_batch(shape, [TRIALS[0], TRIALS[1]], data, epochs=4)
    for got, want in zip([result.trials[0], result.trials[2]], healthy.trials, strict=True):
        assert got.best["dev_accuracy"] == pytest.approx(want.best["dev_accuracy"], abs=1e-6)
        assert np.isfinite(got.history[-1]["train_loss"])


def test_callback_stops_trials_and_they_stop_training(blobs, data):
    shape = shape_for(blobs)
    seen = []

    def stop_second_after_two_epochs(report):
        seen.append(report.trained.copy())
        return np.array([False, report.round >= 2, False])

    result = train_batch(shape, TRIALS[:3], data, epochs=5, callback=stop_second_after_two_epochs)
    assert [t.epochs for t in result.trials] == [5, 2, 5]
    assert result.trials[1].status == "stopped"
    assert [bool(mask[1]) for mask in seen] == [True, True, False, False, False]


def test_best_epoch_is_kept(blobs, data):
    result = train_batch(shape_for(blobs), TRIALS[:2], data, epochs=6)
    for trial in result.trials:
        best = max(h["dev_accuracy"] for h in trial.history)
        assert trial.best["dev_accuracy"] == pytest.approx(best)
        assert trial.best_epoch is not None
        assert trial.history[trial.best_epoch - 1]["dev_accuracy"] == pytest.approx(best)


def test_best_variables_reproduce_the_best_dev_metric(blobs, data):
    shape = shape_for(blobs, batch_norm=True)
    result = train_batch(shape, TRIALS[:2], data, epochs=4)
    for i, trial in enumerate(result.trials):
        metrics = evaluate(shape, result.trial_variables(i), blobs.x_dev, blobs.y_dev)
        assert metrics["accuracy"] == pytest.approx(trial.best["dev_accuracy"], abs=1e-6)
        predicted = predict(shape, result.trial_variables(i), blobs.x_dev)
        assert np.mean(predicted == blobs.y_dev) == pytest.approx(metrics["accuracy"], abs=1e-6)


def test_every_split_is_evaluated_as_alone_in_one_compiled_program(blobs, data):
    shape = shape_for(blobs, hidden=(13, 7), batch_norm=True)  # a shape no other test evaluates
    variables = train_batch(shape, TRIALS[:1], data, epochs=2).trial_variables(0)
    splits = {
        "train": (blobs.x_train, blobs.y_train),
        "dev": (blobs.x_dev, blobs.y_dev),
        "test": (blobs.x_test, blobs.y_test),
    }
    compiles: list[str] = []  # the evaluation programs compiled (not JAX's own small ones)

    def note(event: str, duration_secs: float, **metadata: str | int) -> None:
        if (
            event.endswith("backend_compile_duration")
            and metadata.get("fun_name") == "jit(metrics)"
        ):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(note)
    try:
        together = evaluate_splits(shape, variables, splits)
        assert len(compiles) == 1  # one program for the three sizes of split
        for name, (x, y) in splits.items():
            assert together[name] == pytest.approx(evaluate(shape, variables, x, y), rel=1e-5)
        assert len(compiles) == 1 + 3  # alone, each size of split compiles its own
    finally:
        jax.monitoring.unregister_event_duration_listener(note)


def test_dropout_only_in_training_mode():
    model = MLP(hidden=(64,), num_outputs=2, use_dropout=True)
    x = jnp.ones((4, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    # Without `mutable`, `apply` returns only the output (flax types it as maybe a tuple).
    run = lambda seed: cast(  # noqa: E731
        jax.Array,
        model.apply(
            variables, x, train=True, dropout_rate=0.5, rngs={"dropout": jax.random.PRNGKey(seed)}
        ),
    )
    assert not np.allclose(run(1), run(2))
    evaluated = cast(jax.Array, model.apply(variables, x, train=False, dropout_rate=0.5))
    without = cast(jax.Array, MLP(hidden=(64,), num_outputs=2).apply(variables, x, train=False))
    np.testing.assert_allclose(evaluated, without)


def test_inverted_dropout_keeps_the_expected_activation():
    from caviar.models.mlp import inverted_dropout

    x = jnp.ones((200_000,))
    dropped = inverted_dropout(x, jnp.float32(0.3), jax.random.PRNGKey(0))
    assert float(jnp.mean(dropped == 0)) == pytest.approx(0.3, abs=0.01)
    assert float(jnp.mean(dropped)) == pytest.approx(1.0, abs=0.01)
    assert float(jnp.max(dropped)) == pytest.approx(1 / 0.7)


def test_batch_norm_uses_batch_statistics_in_training_and_running_averages_in_eval():
    model = MLP(hidden=(8,), num_outputs=2, batch_norm=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 3)) * 3.0 + 5.0
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    train_out, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    eval_out = cast(jax.Array, model.apply(variables, x, train=False))
    assert not np.allclose(train_out, eval_out)
    mean = updated["batch_stats"]["BatchNorm_0"]["mean"]
    # Running mean moves 10% of the way from 0 towards this batch's mean (momentum 0.9).
    z = x @ variables["params"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(mean, 0.1 * z.mean(0), rtol=1e-4, atol=1e-5)


def test_regression_reports_mse_on_the_original_scale_and_r2():
    ds = load_dataset({"name": "synthetic", "task": "regression", "samples": 600, "features": 5})
    data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev, ds.target_std)
    shape = Shape(ds.num_features, 1, (32,), optimizer="adam", batch_size=32, task="regression")
    result = train_batch(shape, [{"learning_rate": 1e-2}], data, epochs=30)
    best = result.trials[0].best
    assert best["dev_r2"] > 0.9
    assert best["dev_mse"] == pytest.approx(best["dev_loss"] * ds.target_std**2, rel=1e-4)
    assert result.trials[0].history[-1]["train_mse"] < result.trials[0].history[0]["train_mse"]


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "rmsprop", "adam", "adamw"])
def test_every_optimizer_learns(blobs, data, optimizer):
    lr = {"gd": 0.1, "momentum": 0.1}.get(optimizer, 3e-3)
    shape = shape_for(blobs, optimizer=optimizer)
    result = train_batch(shape, [{"learning_rate": lr, "l2": 1e-3}], data, epochs=8)
    history = result.trials[0].history
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert result.trials[0].best["dev_accuracy"] > 0.6


def test_batch_larger_than_training_set_is_a_clear_error(blobs, data):
    with pytest.raises(ValueError, match="batch_size 4096 exceeds"):
        train_batch(shape_for(blobs, batch_size=4096), TRIALS[:1], data, epochs=1)
