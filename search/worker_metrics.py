"""A worker's Prometheus metrics: counters its loop bumps, served as text on a port of its own.

The worker loop (`search.worker`), its heartbeats and its reaper call into the process-wide
`METRICS`; JAX reports compiles and compilation-cache hits through `jax.monitoring` listeners;
device memory is read from each local device at every scrape (CPUs report none, and nothing is
exported for them). `serve` starts the HTTP server on a daemon thread; `caviar worker` calls it
when `CAVIAR_WORKER_METRICS_PORT` is set.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jax
from jax import monitoring

PREFIX = "caviar_worker_"

#: Trials per minute are counted over this window (or the worker's life, while it is shorter).
RATE_WINDOW_S = 300.0

#: What `jax.monitoring` calls a compile (tracing and lowering excluded; a persistent-cache hit
#: is counted with the time it took to read) and a compilation-cache hit or miss.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"

#: Where the loop meets a database error (each is retried; none stops the worker).
DATABASE_ERROR_SITES = ("step", "heartbeat", "lease")

#: Trial states a finished trial may end in, as Prometheus label values.
TRIAL_STATES = ("complete", "pruned", "fail")

#: `Device.memory_stats()` keys exported, where the backend reports them.
MEMORY_STATS = {
    "bytes_in_use": "device memory in use",
    "peak_bytes_in_use": "most device memory in use at once so far",
    "bytes_limit": "device memory the allocator may use",
}


class WorkerMetrics:
    """Thread-safe counters of one worker process, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._trials: Counter[str] = Counter()
        self._finished: deque[float] = deque()
        self._trial_epochs = 0
        self._batch_trials = 0
        self._batch_capacity = 0
        self._heartbeats = 0
        self._reaped = 0
        self._database_errors: Counter[str] = Counter()
        self._compile_seconds = 0.0
        self._compiles = 0
        self._cache_hits = 0
        self._cache_misses = 0

    # -- what the worker reports ---------------------------------------------------------------

    def batch_trained(self, states: Sequence[str], capacity: int) -> None:
        """A claimed batch ended: the states its trials ended in, out of `capacity` slots."""
        now = time.monotonic()
        with self._lock:
            self._trials.update(states)
            self._finished.extend([now] * len(states))
            self._batch_trials += len(states)
            self._batch_capacity += capacity

    def epoch_trained(self, trials: Sequence[Any]) -> None:
        """One epoch of `trials` was trained (the engine's per-epoch callback)."""
        with self._lock:
            self._trial_epochs += len(trials)

    def heartbeats_written(self, count: int) -> None:
        with self._lock:
            self._heartbeats += count

    def trials_reaped(self, count: int) -> None:
        with self._lock:
            self._reaped += count

    def database_error(self, site: str) -> None:
        with self._lock:
            self._database_errors[site] += 1

    def jax_event(self, event: str, **_: Any) -> None:
        """A `jax.monitoring` event: compilation-cache hits and misses are counted."""
        with self._lock:
            self._cache_hits += event == CACHE_HIT_EVENT
            self._cache_misses += event == CACHE_MISS_EVENT

    def jax_duration(self, event: str, duration_secs: float, **_: str | int) -> None:
        """A `jax.monitoring` duration: compiles are counted and timed."""
        if event == COMPILE_EVENT:
            with self._lock:
                self._compiles += 1
                self._compile_seconds += duration_secs

    # -- exposition -----------------------------------------------------------------------------

    def trials_per_minute(self) -> float:
        """Trials finished per minute over the last `RATE_WINDOW_S` (or since the start)."""
        now = time.monotonic()
        with self._lock:
            while self._finished and self._finished[0] < now - RATE_WINDOW_S:
                self._finished.popleft()
            recent = len(self._finished)
        return 60.0 * recent / max(min(now - self._started, RATE_WINDOW_S), 1.0)

    def render(self) -> str:
        """Every metric, in Prometheus' text exposition format (version 0.0.4)."""
        rate = self.trials_per_minute()
        with self._lock:
            capacity = self._batch_capacity
            occupancy = self._batch_trials / capacity if capacity else 0.0
            lines = [
                *_metric(
                    "trials_trained_total",
                    "counter",
                    "trials this worker trained to their end, by the state they ended in",
                    [({"state": s}, self._trials[s]) for s in TRIAL_STATES],
                ),
                *_metric(
                    "trial_epochs_total",
                    "counter",
                    "epochs trained, summed over trials",
                    [({}, self._trial_epochs)],
                ),
                *_metric(
                    "trials_per_minute",
                    "gauge",
                    f"trials finished per minute over the last {RATE_WINDOW_S:.0f} s",
                    [({}, rate)],
                ),
                *_metric(
                    "slot_occupancy",
                    "gauge",
                    "trials claimed per batch over the batch size (--batch), over all batches",
                    [({}, occupancy)],
                ),
                *_metric(
                    "compile_seconds_total",
                    "counter",
                    "seconds XLA spent compiling (or reading programs from the persistent cache)",
                    [({}, self._compile_seconds)],
                ),
                *_metric("compiles_total", "counter", "XLA compiles", [({}, self._compiles)]),
                *_metric(
                    "compilation_cache_hits_total",
                    "counter",
                    "programs read from the persistent compilation cache instead of compiled",
                    [({}, self._cache_hits)],
                ),
                *_metric(
                    "compilation_cache_misses_total",
                    "counter",
                    "programs looked up in the persistent compilation cache and not found",
                    [({}, self._cache_misses)],
                ),
                *_metric(
                    "heartbeats_total",
                    "counter",
                    "trial heartbeats written to the database",
                    [({}, self._heartbeats)],
                ),
                *_metric(
                    "reaped_trials_total",
                    "counter",
                    "other workers' trials failed (and enqueued again) for a stale heartbeat",
                    [({}, self._reaped)],
                ),
                *_metric(
                    "database_errors_total",
                    "counter",
                    "database errors met (each retried), by where",
                    [({"site": s}, self._database_errors[s]) for s in DATABASE_ERROR_SITES],
                ),
            ]
        lines += _device_memory()
        return "\n".join(lines) + "\n"


def _device_memory() -> list[str]:
    """Gauges of each local device's memory, for the statistics its backend reports."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {key: [] for key in MEMORY_STATS}
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        for key in MEMORY_STATS:
            if key in stats:
                samples[key].append(({"device": f"{device.platform}:{device.id}"}, stats[key]))
    lines: list[str] = []
    for key, help_text in MEMORY_STATS.items():
        if samples[key]:
            lines += _metric(f"device_memory_{key}", "gauge", help_text, samples[key])
    return lines


def _metric(
    name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]
) -> Iterator[str]:
    yield f"# HELP {PREFIX}{name} {help_text}"
    yield f"# TYPE {PREFIX}{name} {kind}"
    for labels, value in samples:
        number = str(value) if isinstance(value, int) else repr(float(value))
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        yield f"{PREFIX}{name}{{{text}}} {number}" if text else f"{PREFIX}{name} {number}"


#: The process's metrics: every worker thread reports here.
METRICS = WorkerMetrics()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404, "metrics are at /metrics")
            return
        body = METRICS.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


def serve(host: str, port: int) -> ThreadingHTTPServer:
    """Count JAX's compiles from now on and serve `METRICS` at http://host:port/metrics on a
    daemon thread; raises OSError if the port cannot be bound."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    monitoring.register_event_listener(METRICS.jax_event)
    monitoring.register_event_duration_secs_listener(METRICS.jax_duration)
    threading.Thread(target=server.serve_forever, name="caviar-metrics", daemon=True).start()
    return server
