"""The bucket epoch programs this process has compiled, and compiling one ahead in the background.

A `ProgramKey` names one compiled program: its bucket and what else sets its array shapes.
`executable` returns a key's program, compiling it on first use, or waiting for the compile
`compile_ahead` started in a background thread (so that a claim's next bucket compiles while
the one before it trains). XLA compiles a program on one thread; tracing and lowering hold
Python's lock, so the background compile takes host time from the training loop as well.

Where JAX's persistent compilation cache is on, every program compiled into it is also listed in
an index beside it (`PROGRAM_INDEX`, one small JSON file per key, under a fingerprint of the JAX
version, backend, devices and compiler settings), so that a later process knows which buckets it
can load instead of compiling (`cached_buckets`) before it has traced any of them. The same
folder keeps small notes for the next process (`write_index_note`: what programs cost here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jaxlib
from jax import monitoring

from caviar.models.bucket import Bucket
from caviar.models.runtime import switch_setting

__all__ = [
    "COMPILE_AHEAD_ENV",
    "PROGRAM_INDEX",
    "ProgramKey",
    "cached_buckets",
    "compile_ahead",
    "compile_ahead_override",
    "compile_count",
    "compiled_buckets",
    "compiled_group_sizes",
    "executable",
    "is_compiled",
    "is_compiling",
    "read_index_note",
    "write_index_note",
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
#: Told the seconds a program took to have, and whether it was read from the persistent cache.
OnCompiled = Callable[[float, bool], None]

#: The folder, inside JAX's persistent compilation cache, that lists the programs compiled into it.
PROGRAM_INDEX = "caviar-programs"
#: The subfolder of the index's notes (apart from its entries, which never change).
_NOTES = "notes"
#: What `jax.monitoring` records when a program is read from the persistent cache.
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

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


def is_compiling(key: ProgramKey) -> bool:
    """Whether `key`'s program is being compiled (or waits to be) in the background thread."""
    return key in _COMPILING


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


def cached_buckets(
    train_rows: int, dev_rows: int, monitor: tuple[str, bool], decay_every: int
) -> frozenset[Bucket]:
    """The buckets whose program for these data sizes, monitor and decay is in the persistent
    compilation cache (as its index lists them) but not compiled in this process; empty where the
    cache is off."""
    wanted = (monitor, decay_every, train_rows, dev_rows)
    ready = compiled_buckets(train_rows, dev_rows, monitor, decay_every)
    return frozenset(
        k.bucket
        for k in _indexed()
        if (k.monitor, k.decay_every, k.train_rows, k.dev_rows) == wanted and k.bucket not in ready
    )


def compiled_group_sizes(key_of: Callable[[int], ProgramKey]) -> list[int]:
    """The group sizes with a program compiled, compiling or in the persistent cache for
    `key_of(group size)`."""
    keys = (*_EXECUTABLES, *_COMPILING, *_indexed())
    return sorted({k.group_size for k in keys if k == key_of(k.group_size)})


def executable(key: ProgramKey, lower: Lower, on_compiled: OnCompiled) -> Any:
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


def compile_ahead(key: ProgramKey, lower: Lower, on_compiled: OnCompiled) -> Future[None] | None:
    """Start compiling `key`'s program in the background thread (after those started before);
    None when it is compiled or compiling already. Cancel the future to drop it unstarted."""
    if key in _EXECUTABLES or key in _COMPILING:
        return None
    future = _COMPILER.submit(_compile, key, lower, on_compiled)
    _COMPILING[key] = future
    future.add_done_callback(lambda _: _COMPILING.pop(key, None))
    return future


def _compile(key: ProgramKey, lower: Lower, on_compiled: OnCompiled) -> None:
    if key in _EXECUTABLES:
        return
    start, hits = time.perf_counter(), _cache_hits()
    _EXECUTABLES[key] = lower().compile()
    on_compiled(time.perf_counter() - start, _cache_hits() > hits)
    _index(key)


