"""Padding is exact: a trial trained inside a larger bucket computes what it computes alone.

One bucket holds trials of every activation and every optimizer family, with batch norm on and
off, dropout on and off, 1 to 3 hidden layers and different widths; each is compared with the
same trial trained alone in its own exact shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caviar.models.data import load_dataset
from caviar.models.export import TrainedModel, load_model, save_model
from caviar.models.program import evaluate, forward, init_trial, train_epoch, trial_arrays
from caviar.models.train import Bucket, Shape, TrainData, train_batch

EPOCHS = 3


def _shape(hidden, activation, optimizer, batch_norm=False, dropout=False) -> Shape:
    return Shape(8, 3, hidden, activation, batch_norm, optimizer, 32, use_dropout=dropout)


SHAPES = [
    _shape((16, 12), "relu", "gd", batch_norm=True),
    _shape((24,), "leaky_relu", "momentum", dropout=True),
    _shape((5, 7, 9), "tanh", "rmsprop", batch_norm=True, dropout=True),
    _shape((20, 4), "sigmoid", "adam"),
    _shape((9, 30, 3), "gelu", "adamw", dropout=True),
]
HPARAMS: list[dict[str, Any]] = [
    {"learning_rate": 0.1, "l2": 1e-2, "seed": 0},
    {"learning_rate": 0.2, "momentum": 0.8, "l2": 1e-3, "dropout": 0.3, "seed": 1},
    {"learning_rate": 3e-3, "beta2": 0.99, "epsilon": 1e-6, "dropout": 0.1, "seed": 2},
    {"learning_rate": 1e-2, "momentum": 0.85, "l2": 1e-1, "init": "xavier", "seed": 3},
    {"learning_rate": 5e-3, "l2": 1.0, "dropout": 0.2, "init": "glorot", "seed": 4},
]


@pytest.fixture(scope="module")
def blobs():
    return load_dataset({"name": "synthetic", "samples": 700, "features": 8, "classes": 3}, seed=1)


@pytest.fixture(scope="module")
def data(blobs):
    return TrainData.from_arrays(blobs.x_train, blobs.y_train, blobs.x_dev, blobs.y_dev)


@pytest.fixture(scope="module")
def together(data):
    return train_batch(SHAPES, HPARAMS, data, epochs=EPOCHS, data_seed=7)


def test_one_bucket_holds_every_kind_of_trial(together):
    bucket = together.bucket
    assert bucket.widths == (24, 30, 9) and (bucket.min_depth, bucket.batch_norm) == (1, True)
    assert len(bucket.activations) == len(bucket.optimizers) == 5 and bucket.dropout


@pytest.mark.parametrize("index", range(len(SHAPES)), ids=[s.optimizer for s in SHAPES])
def test_padded_trial_matches_the_trial_alone(data, together, index):
    alone = train_batch(SHAPES[index], [HPARAMS[index]], data, epochs=EPOCHS, data_seed=7)
    assert alone.bucket == Bucket.exact(SHAPES[index])
    got, want = together.trials[index], alone.trials[0]
    assert got.best_epoch == want.best_epoch and got.epochs == want.epochs == EPOCHS
    for name in want.history[0]:
        np.testing.assert_allclose(
            [h[name] for h in got.history],
            [h[name] for h in want.history],
            rtol=1e-4,
            atol=1e-5,
            err_msg=name,
        )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        together.trial_variables(index),
        alone.trial_variables(0),
    )


@pytest.mark.parametrize("index", range(len(SHAPES)), ids=[s.optimizer for s in SHAPES])
def test_kept_variables_have_the_real_shape_and_padding_stays_zero(together, index):
    shape = SHAPES[index]
    variables = together.trial_variables(index)
    template = jax.eval_shape(
        lambda x: shape.model.init(jax.random.PRNGKey(0), x, train=False),
        jax.ShapeDtypeStruct((1, shape.input_dim), jnp.float32),
    )
    assert jax.tree_util.tree_map(np.shape, variables) == jax.tree_util.tree_map(
        lambda leaf: leaf.shape, dict(template)
    )
    if not shape.batch_norm:
        count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
        assert count == shape.num_parameters
    assert _padding(together.bucket, shape, together.kept[index]) == 0.0


def test_padding_stays_zero_in_optimizer_moments_and_batch_norm_statistics(data):
    """One epoch of the pure programs: padded moments and statistics are exactly zero."""
    bucket = Bucket.envelope(SHAPES)
    program = jax.jit(
        lambda state, hp, order: train_epoch(
            bucket,
            ("dev_accuracy", True),
            10,
            state,
            hp,
            data.x_train,
            data.y_train,
            order,
            data.x_dev,
            data.y_dev,
            jnp.int32(0),
            jnp.float32(1.0),
        )
    )
    stacked = trial_arrays(bucket, SHAPES, HPARAMS)
    order = jnp.arange(8 * 32).reshape(8, 32)
    for index in (1, 2, 4):  # momentum, rmsprop with batch norm, adamw
        hp = {name: jnp.asarray(values[index]) for name, values in stacked.items()}
        state, _ = program(init_trial(bucket, SHAPES[index], HPARAMS[index]), hp, order)
        for tree in (state.params, state.moments.first, state.moments.second):
            assert _padding(bucket, SHAPES[index], (tree, state.stats)) == 0.0
        assert np.any(np.asarray(state.moments.second["kernel"][0]))


def test_exported_model_predicts_what_the_padded_trial_predicted(blobs, together):
    index = 2  # batch norm and dropout: eval mode must use running averages and no dropout
    shape = SHAPES[index]
    model = TrainedModel(
        shape=shape,
        variables=together.trial_variables(index),
        feature_mean=blobs.feature_mean,
        feature_std=blobs.feature_std,
    )
    loaded = load_model(save_model(model))
    assert loaded.shape == shape and loaded.shape.hidden == (5, 7, 9)
    assert loaded.variables["params"]["Dense_0"]["kernel"].shape == (8, 5)
    hp = {
        k: jnp.asarray(v[index]) for k, v in trial_arrays(together.bucket, SHAPES, HPARAMS).items()
    }
    params, stats = jax.tree_util.tree_map(jnp.asarray, together.kept[index])
    out, _ = forward(together.bucket, params, stats, hp, jnp.asarray(blobs.x_test), train=False)
    raw = blobs.x_test.astype(np.float64) * blobs.feature_std + blobs.feature_mean
    np.testing.assert_array_equal(loaded.predict(raw), np.argmax(np.asarray(out), -1))


def _padding(bucket: Bucket, shape: Shape, trees) -> float:
    """The largest |value| of the padded arrays outside `shape`'s real units."""
    params, stats = trees
    rows = (shape.input_dim, *shape.hidden)
    depth = len(shape.hidden)
    largest = 0.0

    def outside(array, *real) -> float:
        rest = np.array(array, copy=True)
        rest[tuple(slice(0, n) for n in real)] = 0
        return float(np.max(np.abs(rest), initial=0.0))

    for position in range(len(bucket.widths)):
        width = shape.hidden[position] if position < depth else 0
        in_rows = rows[position] if position < depth else 0
        largest = max(largest, outside(params["kernel"][position], in_rows, width))
        for name in ("bias", "scale", "shift"):
            if name in params:
                largest = max(largest, outside(params[name][position], width))
        for name in stats:
            largest = max(largest, outside(stats[name][position], width))
    return max(largest, outside(params["kernel"][-1], shape.hidden[-1], shape.num_outputs))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_dev_set_evaluated_in_chunks_gives_the_metrics_of_one_piece(task):
    """What the epoch program evaluates a large dev set with: chunk by chunk (the last one
    padded), the same metrics as all of it at once, batch norm's running statistics included."""
    outputs = 3 if task == "classification" else 1
    shapes = [Shape(8, outputs, (12, 7), "tanh", True, "adam", 32, task=task)]
    bucket = Bucket.envelope(shapes)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((103, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 103) if task == "classification" else rng.random(103))
    state = init_trial(bucket, shapes[0], {"seed": 5})
    stats = jax.tree_util.tree_map(lambda s: s + 0.1, state.stats)  # not the initial ones
    hp = {name: jnp.asarray(v[0]) for name, v in trial_arrays(bucket, shapes, [{}]).items()}
    whole = evaluate(bucket, state.params, stats, hp, x, y, 2.0)
    chunked = jax.jit(lambda: evaluate(bucket, state.params, stats, hp, x, y, 2.0, chunk=10))()
    assert set(whole) == set(chunked)
    for name, value in whole.items():
        np.testing.assert_allclose(chunked[name], value, rtol=1e-6, atol=1e-7)
