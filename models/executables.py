"""The bucket epoch programs this process has compiled, and compiling one ahead in the background.

A `ProgramKey` names one compiled program: its bucket and what else sets its array shapes.
`executable` returns a key's program, compiling it on first use, or waiting for the compile
`compile_ahead` started in a background thread (so that a claim's next bucket compiles while
the one before it trains). XLA compiles a program on one thread; tracing and lowering hold
Python's lock, so the background compile takes host time from the training loop as well.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax

from caviar.models.bucket import Bucket
from caviar.models.runtime import switch_setting

__all__ = [
    "COMPILE_AHEAD_ENV",
    "ProgramKey",
    "compile_ahead",
    "compile_ahead_override",
    "compile_count",
    "compiled_buckets",
    "compiled_group_sizes",
    "executable",
    "is_compiled",
]

#: Environment variable that turns compiling ahead off (0) or on (1, the default).
COMPILE_AHEAD_ENV = "CAVIAR_COMPILE_AHEAD"


class ProgramKey(NamedTuple):
    """One compiled epoch program: its bucket, and what else sets its array shapes."""

    bucket: Bucket
    monitor: tuple[str, bool]
    decay_every: int
    group_size: int
    train_rows: int
    dev_rows: int
    devices: int
    donated: bool  # the state is donated to the call (not when rounds are dispatched ahead,
    # which read a stopped trial's state from the round before)


#: Lowers a key's program for its example arguments (`jax.jit(...).lower(...)`).
Lower = Callable[[], jax.stages.Lowered]

_EXECUTABLES: dict[ProgramKey, Any] = {}
_COMPILING: dict[ProgramKey, Future[None]] = {}
_COMPILER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caviar-compile")


def compile_ahead_override() -> bool | None:
    """`$CAVIAR_COMPILE_AHEAD` (None when unset); ValueError when it is not 0 or 1."""
    return switch_setting(COMPILE_AHEAD_ENV)


def compile_count() -> int:
    """How many epoch programs this process has compiled (for tests and benchmarks)."""
    return len(_EXECUTABLES)


def is_compiled(key: ProgramKey) -> bool:
    """Whether `key`'s program is ready (compiled, not just compiling)."""
    return key in _EXECUTABLES


def compiled_buckets(
    train_rows: int, dev_rows: int, monitor: tuple[str, bool], decay_every: int
) -> frozenset[Bucket]:
    """The buckets with a program compiled (or compiling) in this process for these data sizes,
    monitor and decay."""
    wanted = (monitor, decay_every, train_rows, dev_rows)
    return frozenset(
        k.bucket
        for k in (*_EXECUTABLES, *_COMPILING)
        if (k.monitor, k.decay_every, k.train_rows, k.dev_rows) == wanted
    )


def compiled_group_sizes(key_of: Callable[[int], ProgramKey]) -> list[int]:
    """The group sizes with a program compiled (or compiling) for `key_of(group size)`."""
    return [k.group_size for k in (*_EXECUTABLES, *_COMPILING) if k == key_of(k.group_size)]


def executable(key: ProgramKey, lower: Lower, on_compiled: Callable[[float], None]) -> Any:
    """`key`'s compiled program: ready, or waited for when compiling ahead, else compiled now
    from `lower` (and also when the compile ahead failed: its error is raised here, if any).
    `on_compiled` is told the seconds of each compile this call does."""
    pending = _COMPILING.get(key)
    if key not in _EXECUTABLES and pending is not None:
        with contextlib.suppress(Exception):  # compiled again below, raising its error here
            pending.result()
    if key not in _EXECUTABLES:
        _compile(key, lower, on_compiled)
    return _EXECUTABLES[key]


def compile_ahead(
    key: ProgramKey, lower: Lower, on_compiled: Callable[[float], None]
) -> Future[None] | None:
    """Start compiling `key`'s program in the background thread (after those started before);
    None when it is compiled or compiling already. Cancel the future to drop it unstarted."""
    if key in _EXECUTABLES or key in _COMPILING:
        return None
    future = _COMPILER.submit(_compile, key, lower, on_compiled)
    _COMPILING[key] = future
    future.add_done_callback(lambda _: _COMPILING.pop(key, None))
    return future


def _compile(key: ProgramKey, lower: Lower, on_compiled: Callable[[float], None]) -> None:
    if key in _EXECUTABLES:
        return
    start = time.perf_counter()
    _EXECUTABLES[key] = lower().compile()
    on_compiled(time.perf_counter() - start)