# --- the index of the persistent cache ---------------------------------------------------------

_HITS = threading.local()  # this thread's persistent-cache hits (JAX compiles on the caller's)


def _count_hit(event: str, **_: Any) -> None:
    if event == _CACHE_HIT_EVENT:
        _HITS.count = _cache_hits() + 1


def _cache_hits() -> int:
    return getattr(_HITS, "count", 0)


monitoring.register_event_listener(_count_hit)


def _index_folder() -> Path | None:
    """This setup's folder of the index, or None where the persistent cache is off.

    The fingerprint covers what makes JAX compile a different program for the same key (its
    version, the backend and its devices, the compiler flags, the matmul precision) and the
    cache's own path (JAX's keys hold it), so a key listed under it is one this process would
    read from the cache."""
    cache = _jax_setting("jax_compilation_cache_dir")
    if not cache:
        return None
    device = jax.devices()[0]
    setup = (
        os.path.abspath(cache),
        jax.__version__,
        jaxlib.__version__,
        device.platform,
        device.device_kind,
        device.client.platform_version,
        len(jax.devices()),
        os.environ.get("XLA_FLAGS", ""),
        str(_jax_setting("jax_default_matmul_precision")),
        bool(_jax_setting("jax_enable_x64")),
    )
    return Path(cache) / PROGRAM_INDEX / _digest(repr(setup))


def _jax_setting(name: str) -> Any:
    """A JAX configuration value (read as an attribute, which JAX's type stubs do not declare)."""
    return getattr(jax.config, name)


#: Index entries read so far, by path: an entry never changes once written, so each planning
#: and each batch lists the folder but reads only the entries new to this process.
_READ: dict[Path, ProgramKey] = {}


def _indexed() -> Iterator[ProgramKey]:
    """The keys the index lists for this setup (an unreadable entry is skipped)."""
    folder = _index_folder()
    if folder is None or not folder.is_dir():
        return
    for entry in folder.glob("*.json"):
        if entry not in _READ:
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                _READ[entry] = _key_from(json.loads(entry.read_text()))
        if entry in _READ:
            yield _READ[entry]


def _index(key: ProgramKey) -> None:
    """List `key` in the index (where the cache is on); a folder that cannot be written leaves
    the key unlisted, which costs a later process a compile, nothing else."""
    folder = _index_folder()
    if folder is not None:
        text = json.dumps(_key_to(key), sort_keys=True)
        _write(folder / f"{_digest(text)}.json", text, replace=False)


def read_index_note(name: str) -> dict[str, Any]:
    """The note `name` an earlier process left beside this setup's index ({} where there is
    none, it cannot be read, or the cache is off)."""
    folder = _index_folder()
    if folder is None:
        return {}
    try:
        note = json.loads((folder / _NOTES / name).read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def write_index_note(name: str, fields: dict[str, Any]) -> None:
    """Leave the note `name` beside this setup's index for later processes (where the cache is
    on; a folder that cannot be written loses the note, nothing else)."""
    folder = _index_folder()
    if folder is not None:
        _write(folder / _NOTES / name, json.dumps(fields, sort_keys=True), replace=True)


def _write(entry: Path, text: str, *, replace: bool) -> None:
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        if replace or not entry.exists():
            partial = entry.with_name(f"{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            partial.write_text(text)
            partial.replace(entry)  # atomic: a reader sees the whole entry or none


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _key_to(key: ProgramKey) -> dict[str, Any]:
    return {**key._asdict(), "bucket": dataclasses.asdict(key.bucket)}


def _key_from(fields: dict[str, Any]) -> ProgramKey:
    bucket = fields["bucket"]
    for name in ("widths", "activations", "optimizers"):
        bucket[name] = tuple(bucket[name])
    return ProgramKey(**{**fields, "bucket": Bucket(**bucket), "monitor": tuple(fields["monitor"])})
