"""The multilayer perceptron: Z[l] = W[l]·A[l-1] + b[l], A[l] = g(Z[l])."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
}

# Weight initialisations by variance: he 2/n_in (ReLU), xavier 1/n_in (tanh),
# glorot 2/(n_in + n_out).
INITS: tuple[str, ...] = ("he", "xavier", "glorot")


def init_std(init: int, fan_in: int, fan_out: int) -> float:
    """Standard deviation of initial kernel weights for the initialisation `INITS[init]`."""
    variances = (2.0 / fan_in, 1.0 / fan_in, 2.0 / (fan_in + fan_out))
    return math.sqrt(variances[init])


def inverted_dropout(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    """Zero each unit with probability `rate`; scale survivors by 1/keep_prob (training only).

    The mask is drawn unit-major ([units, examples]), so padding the units leaves the draws of
    the real units unchanged.
    """
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, x.shape[::-1]).T
    return jnp.where(keep, x / keep_prob, 0.0)


class MLP(nn.Module):
    """Hidden Dense layers (optionally batch-normalised, with dropout) and a linear output layer.

    The output is logits for classification (softmax lives in the loss) and the prediction for
    regression. `dropout_rate` is an array, not a constant, so trials with different rates share
    one compiled program; `use_dropout` switches dropout off entirely when no trial uses it.
    """

    hidden: tuple[int, ...]
    num_outputs: int
    activation: str = "relu"
    batch_norm: bool = False
    use_dropout: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool, dropout_rate: jax.Array | float = 0.0
    ) -> jax.Array:
        g = ACTIVATIONS[self.activation]
        for width in self.hidden:
            # With batch norm its learned shift β plays the role of the bias b.
            x = nn.Dense(width, use_bias=not self.batch_norm)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
            x = g(x)
            if self.use_dropout and train:
                x = inverted_dropout(x, jnp.asarray(dropout_rate), self.make_rng("dropout"))
        return nn.Dense(self.num_outputs)(x)


def variable_template(model: MLP, input_dim: int) -> Any:
    """The model's variables as shapes and dtypes only (traced, nothing computed)."""
    sample = jax.ShapeDtypeStruct((1, input_dim), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), sample)


def init_variables(model: MLP, input_dim: int, key: jax.Array, init: int = 0) -> dict:
    """Fresh variables: kernels ~ N(0, init_std²), biases and shifts 0, scales and variances 1.

    Built from the model's variable structure rather than by `model.init`, whose default
    initialisers would be drawn only to be replaced (and cost seconds of compilation).
    """
    template = variable_template(model, input_dim)
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    keys = iter(jax.random.split(key, len(paths_and_leaves)))

    def fresh(path, leaf):
        k = next(keys)
        name = getattr(path[-1], "key", None)
        if name == "kernel":
            fan_in, fan_out = leaf.shape
            return jax.random.normal(k, leaf.shape, leaf.dtype) * init_std(init, fan_in, fan_out)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fresh, dict(template))


def sum_squared_weights(params: dict) -> jax.Array:
    """Σ_l ‖W[l]‖²_F over kernels only, never biases or batch-norm scales."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    # A jax.Array, not sum()'s start 0: there is always an output kernel.
    return cast(
        jax.Array, sum(jnp.sum(jnp.square(leaf)) for path, leaf in leaves if _is_kernel(path))
    )


def count_parameters(input_dim: int, hidden: tuple[int, ...], num_outputs: int) -> int:
    """Number of weights and biases of an MLP (batch-norm scale/shift count as the bias)."""
    widths = (input_dim, *hidden, num_outputs)
    return sum(n_in * n_out + n_out for n_in, n_out in itertools.pairwise(widths))


def _is_kernel(path: tuple) -> bool:
    return getattr(path[-1], "key", None) == "kernel"
