"""Bucket programs compiled ahead, in the background, while other buckets train."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caviar.models import executables
from caviar.models.bucket import Bucket
from caviar.models.data import load_dataset
from caviar.models.train import (
    Shape,
    TrainData,
    compile_ahead,
    compile_count,
    compiled_buckets,
    train_batch,
)

MONITOR = ("dev_accuracy", True)


@pytest.fixture(scope="module")
def data():
    ds = load_dataset({"name": "synthetic", "samples": 400, "features": 6, "classes": 3}, seed=7)
    return TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)


def shape(*hidden: int) -> Shape:
    return Shape(input_dim=6, num_outputs=3, hidden=hidden, batch_size=32)


HPARAMS = [{"learning_rate": 0.05, "momentum": 0.9, "seed": i} for i in range(3)]


def test_a_bucket_compiled_ahead_trains_with_no_compile_of_its_own(data):
    shapes = [shape(13, 11), shape(9), shape(12, 4)]
    bucket = Bucket.envelope(shapes)
    before = compile_count()
    future = compile_ahead(shapes, HPARAMS, data, bucket=bucket, monitor=MONITOR, group_size=2)
    assert future is not None
    assert bucket in compiled_buckets(data, MONITOR)  # the planner counts it as compiled
    assert (
        compile_ahead(shapes, HPARAMS, data, bucket=bucket, monitor=MONITOR, group_size=2) is None
    )
    future.result(timeout=120)
    assert compile_count() == before + 1
    ahead = train_batch(
        shapes, HPARAMS, data, epochs=3, bucket=bucket, monitor=MONITOR, group_size=2
    )
    assert compile_count() == before + 1
    # The same trials, in their own exact shapes (programs compiled in the foreground).
    for index, trial in enumerate(ahead.trials):
        alone = train_batch(shapes[index], [HPARAMS[index]], data, epochs=3, monitor=MONITOR)
        for got, want in zip(trial.history, alone.trials[0].history, strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_compile_ahead_of_a_compiled_program_does_nothing(data):
    shapes = [shape(5)]
    train_batch(shapes, HPARAMS[:1], data, epochs=1, monitor=MONITOR)
    before = compile_count()
    assert compile_ahead(shapes, HPARAMS[:1], data, monitor=MONITOR) is None
    assert compile_count() == before


def _key(tag: int) -> executables.ProgramKey:
    bucket = Bucket.exact(shape(tag))
    return executables.ProgramKey(bucket, MONITOR, 10, 1, 1, 1, 1, True)


def _lowering(threads: list[str]):
    def lower():
        threads.append(threading.current_thread().name)
        return jax.jit(lambda x: x * 2).lower(jnp.ones(3))

    return lower


def test_compiles_ahead_run_in_the_background_thread_and_the_trainer_waits_for_them():
    threads: list[str] = []
    seconds: list[float] = []
    key = _key(991)
    future = executables.compile_ahead(key, _lowering(threads), seconds.append)
    assert future is not None
    program = executables.executable(key, _lowering(threads), seconds.append)
    assert threads == ["caviar-compile_0"]  # compiled once, ahead; the trainer waited for it
    assert len(seconds) == 1
    np.testing.assert_array_equal(program(jnp.ones(3)), np.full(3, 2.0))


def test_a_compile_ahead_that_fails_is_compiled_again_where_its_error_shows():
    key = _key(992)

    def broken():
        raise RuntimeError("lowering failed")

    future = executables.compile_ahead(key, broken, lambda _: None)
    assert future is not None
    with pytest.raises(RuntimeError, match="lowering failed"):
        future.result(timeout=30)
    with pytest.raises(RuntimeError, match="lowering failed"):
        executables.executable(key, broken, lambda _: None)
    threads: list[str] = []
    executables.executable(key, _lowering(threads), lambda _: None)
    assert threads == [threading.current_thread().name]


def test_a_bad_compile_ahead_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(executables.COMPILE_AHEAD_ENV, "yes")
    with pytest.raises(ValueError, match="CAVIAR_COMPILE_AHEAD='yes': expected 0 or 1"):
        executables.compile_ahead_override()
    monkeypatch.setenv(executables.COMPILE_AHEAD_ENV, "0")
    assert executables.compile_ahead_override() is False
