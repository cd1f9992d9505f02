"""Process-wide JAX settings: CPU devices, matmul precision, the persistent compilation cache,
the accelerator check, and a matmul peak probe."""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp

#: Environment variable that sets how many JAX devices the CPU is split into (1 turns it off).
CPU_DEVICES_ENV = "CAVIAR_CPU_DEVICES"


def switch_setting(name: str) -> bool | None:
    """The on (1) or off (0) switch in environment variable `name`, None when it is unset;
    ValueError when it is neither."""
    value = os.environ.get(name)
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def use_every_core() -> None:
    """Split the CPU into one JAX device per usable core, before JAX starts.

    `models.train.train_batch` shards its groups' trials across devices, so each core trains its
    own trials instead of all cores sharing every small matmul (`bench.engine --cpu-devices 1,2`:
    1.4× cold, 1.5× warm on 2 cores). `$CAVIAR_CPU_DEVICES` overrides the count; a count already
    given in `XLA_FLAGS` is left alone, as is a process whose JAX has already started. Only the
    CPU platform is affected: on a GPU or TPU host the accelerators stay the devices trials run on.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    count = cpu_device_count()
    with contextlib.suppress(RuntimeError):  # raised once JAX has started: keep its devices
        jax.config.update("jax_num_cpu_devices", count)


def cpu_device_count() -> int:
    """How many devices `use_every_core` splits the CPU into: `$CAVIAR_CPU_DEVICES`, or the
    cores this process may run on."""
    value = os.environ.get(CPU_DEVICES_ENV)
    if not value:
        if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CPU_DEVICES_ENV}={value!r}: expected a whole number, at least 1")
    return int(value)


#: Precisions of float32 matmuls, from exact float32 to the backend's fastest (TF32 on Ampere and
#: later NVIDIA GPUs, bfloat16 passes on TPUs).
MATMUL_PRECISIONS = ("highest", "high", "default")


def set_matmul_precision(precision: str) -> None:
    """Run float32 matmuls at `precision` in every program compiled from now on.

    `highest` (Caviar's default) keeps GPU and TPU results within float32 tolerance of the CPU's;
    the MLPs trained here are launch-bound, so the faster TF32 or bfloat16 passes buy little.
    """
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision {precision!r}: expected one of {MATMUL_PRECISIONS}")
    jax.config.update("jax_default_matmul_precision", precision)


def require_accelerator() -> None:
    """Raise `RuntimeError` unless JAX's default backend is a GPU or TPU (not a CPU fallback)."""
    backend = jax.default_backend()
    if backend == "cpu":
        raise RuntimeError(
            "an accelerator was required (CAVIAR_REQUIRE_ACCELERATOR) but JAX found only the "
            f"CPU ({', '.join(map(str, jax.devices()))}): check the GPU driver, the container's "
            "GPU access, and that the installed jaxlib has CUDA (pip install 'caviar[cuda]')"
        )


def enable_compilation_cache(directory: str | os.PathLike[str]) -> None:
    """Keep every compiled program in `directory`, so a new process reuses it without compiling."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This device's float32 matmul throughput in GFLOP/s, measured on a large square matmul."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a, a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
