"""Heartbeats for every running trial of a batch, written on a thread of their own.

Optuna writes heartbeats only inside `study.optimize`; with ask/tell the worker writes them. If
the database stops answering for longer than the grace period, the batch is given up: other
workers (or the API) will by then have failed its trials and enqueued them again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import optuna

from caviar.db.storage import record_heartbeats
from caviar.search.worker_metrics import METRICS

log = logging.getLogger("caviar.worker")


class Heartbeat:
    """Writes a heartbeat for `trial_ids` every `interval_s` until the block ends."""

    def __init__(
        self, storage: optuna.storages.RDBStorage, trial_ids: Sequence[int], interval_s: float
    ) -> None:
        self.storage = storage
        self.trial_ids = list(trial_ids)
        self.interval_s = interval_s
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caviar-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def add(self, trial_ids: Sequence[int]) -> None:
        """Beat for these trials too, from now on (trials that joined the batch)."""
        self.trial_ids = [*self.trial_ids, *trial_ids]

    def beat(self) -> None:
        """Write one heartbeat per trial now (errors are logged; `silent_for` tells how long)."""
        try:
            record_heartbeats(self.storage, self.trial_ids)
        except Exception as error:  # the database may be briefly unreachable; keep trying
            METRICS.database_error("heartbeat")
            log.warning("heartbeat failed: %s", error)
            return
        METRICS.heartbeats_written(len(self.trial_ids))
        self.last_ok = time.monotonic()

    def silent_for(self) -> float:
        """Seconds since the last heartbeat that reached the database."""
        return time.monotonic() - self.last_ok

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()
