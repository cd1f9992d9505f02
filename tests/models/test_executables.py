"""Bucket programs compiled ahead, in the background, while other buckets train, and the index
of the programs in the persistent compilation cache."""

import json
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from caviar.models import executables
from caviar.models.bucket import Bucket
from caviar.models.data import load_dataset
from caviar.models.train import (
    COMPILE_PRIOR_S,
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


_XLA_COMPILES: list[str] = []  # the thread of every XLA compile since the listener below


def _note_compile(event: str, duration_secs: float, **_: str | int) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _XLA_COMPILES.append(threading.current_thread().name)


monitoring.register_event_duration_secs_listener(_note_compile)


def test_trials_join_and_leave_a_bucket_compiled_ahead_with_no_compile_at_all(data):
    """Not the epoch program, nor the small ones that write a joining trial into its slot and
    read a leaving one's state back: each took a fraction of a second, stalling the round."""
    shapes = [shape(14, 12), shape(9), shape(12, 5)]
    bucket = Bucket.envelope(shapes)
    future = compile_ahead(shapes, HPARAMS, data, bucket=bucket, monitor=MONITOR, group_size=2)
    assert future is not None
    future.result(timeout=120)
    _XLA_COMPILES.clear()
    joining = [{**HPARAMS[0], "seed": 10 + i} for i in range(4)]

    def refill(free: int) -> list[tuple[Shape, dict]]:
        return [(shape(9), joining.pop()) for _ in range(min(free, len(joining)))]

    def stop_every_other(report) -> np.ndarray:  # a slot frees while its group trains on
        stop = np.asarray(report.epochs) >= 1
        stop[::2] = False
        return stop

    result = train_batch(
        shapes,
        HPARAMS,
        data,
        epochs=3,
        callback=stop_every_other,
        refill=refill,
        bucket=bucket,
        monitor=MONITOR,
        group_size=2,
    )
    assert len(result.trials) == 7 and not joining
    assert _XLA_COMPILES == []


def test_a_bucket_that_takes_no_new_trials_compiles_no_slot_program_ahead(data):
    shapes = [shape(15, 13), shape(7)]
    bucket = Bucket.envelope(shapes)
    _XLA_COMPILES.clear()
    future = compile_ahead(
        shapes, HPARAMS[:2], data, bucket=bucket, monitor=MONITOR, group_size=2, refills=False
    )
    assert future is not None
    future.result(timeout=120)
    assert len(_XLA_COMPILES) == 1  # the epoch program alone, in the background
    assert _XLA_COMPILES[0].startswith("caviar-compile")
    train_batch(shapes, HPARAMS[:2], data, epochs=2, bucket=bucket, monitor=MONITOR, group_size=2)
    assert len(_XLA_COMPILES) == 1


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

    def record(took: float, loaded: bool) -> None:
        seconds.append(took)

    future = executables.compile_ahead(key, _lowering(threads), record)
    assert future is not None
    program = executables.executable(key, _lowering(threads), record)
    assert threads == ["caviar-compile_0"]  # compiled once, ahead; the trainer waited for it
    assert len(seconds) == 1
    np.testing.assert_array_equal(program(jnp.ones(3)), np.full(3, 2.0))


def test_a_compile_ahead_that_fails_is_compiled_again_where_its_error_shows():
    key = _key(992)

    def broken():
        raise RuntimeError("lowering failed")

    future = executables.compile_ahead(key, broken, lambda *_: None)
    assert future is not None
    with pytest.raises(RuntimeError, match="lowering failed"):
        future.result(timeout=30)
    with pytest.raises(RuntimeError, match="lowering failed"):
        executables.executable(key, broken, lambda *_: None)
    threads: list[str] = []
    executables.executable(key, _lowering(threads), lambda *_: None)
    assert threads == [threading.current_thread().name]


def test_a_bad_compile_ahead_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(executables.COMPILE_AHEAD_ENV, "yes")
    with pytest.raises(ValueError, match="CAVIAR_COMPILE_AHEAD='yes': expected 0 or 1"):
        executables.compile_ahead_override()
    monkeypatch.setenv(executables.COMPILE_AHEAD_ENV, "0")
    assert executables.compile_ahead_override() is False


CACHED_RUN = """
import json, sys
from caviar.models.runtime import enable_compilation_cache, set_matmul_precision
cache, widths, precision, strategy = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
enable_compilation_cache(cache)
set_matmul_precision(precision)
from caviar.models.data import load_dataset
from caviar.models.planner import plan
from caviar.models.train import (
    RATES, Shape, TrainData, cached_buckets, compiled_buckets, planning_costs, train_batch,
)
ds = load_dataset({"name": "synthetic", "samples": 400, "features": 6, "classes": 3}, seed=7)
data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)
monitor = ("dev_accuracy", True)
shapes = [Shape(6, 3, tuple(w), optimizer="momentum", batch_size=32) for w in widths]
cached = cached_buckets(data, monitor)
costs = planning_costs(data, epochs=2, group_size=2, trials=len(shapes))
chosen = plan(
    shapes, costs, strategy=strategy, compiled=compiled_buckets(data, monitor), cached=cached
)
histories = [None] * len(shapes)
for a in chosen.assignments:
    hparams = [{"learning_rate": 0.05, "momentum": 0.9, "seed": i} for i in a.members]
    members = [shapes[i] for i in a.members]
    done = train_batch(
        members, hparams, data, epochs=2, bucket=a.bucket, monitor=monitor, group_size=2
    )
    for i, trial in zip(a.members, done.trials):
        histories[i] = [[float(v) for v in epoch.values()] for epoch in trial.history]
print(json.dumps({
    "cached": sorted(list(b.widths) for b in cached),
    "plan": [[list(a.bucket.widths), a.program] for a in chosen.assignments],
    "compile_s": RATES.compile_s,
    "load_s": RATES.load_s,
    "planned_compile_s": costs.compile_s,
    "histories": histories,
}))
"""


def _cached_run(cache, widths, precision="highest", strategy="auto") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CACHED_RUN, str(cache), json.dumps(widths), precision, strategy],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_later_process_plans_buckets_of_the_persistent_cache_and_loads_them(tmp_path):
    first = _cached_run(tmp_path, [[24, 16], [10]])
    assert first["cached"] == [] and first["plan"] == [[[24, 16], "new"]]
    assert first["compile_s"] is not None and first["load_s"] is None
    assert (tmp_path / executables.PROGRAM_INDEX).is_dir()
    # A new process with new widths that fit: it plans the cached bucket and compiles nothing.
    later = [[20, 12], [7], [9, 3]]
    second = _cached_run(tmp_path, later)
    assert second["cached"] == [[24, 16]] and second["plan"] == [[[24, 16], "cached"]]
    # It planned with the compile time the first process measured (not the prior), and measured
    # a load of its own but no compile.
    assert second["planned_compile_s"] == second["compile_s"] == first["compile_s"]
    assert second["load_s"] is not None
    # Another setup (here the matmul precision) compiles other programs: the index has none.
    # Its trials, each in its own exact shape, train as the padded, loaded ones did.
    exact = _cached_run(tmp_path, later, precision="high", strategy="exact")
    assert exact["cached"] == [] and [p for _, p in exact["plan"]] == ["new"] * 3
    assert exact["planned_compile_s"] == COMPILE_PRIOR_S
    for got, want in zip(second["histories"], exact["histories"], strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_a_first_plan_takes_the_best_of_several_reads_of_the_flop_rate(data, monkeypatch):
    """One short read is as slow as whatever else the machine did meanwhile; the best of a few
    is what the machine can do, so the same claim gets the same plan."""
    from caviar.models import train

    reads = iter([30.0, 70.0, 50.0])
    monkeypatch.setattr(train, "matmul_peak_gflops", lambda **_: next(reads))
    monkeypatch.setattr(train.RATES, "flops_per_s", None)
    train._probe_flops_per_s.cache_clear()
    try:
        costs = train.planning_costs(data, epochs=2, group_size=2, trials=3)
    finally:
        train._probe_flops_per_s.cache_clear()
    assert costs.flops_per_s == 70e9
