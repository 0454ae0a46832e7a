"""The delivery worker of one server: finds webhooks with work, and delivers each one's
events in feed order, several webhooks at once.

Each server runs one WebhookWorker thread (a dispatcher) and a small pool of delivery
threads (SEGMENTS_WEBHOOK_WORKERS). The dispatcher polls for webhooks with work
(outbox.due_webhooks) and hands each to a free thread, the projects served round-robin and
at most SEGMENTS_WEBHOOK_PROJECT_WORKERS threads on one project's webhooks, so one
project's slow or dead receivers do not hold up another project's deliveries.

A thread's turn on a webhook holds the webhook's advisory lock, taken on a connection of
its own with pg_try_advisory_lock: one server delivers a webhook at a time, across every
replica, and a server that dies loses the lock with its connection, so another (or the
restarted one) carries on at once. The lock's connection is idle between its two
statements; the turn's work runs in short transactions on other connections, and no
transaction is open during an HTTP attempt. A turn copies new events from the feed into
the outbox, then attempts the oldest PENDING deliveries in feed order until one fails
(it is retried after a backoff: the later ones wait behind it), nothing is due, or the
turn's slice (SLICE_EVENTS, SLICE_SECONDS) is used up.

Deliveries are marked DELIVERED after their 2xx, up to RECORD_BATCH of them together (at
most RECORD_SECONDS later), and always before the turn ends or the webhook's next
deliveries are read: an event is POSTed twice only when a server dies between the
receiver's answer and that commit (at most RECORD_BATCH events), or loses its database
connection meanwhile. At least once, and once in the normal case (a SIGTERM lets the
turn finish and record).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments_service import metrics
from segments_service.config import WebhookSettings
from segments_service.membership import advisory_key
from segments_service.sweeper import set_budget
from segments_service.webhooks import outbox
from segments_service.webhooks.outbox import Due, WebhookKey
from segments_service.webhooks.sender import Sender

log = logging.getLogger(__name__)

# A turn attempts at most this many deliveries, or for about this long, then lets the
# thread go to another webhook (the webhook is found again at once if it has more).
SLICE_EVENTS = 200
SLICE_SECONDS = 5.0
# PENDING deliveries read at once, in feed order.
ATTEMPT_BATCH = 50
# Deliveries made are marked DELIVERED together, this many or after this long at most: a
# transaction per delivery would bound a webhook to a few hundred a second.
RECORD_BATCH = 20
RECORD_SECONDS = 0.1
# PENDING deliveries a webhook may have copied ahead of its next attempt; the feed holds
# the rest of a backlog.
READ_AHEAD = 1000
# Deliveries of a deleted webhook removed per transaction.
PURGE_SLICE = 5000
# How often the worker counts the deliveries waiting (metrics.WEBHOOK_BACKLOG).
BACKLOG_SECONDS = 1.0
# How often finished deliveries past their retention are removed, and how many at once.
PRUNE_SECONDS = 60.0
PRUNE_SLICE = 5000


def retry_delay(settings: WebhookSettings, attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones: exponential, at most
    `retry_longest`, with jitter (between half and all of it)."""
    base = min(settings.retry_longest, settings.retry_first * 2.0 ** max(0, attempts - 1))
    return float(base * random.uniform(0.5, 1.0))


def round_robin(due: Sequence[Due]) -> list[Due]:
    """`due` reordered so that projects take turns, each keeping its own order."""
    by_project: dict[uuid.UUID, list[Due]] = defaultdict(list)
    for item in due:
        by_project[item.key.project_id].append(item)
    ordered: list[Due] = []
    queues = list(by_project.values())
    while queues:
        ordered.extend(q.pop(0) for q in queues)
        queues = [q for q in queues if q]
    return ordered


