"""Process-wide JAX settings: the persistent compilation cache and a matmul peak probe."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp


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
