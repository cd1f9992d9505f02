"""Process-wide JAX settings: a restarted process does not recompile a shape (persistent
compilation cache), and the CPU is split into one device per core unless told otherwise."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, jax
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name))
from caviar.models.runtime import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
from caviar.models.data import load_dataset
from caviar.models.train import Shape, TrainData, train_batch
ds = load_dataset({"name": "synthetic", "samples": 300, "features": 5, "classes": 2})
data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)
train_batch(Shape(5, 2, (8,), optimizer="momentum", batch_size=32), [{}, {}], data, epochs=1)
print(json.dumps({"cache_hits": sum("cache_hits" in name for name in hits),
                  "cache_misses": sum("cache_misses" in name for name in hits)}))
"""


def run(cache_dir) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restarted_process_reuses_the_compiled_programs(tmp_path):
    first, second = run(tmp_path), run(tmp_path)
    assert first["cache_hits"] == 0 and first["cache_misses"] > 0
    assert second["cache_hits"] >= first["cache_misses"] - 1 and second["cache_misses"] <= 1


DEVICES = """
import json, os, sys, jax
if sys.argv[1] == "started":
    jax.numpy.zeros(1).block_until_ready()
from caviar.models.runtime import use_every_core
use_every_core()
print(json.dumps({"devices": len(jax.devices()), "cores": len(os.sched_getaffinity(0))}))
"""


def devices(env: dict[str, str], started: bool = False) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CAVIAR_CPU_DEVICES")}
    return subprocess.run(
        [sys.executable, "-c", DEVICES, "started" if started else "fresh"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def count(env: dict[str, str], started: bool = False) -> tuple[int, int]:
    done = devices(env, started)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["devices"], out["cores"]


def test_the_cpu_is_split_into_one_device_per_usable_core():
    found, cores = count({})
    assert found == cores


@pytest.mark.parametrize(
    ("env", "started", "expected"),
    [
        ({"CAVIAR_CPU_DEVICES": "3"}, False, 3),
        ({"CAVIAR_CPU_DEVICES": "1"}, False, 1),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, False, 4),
        ({}, True, 1),  # JAX already running: its devices are kept, without an error
    ],
)
def test_the_device_count_can_be_set_and_is_never_changed_under_jax(env, started, expected):
    assert count(env, started)[0] == expected


def test_a_bad_device_count_is_a_clear_error():
    done = devices({"CAVIAR_CPU_DEVICES": "many"})
    assert done.returncode != 0
    assert "CAVIAR_CPU_DEVICES='many': expected a whole number, at least 1" in done.stderr


def test_matmul_precision_is_set_for_every_program_compiled_after() -> None:
    import jax
    import jax.numpy as jnp

    from caviar.models.runtime import set_matmul_precision

    a = jnp.ones((4, 4), jnp.float32)
    # jax.config's flags are dynamic attributes that jax's type hints do not declare.
    before = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    try:
        set_matmul_precision("highest")
        assert "HIGHEST" in jax.jit(jnp.matmul).lower(a, a).as_text()
        set_matmul_precision("default")
        assert "HIGHEST" not in jax.jit(jnp.matmul).lower(a, a).as_text()
    finally:
        jax.config.update("jax_default_matmul_precision", before)
    with pytest.raises(ValueError, match="'tf32'"):
        set_matmul_precision("tf32")


def test_a_required_accelerator_that_is_missing_is_a_clear_error():
    from caviar.models.runtime import require_accelerator

    with pytest.raises(RuntimeError, match="only the CPU"):
        require_accelerator()  # the suite runs on the CPU platform