@dataclass
class Unrecorded:
    """Deliveries made and not yet marked DELIVERED."""

    seqs: list[int] = field(default_factory=list)
    since: float = 0.0

    def add(self, feed_seq: int) -> None:
        if not self.seqs:
            self.since = time.monotonic()
        self.seqs.append(feed_seq)

    def due(self) -> bool:
        return len(self.seqs) >= RECORD_BATCH or time.monotonic() - self.since >= RECORD_SECONDS

    def flush(self, session: Session, key: WebhookKey) -> bool:
        """Marks them DELIVERED in `session`; answers whether the webhook still exists."""
        if not self.seqs:
            return True
        live = outbox.record_delivered(session, key, self.seqs)
        self.seqs = []
        return live


@dataclass
class Stats:
    """What this server's worker has done (tests, benchmarks)."""

    delivered: int = 0
    failed_attempts: int = 0


class WebhookWorker(threading.Thread):
    """Delivers webhooks until stopped (see the module doc)."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        settings: WebhookSettings,
        background_timeout: float,
        *,
        projects: Sequence[uuid.UUID] | None = None,
        sender: Sender | None = None,
    ) -> None:
        super().__init__(name="webhooks", daemon=True)
        self.engine = engine
        self.sessions = sessions
        self.settings = settings
        self.budget = background_timeout
        # Only these projects' webhooks (tests); None: every project.
        self.projects = list(projects) if projects is not None else None
        self.sender = sender or Sender(settings.allow_private, settings.timeout)
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.stats = Stats()
        self._stats_lock = threading.Lock()

    def stop(self) -> None:
        """Start no new attempt; the ones in flight finish (each within the timeout)."""
        self.stopping.set()
        self.wake.set()

    # -- the dispatcher ----------------------------------------------------------------

    def run(self) -> None:
        pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="webhook")
        running: dict[WebhookKey, Future[bool]] = {}
        pruned = time.monotonic()
        counted = 0.0
        try:
            while not self.stopping.is_set():
                for key, future in list(running.items()):
                    if future.done():
                        del running[key]
                free = self.settings.workers - len(running)
                if free > 0:
                    self._dispatch(pool, running, free)
                if time.monotonic() - counted >= BACKLOG_SECONDS:
                    counted = time.monotonic()
                    self._count_backlog()
                if time.monotonic() - pruned > PRUNE_SECONDS:
                    pruned = time.monotonic()
                    self._prune()
                self.wake.wait(self.settings.poll_seconds)
                self.wake.clear()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _dispatch(
        self, pool: ThreadPoolExecutor, running: dict[WebhookKey, Future[bool]], free: int
    ) -> None:
        try:
            with self._transaction() as session:
                due = outbox.due_webhooks(
                    session, READ_AHEAD, 4 * self.settings.workers + len(running), self.projects
                )
        except Exception:
            log.exception("could not read the webhooks with work")
            return
        per_project = Counter(key.project_id for key in running)
        for item in round_robin(due):
            if free == 0:
                break
            project_id = item.key.project_id
            if item.key in running or per_project[project_id] >= self.settings.project_workers:
                continue
            future = pool.submit(self._turn, item)
            future.add_done_callback(self._finished)
            running[item.key] = future
            per_project[project_id] += 1
            free -= 1

    def _finished(self, future: Future[bool]) -> None:
        # A turn that stopped with work left wakes the dispatcher at once; the others
        # wait for the next poll (a webhook locked by another server would spin).
        if not future.cancelled() and future.exception() is None and future.result():
            self.wake.set()

    def _count_backlog(self) -> None:
        try:
            with self._transaction() as session:
                backlog = outbox.backlog(session, self.projects)
        except Exception:
            return  # the database may be restarting: the dispatch says so, once a poll
        metrics.WEBHOOK_BACKLOG.set(backlog)

    def _prune(self) -> None:
        try:
            with self._transaction() as session:
                outbox.prune_finished(session, self.settings.retention, PRUNE_SLICE)
        except Exception:
            log.exception("could not prune finished webhook deliveries")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A short transaction under the background budget, committed without waiting for
        its WAL flush: if the database crashes before the flush, the worker's state goes
        back to an earlier consistent point (the feed it copies from is committed durably
        by the writers), and the deliveries since are made again. At least once either way;
        a flush per delivery would bound a webhook to a few hundred deliveries a second."""
        with self.sessions.begin() as session:
            set_budget(session, self.budget)
            session.execute(text("SET LOCAL synchronous_commit = off"))
            yield session

    # -- a turn on one webhook ------------------------------------------------------------

    def _turn(self, due: Due) -> bool:
        """Deliver what is due of one webhook under its lock; answers whether it stopped
        with work left (its slice was used up)."""
        try:
            with self.engine.connect() as lock:
                lock_key = advisory_key("webhook", due.key.id)
                got = lock.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key})
                taken = bool(got.scalar())
                lock.commit()
                if not taken:
                    return False  # another server is delivering it
                try:
                    if due.deleted:
                        return not self._purge(due.key)
                    return self._deliver(due.key)
                finally:
                    lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key})
                    lock.commit()
        except Exception:
            # The database may be restarting: the webhook is found again at the next poll.
            log.exception("webhook %s: delivery turn failed", due.key.id)
            return False

    def _purge(self, key: WebhookKey) -> bool:
        with self._transaction() as session:
            return outbox.purge_deleted(session, key, PURGE_SLICE)

    def _deliver(self, key: WebhookKey) -> bool:
        started = time.monotonic()
        sent = 0
        # Delivered, not yet recorded: recorded together, every RECORD_BATCH deliveries or
        # RECORD_SECONDS, before anything else is read or recorded, and when the turn ends.
        unrecorded = Unrecorded()
        try:
            while not self.stopping.is_set():
                with self._transaction() as session:
                    if not unrecorded.flush(session, key):
                        return True  # deleted meanwhile: the next turn removes its deliveries
                    if outbox.fan_out(session, key, READ_AHEAD) is None:
                        return True
                    attempts = outbox.next_attempts(session, key, ATTEMPT_BATCH)
                if not attempts:
                    return False
                for attempt in attempts:
                    if self.stopping.is_set():
                        return False
                    if not self._attempt(key, attempt, unrecorded):
                        return False
                    sent += 1
                    if sent >= SLICE_EVENTS or time.monotonic() - started >= SLICE_SECONDS:
                        return True
            return False
        finally:
            if unrecorded.seqs:
                with self._transaction() as session:
                    unrecorded.flush(session, key)

    def _attempt(self, key: WebhookKey, attempt: outbox.Attempt, unrecorded: Unrecorded) -> bool:
        """One POST and its record; answers whether the next delivery may follow now."""
        outcome = self.sender.post(attempt.url, attempt.secret, attempt.body.encode())
        if outcome.delivered:
            metrics.WEBHOOK_DELIVERED.inc()
            with self._stats_lock:
                self.stats.delivered += 1
            unrecorded.add(attempt.feed_seq)
            if not unrecorded.due():
                return True
            with self._transaction() as session:
                return unrecorded.flush(session, key)
        metrics.WEBHOOK_FAILURES.inc()
        with self._stats_lock:
            self.stats.failed_attempts += 1
        error = outcome.error or "failed"
        with self._transaction() as session:
            live = unrecorded.flush(session, key)
            go_on = live and outbox.record_failed(
                session,
                key,
                attempt.feed_seq,
                error,
                retry_delay(self.settings, attempt.attempts + 1),
                self.settings.give_up,
            )
        if go_on:
            metrics.WEBHOOK_GIVEN_UP.inc()
            log.warning(
                "webhook %s: gave up on event %s after %d attempts: %s",
                key.id,
                attempt.feed_seq,
                attempt.attempts + 1,
                error,
            )
        else:
            log.info("webhook %s: attempt failed (%s); retrying later", key.id, error)
        return go_on
