"""Every Prometheus series the service exports, one place, and the small helpers that move
them; the /metrics endpoint that serves them is metrics_endpoint.py.

Under `segments run` each server process writes its values to files of the run's
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen when the module is
imported) and the supervisor serves their sum; `segments serve` alone serves its own. No
series has a per-segment or per-project label, and none is read from the database when
scraped: a scrape costs the same whatever the data.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import Engine, event

# Seconds. Few buckets: under `segments run` a scrape reads every bucket of every method
# and code from every replica's file, and its cost grows with them.
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_LONG_SECONDS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)

RPC_REQUESTS = Counter(
    "segments_rpc_requests",
    "RPCs of the Segments services handled, by full method name and gRPC status code.",
    ("method", "code"),
)
RPC_DURATION = Histogram(
    "segments_rpc_duration_seconds",
    "Time from an RPC's arrival to its status, by full method name and gRPC status code.",
    ("method", "code"),
    buckets=_SECONDS,
)
DB_POOL_SIZE = Gauge(
    "segments_db_pool_size",
    "Connections each database pool keeps open (its configured size), summed over servers.",
    ("pool",),
    multiprocess_mode="livesum",
)
DB_POOL_CHECKED_OUT = Gauge(
    "segments_db_pool_checked_out",
    "Connections of each database pool in use right now, summed over servers.",
    ("pool",),
    multiprocess_mode="livesum",
)
DB_POOL_OVERFLOW = Gauge(
    "segments_db_pool_overflow",
    "Connections open beyond each pool's size right now, summed over servers.",
    ("pool",),
    multiprocess_mode="livesum",
)
TRACKER_LAG = Histogram(
    "segments_tracker_lag_seconds",
    "Time from what moved a contact (a request's arrival, the previous sweep's instant, a "
    "build's queueing) to its entry/exit events being written, by what moved it.",
    ("source",),
    buckets=_LONG_SECONDS,
)
SWEEP_DURATION = Histogram(
    "segments_sweep_duration_seconds",
    "Time of one sweep pass over every project with time-dependent segments.",
    buckets=_LONG_SECONDS,
)
SWEEP_CONTACTS = Counter(
    "segments_sweep_contacts",
    "Contacts the sweeps re-evaluated because time may have moved them.",
)
BUILD_DURATION = Histogram(
    "segments_build_duration_seconds",
    "Time of a segment build: inline (inside its request) or background (queued to done).",
    ("mode",),
    buckets=_LONG_SECONDS,
)
WEBHOOK_BACKLOG = Gauge(
    "segments_webhook_backlog",
    "Webhook deliveries waiting (pending or being retried) plus feed events not yet fanned "
    "out to the live webhooks, as last counted by a delivery worker.",
    multiprocess_mode="livemostrecent",
)
WEBHOOK_DELIVERED = Counter(
    "segments_webhook_deliveries",
    "Webhook deliveries the receiver accepted (a 2xx answer).",
)
WEBHOOK_FAILURES = Counter(
    "segments_webhook_delivery_failures",
    "Webhook delivery attempts that failed (non-2xx, timeout, refused address); each is "
    "retried until the event is too old.",
)
WEBHOOK_GIVEN_UP = Counter(
    "segments_webhook_deliveries_given_up",
    "Webhook deliveries marked FAILED: their event was older than the give-up age.",
)
REPLICA_UP = Gauge(
    "segments_replica_up",
    "1 while the standby (DATABASE_REPLICA_URL) answers its lag measurements, else 0; the "
    "lowest over servers.",
    multiprocess_mode="livemin",
)
REPLICA_LAG_SECONDS = Gauge(
    "segments_replica_lag_seconds",
    "How old the data the standby shows is: the age of the newest primary WAL position it "
    "has replayed (0 while it has replayed all the primary wrote), as last measured; the "
    "highest over servers.",
    multiprocess_mode="livemax",
)
REPLICA_LAG_BYTES = Gauge(
    "segments_replica_lag_bytes",
    "Bytes of WAL the primary had written and the standby had not replayed, as last "
    "measured; the highest over servers.",
    multiprocess_mode="livemax",
)
REPLICA_READS = Counter(
    "segments_replica_reads",
    "Reads that may lag (replica.MAY_LAG), by the database that served them (replica or "
    "primary) and why: fresh, or the standby was down, unmeasured, lagging past "
    "SEGMENTS_REPLICA_MAX_LAG, or failed the read.",
    ("served_by", "reason"),
)


def observe_rpc(method: str, code: str, seconds: float) -> None:
    RPC_REQUESTS.labels(method, code).inc()
    RPC_DURATION.labels(method, code).observe(seconds)


# What the entry/exit events written now were caused by, and when (Unix seconds): set around
# a request's work (interceptors.py), a sweep's re-evaluation, a build's step.
_ORIGIN: ContextVar[tuple[str, float] | None] = ContextVar("segments_tracking_origin", default=None)


@contextlib.contextmanager
def tracking(source: str, since: float) -> Iterator[None]:
    """Entry/exit events written inside were caused by `source` at `since` (Unix seconds)."""
    token = _ORIGIN.set((source, since))
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def set_tracking(source: str, since: float) -> Token[tuple[str, float] | None]:
    """As `tracking`, until `reset_tracking` (a request's handler, around its await)."""
    return _ORIGIN.set((source, since))


def reset_tracking(token: Token[tuple[str, float] | None]) -> None:
    _ORIGIN.reset(token)


def events_written(count: int) -> None:
    """A statement wrote `count` entry/exit events: one lag observation, if its cause is known."""
    origin = _ORIGIN.get()
    if count <= 0 or origin is None:
        return
    source, since = origin
    TRACKER_LAG.labels(source).observe(max(0.0, time.time() - since))


class PoolWatch:
    """Keeps the pool gauges of one engine current from the pool's own events (no query,
    nothing done at scrape time): checkouts, checkins, connections opened and closed."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.name = name
        self.size = int(getattr(engine.pool, "size", lambda: 0)())
        self._lock = threading.Lock()
        self._checked_out = 0
        self._open = 0
        DB_POOL_SIZE.labels(name).set(self.size)
        DB_POOL_CHECKED_OUT.labels(name).set(0)
        DB_POOL_OVERFLOW.labels(name).set(0)
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "checkin", self._checkin)
        event.listen(engine, "connect", self._connect)
        event.listen(engine, "close", self._close)
        event.listen(engine, "close_detached", self._close)

    def _update(self, checked_out: int = 0, opened: int = 0) -> None:
        with self._lock:
            self._checked_out = max(0, self._checked_out + checked_out)
            self._open = max(0, self._open + opened)
            DB_POOL_CHECKED_OUT.labels(self.name).set(self._checked_out)
            DB_POOL_OVERFLOW.labels(self.name).set(max(0, self._open - self.size))

    def _checkout(self, *_args: Any) -> None:
        self._update(checked_out=1)

    def _checkin(self, *_args: Any) -> None:
        self._update(checked_out=-1)

    def _connect(self, *_args: Any) -> None:
        self._update(opened=1)

    def _close(self, *_args: Any) -> None:
        self._update(opened=-1)
