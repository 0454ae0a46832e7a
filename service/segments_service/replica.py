"""Reads that may lag, served by a streaming standby (DATABASE_REPLICA_URL) while it answers
and is at most SEGMENTS_REPLICA_MAX_LAG seconds behind the primary; by the primary otherwise.

Which RPCs may lag is decided here alone (MAY_LAG): listings, exports, previews and counts of
unsaved conditions, a segment's feed and history. They read and write nothing else, so none
reads after a write of its own. Every other RPC (each write, and each read a caller makes to
see what it just wrote: GetSegment after CreateSegment, GetContact after UpsertContact) is the
primary's. The key of a request is looked up on the primary in either case: a key revoked a
moment ago is refused, one created a moment ago works.

How far behind: a thread samples the primary's WAL position (`pg_current_wal_lsn()`) and then
the standby's replayed position (`pg_last_wal_replay_lsn()`) every `interval` seconds. The
standby shows everything the primary had written at the newest sample its replay has reached;
its lag is the age of that sample. An idle primary writes nothing, so its standby is not behind
however long ago its last transaction was (which `now() - pg_last_xact_replay_timestamp()`
would count as lag). Between samples the lag is taken to grow with time, so a decision never
rests on a stale measurement; a standby not measured for `interval * 4` is not used.

A standby that cannot be reached never fails a request: the measuring thread marks it down,
as does a read that loses its connection (that read is then run again on the primary), and
the thread keeps trying, so reads return to it once it answers and has caught up.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import psycopg
import psycopg.errors
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from segments_service import metrics

log = logging.getLogger(__name__)

# The RPCs whose reads may be served by the standby: full method names.
MAY_LAG: frozenset[str] = frozenset(
    {
        "/segments.v1.SegmentService/ListSegments",
        "/segments.v1.SegmentService/ListSegmentContacts",
        "/segments.v1.SegmentService/ExportSegmentContacts",
        "/segments.v1.SegmentService/ExportSegmentCsv",
        "/segments.v1.SegmentService/PreviewSegment",
        "/segments.v1.SegmentService/CountMatchingContacts",
        "/segments.v1.SegmentService/ListSegmentEvents",
        "/segments.v1.SegmentService/GetSegmentHistory",
        "/segments.v1.ContactService/ListContacts",
    }
)

DEFAULT_INTERVAL = 0.5


def parse_lsn(raw: str) -> int:
    """A WAL position (`16/B374D848`) as a byte offset."""
    high, low = raw.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class LagClock:
    """The primary's WAL positions and when they were sampled: what a standby's replayed
    position says of how old the data it shows is."""

    def __init__(self, horizon: float) -> None:
        self.horizon = horizon
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def primary_at(self, moment: float, position: int) -> None:
        self.samples.append((moment, position))
        while len(self.samples) > 1 and moment - self.samples[1][0] > self.horizon:
            self.samples.popleft()

    def lag(self, replayed: int, now: float) -> tuple[float, bool]:
        """(seconds, exact): the age of the newest sample the standby has replayed; when it
        is behind every sample kept, at least the age of the oldest (exact False)."""
        for moment, position in reversed(self.samples):
            if position <= replayed:
                return max(0.0, now - moment), True
        oldest = self.samples[0][0] if self.samples else now
        return max(0.0, now - oldest), False


@dataclass(frozen=True)
class Verdict:
    """Whether the standby may serve a read now, and why (a label of the reads counter)."""

    standby: bool
    reason: str  # fresh | down | unmeasured | lagging


def unreachable(exc: BaseException) -> bool:
    """Whether a read failed because its database went away (not for anything it asked)."""
    if not isinstance(exc, DBAPIError):
        return False
    if isinstance(exc.orig, psycopg.errors.QueryCanceled):
        return False  # the request's own budget
    return bool(exc.connection_invalidated) or isinstance(exc.orig, psycopg.OperationalError)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class Replica:
    """The standby of one server process: its sessions, and whether it may serve now."""

    def __init__(
        self,
        primary_url: str,
        standby_url: str,
        sessions: sessionmaker[Session],
        stream_sessions: sessionmaker[Session],
        max_lag: float,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.primary_url = _libpq(primary_url)
        self.standby_url = _libpq(standby_url)
        self.sessions = sessions
        self.stream_sessions = stream_sessions
        self.max_lag = max_lag
        self.interval = interval
        self.clock = LagClock(horizon=max(2 * max_lag, 10.0))
        self._lock = threading.Lock()
        self._up = False
        self._measured_at: float | None = None
        self._lag = 0.0
        self._exact = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections: dict[str, psycopg.Connection[tuple[object, ...]]] = {}
        self._warned = False

    def verdict(self) -> Verdict:
        now = time.monotonic()
        with self._lock:
            if not self._up:
                return Verdict(False, "down")
            if self._measured_at is None or now - self._measured_at > 4 * self.interval:
                return Verdict(False, "unmeasured")
            lag = self._lag + (now - self._measured_at)
            if not self._exact or lag > self.max_lag:
                return Verdict(False, "lagging")
        return Verdict(True, "fresh")

    def failed(self, exc: BaseException) -> None:
        """A read lost its standby connection: none goes there until it is measured again."""
        with self._lock:
            was_up, self._up = self._up, False
        metrics.REPLICA_UP.set(0)
        if was_up:  # once, not for each of the reads in flight when it went away
            log.warning("the standby failed a read; reads go to the primary: %s", exc)

    def start(self) -> Replica:
        self._thread = threading.Thread(target=self._run, name="replica-lag", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.measure()
            self._stop.wait(self.interval)

    def _query(self, which: str, url: str, sql: str) -> tuple[object, ...]:
        conn = self._connections.get(which)
        if conn is None or conn.closed:
            conn = psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=2,
                application_name=f"segments:replica-lag:{which}",
                options="-c statement_timeout=2000",
            )
            self._connections[which] = conn
        try:
            row = conn.execute(sql).fetchone()
        except psycopg.Error:
            conn.close()
            raise
        assert row is not None
        return row

    def measure(self) -> None:
        """One sample of the primary's position, then the standby's: its lag, or down."""
        try:
            sampled = time.monotonic()
            (position,) = self._query("primary", self.primary_url, "SELECT pg_current_wal_lsn()")
            self.clock.primary_at(sampled, parse_lsn(str(position)))
            recovering, replayed = self._query(
                "standby",
                self.standby_url,
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()",
            )
        except psycopg.Error as exc:
            self._down(f"cannot be measured: {exc}".strip())
            return
        if not recovering or replayed is None:
            self._down("DATABASE_REPLICA_URL is not a standby (pg_is_in_recovery() is false)")
            return
        now = time.monotonic()
        replayed_at = parse_lsn(str(replayed))
        lag, exact = self.clock.lag(replayed_at, now)
        behind = max(0, self.clock.samples[-1][1] - replayed_at)
        with self._lock:
            was_up = self._up
            self._up, self._measured_at, self._lag, self._exact = True, now, lag, exact
        self._warned = False
        if not was_up:
            log.info("the standby answers (%.3f s behind); it serves the reads that may lag", lag)
        metrics.REPLICA_UP.set(1)
        metrics.REPLICA_LAG_SECONDS.set(lag)
        metrics.REPLICA_LAG_BYTES.set(behind)

    def _down(self, why: str) -> None:
        with self._lock:
            self._up = False
        metrics.REPLICA_UP.set(0)
        if not self._warned:
            self._warned = True
            log.warning("standby %s; reads go to the primary", why)
