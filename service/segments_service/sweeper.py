"""Time passing moves contacts across window edges; the sweeper finds and applies those moves.

Every period, per project with time-dependent segments, a read-only statement finds the
contacts that may have crossed a window edge; they are then re-evaluated through the same
locked path as writes (membership.refresh_contacts), so the sweep and concurrent writers
never record an entry or exit twice. A session-level advisory lock lets one replica sweep
a project while the others skip it.

Which contacts: a filter with window W (`triggeredWithin`, `notTriggeredWithin`,
`triggeredOlderThan`, `within`, `olderThan`) can change its answer between two instants
`since` and `now` only for a contact with a matching event, or a timestamp, in
[since - W, now - W) (it left the window: an occurrence no longer counted, summed or
recent), or, for `within`, a timestamp in (since, now] (it reached it); W may be calendar
months, the window's start computed from each instant. So after a first full pass a sweep
reads those ranges from indexes on event names and contact timestamps, rather than
evaluating every contact against every segment; windows on data timestamps (`within`,
`olderThan`, `withinNext` on data.*) are read from the instant each contact's answer can
next turn, kept in `contact_wakeups` (membership/wakeups.py). A pass is full, and
recomputes those instants for every contact, when the project's data windows changed
since they were computed. `since` reaches back OVERLAP further, for
writes that evaluated before the previous sweep and committed after it read; and every
FULL_EVERY passes a full comparison of stored and computed membership runs anyway.

Budgets and fairness (docs/limits.md): every statement of a sweep runs under the background
budget (`SET LOCAL statement_timeout`, SEGMENTS_BACKGROUND_TIMEOUT). A full comparison
reads the project's contacts in slices by id (SLICE at a time, each slice its own
transaction), so no statement holds a snapshot over the whole project; the contacts it
finds, like those an incremental pass finds, are re-evaluated a slice at a time. One pass
serves its projects round-robin, a step (a slice) each in turn, so a large project's
sweep does not hold back a small one's. A step that exceeds the budget fails alone: it is
logged, the rest of the pass goes on, and the project's next pass compares it in full
again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import psycopg
from sqlalchemy import (
    ColumnElement,
    Engine,
    Select,
    Uuid,
    and_,
    except_,
    literal,
    or_,
    select,
    text,
    union,
    union_all,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from segments_service import membership, metrics, tables
from segments_service.filters import Filter, Kind, Op, window_value
from segments_service.membership import wakeups

log = logging.getLogger(__name__)

# The background budget: how long one statement of a sweep may run.
DEFAULT_BACKGROUND_TIMEOUT = 60.0
# Contacts per slice: what one comparison statement reads, and one step re-evaluates.
SLICE = 20_000


def set_budget(session: Session, seconds: float) -> None:
    """Until the end of this transaction, each statement may run `seconds`."""
    milliseconds = max(1, round(seconds * 1000))
    session.execute(text(f"SET LOCAL statement_timeout = {milliseconds}"))


def time_dependent_segments(session: Session, project_id: uuid.UUID) -> list[membership.Dynamic]:
    return [s for s in membership.dynamic_segments(session, project_id) if s.time_dependent]


def contact_slice(
    session: Session, project_id: uuid.UUID, after: uuid.UUID | None, size: int
) -> list[uuid.UUID]:
    """The project's next `size` contact ids after `after`, in id order (its primary key)."""
    c = tables.contacts.c
    query = select(c.id).where(c.project_id == project_id).order_by(c.id).limit(size)
    if after is not None:
        query = query.where(c.id > after)
    return list(session.execute(query).scalars())


def stale_among(
    session: Session,
    project_id: uuid.UUID,
    segments: Sequence[membership.Dynamic],
    now: datetime,
    ids: Sequence[uuid.UUID],
) -> list[uuid.UUID]:
    """Which of the contacts from ids[0] to ids[-1] (a slice: the project's contacts in
    that range of ids) have a stored membership of `segments` that differs from their
    conditions at `now`: one statement.

    The slice is a range of ids rather than a list: every table reads it from an index on
    (project_id, contact id), and no plan hashes the whole project to filter it."""
    if not segments or not ids:
        return []
    first, last = literal(ids[0], Uuid), literal(ids[-1], Uuid)

    def within(column: ColumnElement[Any]) -> ColumnElement[bool]:
        return and_(column >= first, column <= last)

    parts = []
    for seg in segments:
        found = seg.members(project_id, now, within).subquery()
        parts.append(select(literal(seg.id, Uuid).label("segment_id"), found.c.contact_id))
    # Each read once: an EXCEPT either way round would otherwise evaluate them twice.
    desired = union_all(*parts).cte("desired")
    m = tables.segment_members.c
    current = (
        select(m.segment_id, m.contact_id)
        .where(
            m.project_id == project_id,
            m.segment_id.in_([s.id for s in segments]),
            within(m.contact_id),
        )
        .cte("current")
    )
    diff = union(
        except_(select(desired.c.segment_id, desired.c.contact_id), select(current)),
        except_(select(current), select(desired.c.segment_id, desired.c.contact_id)),
    ).subquery()
    return list(session.execute(select(diff.c.contact_id).distinct()).scalars())


def stale_contacts(
    session: Session, project_id: uuid.UUID, now: datetime | None = None, size: int = SLICE
) -> list[uuid.UUID]:
    """Contacts whose membership of a time-dependent segment is out of date at `now`
    (default: the database clock), compared a slice at a time in the caller's
    transaction (the sweeper gives each slice its own)."""
    segments = time_dependent_segments(session, project_id)
    if not segments:
        return []
    now = now or membership.db_now(session)
    stale: list[uuid.UUID] = []
    after = None
    while True:
        ids = contact_slice(session, project_id, after, size)
        stale += stale_among(session, project_id, segments, now, ids)
        if len(ids) < size:
            return stale
        after = ids[-1]


# Longer than any write transaction takes between evaluating and committing.
OVERLAP = timedelta(minutes=10)
# A full comparison every this many passes (an hour at the default period).
FULL_EVERY = 60


def crossed_contacts(
    session: Session,
    project_id: uuid.UUID,
    since: datetime,
    now: datetime,
    segments: Sequence[membership.Dynamic] | None = None,
) -> list[uuid.UUID]:
    """Contacts that may have crossed a window edge of a time-dependent segment between
    `since` and `now` (see the module doc); `segments`: the project's time-dependent
    segments, when the caller has them already."""
    if segments is None:
        segments = time_dependent_segments(session, project_id)
    earlier = since - OVERLAP
    parts: list[Select[Any]] = []
    c = tables.contacts.c
    e = tables.events.c
    for seg in segments:
        for f in seg.filters():
            window = f.window
            if window is None:
                continue
            if f.kind is Kind.EVENT:
                # Occurrences that left the window (or fell below a count, or out of an
                # aggregate: events leave a window only by its start passing them).
                parts.append(
                    select(e.contact_id).where(
                        e.project_id == project_id,
                        e.name.in_(f.events),
                        e.occurred_at >= window.before(earlier),
                        e.occurred_at < window.before(now),
                    )
                )
                continue
            if f.kind is Kind.DATA:
                continue  # read below, from the contacts' wakeups
            value = window_value(f)
            crossed = and_(value >= window.before(earlier), value < window.before(now))
            if f.operator is Op.WITHIN:
                crossed = or_(crossed, and_(value > earlier, value <= now))
            parts.append(
                select(c.id.label("contact_id")).where(c.project_id == project_id, crossed)
            )
    if wakeups.data_windows(segments):
        parts.append(wakeups.due(project_id, now))
    if not parts:
        return []
    found = union(*parts).subquery()
    return list(session.execute(select(found.c.contact_id)).scalars())


@dataclass
class ProjectPass:
    """One project's sweep, done a step at a time (see steps())."""

    project_id: uuid.UUID
    since: datetime | None
    budget: float = DEFAULT_BACKGROUND_TIMEOUT
    size: int = SLICE
    moved: int = 0
    # The instant swept up to, once the first step has read it.
    now: datetime | None = None
    # A step exceeded the budget: the pass is incomplete.
    failed: bool = False
    # The project's windows on data timestamps, and whether its contacts' wakeups were
    # computed for other ones (then the pass is full and recomputes them).
    windows: list[Filter] = field(default_factory=list)
    rewake: bool = False

    @property
    def full(self) -> bool:
        return (
            self.rewake or self.since is None or (self.now is not None and self.since >= self.now)
        )

    def steps(self, sessions: sessionmaker[Session]) -> Iterator[None]:
        """Each step is one slice: its comparison (full passes) and re-evaluation, each
        transaction under the budget. A step over the budget is logged and skipped."""
        segments: list[membership.Dynamic] = []
        crossed: list[uuid.UUID] | None = None
        with self._step(), sessions.begin() as session:
            set_budget(session, self.budget)
            segments = time_dependent_segments(session, self.project_id)
            if segments:
                now = self.now = membership.db_now(session)
                every = membership.dynamic_segments(
                    session, self.project_id, states=(membership.STORED, membership.BUILDING)
                )
                self.windows = wakeups.data_windows(every)
                recorded = wakeups.recorded(session, self.project_id)
                self.rewake = recorded != wakeups.signature(self.windows)
                if not self.full:
                    assert self.since is not None
                    crossed = crossed_contacts(session, self.project_id, self.since, now, segments)
        if not segments or self.failed:
            return
        if crossed is not None:
            for start in range(0, len(crossed), self.size):
                with self._step():
                    self._refresh(sessions, crossed[start : start + self.size])
                yield
            return
        after: uuid.UUID | None = None
        while True:
            ids: list[uuid.UUID] | None = None
            with self._step():
                with sessions.begin() as session:
                    set_budget(session, self.budget)
                    ids = contact_slice(session, self.project_id, after, self.size)
                    stale = stale_among(session, self.project_id, segments, now, ids) if ids else []
                    if self.rewake and ids:
                        wakeups.refresh(
                            session, self.project_id, self.windows, now, first=ids[0], last=ids[-1]
                        )
                self._refresh(sessions, stale)
            if ids is None:
                # Not even the slice's ids were read: read them alone to go past it.
                with self._step(), sessions.begin() as session:
                    set_budget(session, self.budget)
                    ids = contact_slice(session, self.project_id, after, self.size)
                if ids is None:
                    return
            if len(ids) < self.size:
                if self.rewake and not self.failed:
                    with self._step(), sessions.begin() as session:
                        set_budget(session, self.budget)
                        wakeups.record(session, self.project_id, self.windows)
                return
            after = ids[-1]
            yield

    def _refresh(self, sessions: sessionmaker[Session], contacts: Sequence[uuid.UUID]) -> None:
        """Re-evaluate contacts through the writers' locked path, CHUNK per transaction.
        Their entries and exits are measured (metrics.TRACKER_LAG) from the instant the
        previous pass covered: the earliest a contact can have crossed an edge since."""
        origin = self.since or self.now
        since = origin.timestamp() if origin is not None else time.time()
        with metrics.tracking("sweep", since):
            for start in range(0, len(contacts), membership.CHUNK):
                with sessions.begin() as session:
                    set_budget(session, self.budget)
                    membership.refresh_contacts(
                        session, self.project_id, contacts[start : start + membership.CHUNK]
                    )
        self.moved += len(contacts)
        metrics.SWEEP_CONTACTS.inc(len(contacts))

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """One step's work: a statement over the budget fails this step only."""
        try:
            yield
        except DBAPIError as err:
            if not isinstance(err.orig, psycopg.errors.QueryCanceled):
                raise
            self.failed = True
            log.warning(
                "sweep step of project %s exceeded the %.0f s budget; skipped, and the "
                "project's next pass covers it again",
                self.project_id,
                self.budget,
            )


class Step(Enum):
    MORE = "more"
    DONE = "done"
    # Another replica holds the project: it sweeps it.
    SKIPPED = "skipped"


def run_step(engine: Engine, work: ProjectPass, steps: Iterator[None]) -> Step:
    """One step of a project's pass, under the project's sweep lock (session-level, on a
    connection of its own, released after the step)."""
    with engine.connect() as lock_conn:
        key = membership.advisory_key("sweep", work.project_id)
        got = lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        lock_conn.commit()
        if not got:
            return Step.SKIPPED
        try:
            next(steps)
            return Step.MORE
        except StopIteration:
            return Step.DONE
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            lock_conn.commit()


def sweep_project(
    engine: Engine,
    sessions: sessionmaker[Session],
    project_id: uuid.UUID,
    since: datetime | None = None,
    *,
    budget: float = DEFAULT_BACKGROUND_TIMEOUT,
    size: int = SLICE,
) -> tuple[int, datetime | None]:
    """Re-evaluate one project's contacts that time may have moved: all whose stored
    membership differs from their condition now, or with `since`, those that may have
    crossed a window edge since then. Answers (contacts re-evaluated, the instant swept
    up to), or (0, None) if another replica is sweeping the project."""
    work = ProjectPass(project_id, since, budget, size)
    steps = work.steps(sessions)
    while (step := run_step(engine, work, steps)) is Step.MORE:
        pass
    if step is Step.SKIPPED:
        return work.moved, None
    return work.moved, work.now


@dataclass
class SweepState:
    """Per project: the instant the last sweep covered and passes since a full one."""

    swept: dict[uuid.UUID, tuple[datetime, int]] = field(default_factory=dict)

    def since(self, project_id: uuid.UUID) -> datetime | None:
        last = self.swept.get(project_id)
        if last is None or last[1] + 1 >= FULL_EVERY:
            return None
        return last[0]

    def record(self, project_id: uuid.UUID, now: datetime, full: bool) -> None:
        passes = 0 if full else self.swept[project_id][1] + 1
        self.swept[project_id] = (now, passes)


def sweep_once(
    engine: Engine,
    sessions: sessionmaker[Session],
    state: SweepState | None = None,
    *,
    budget: float = DEFAULT_BACKGROUND_TIMEOUT,
    size: int = SLICE,
    projects: Sequence[uuid.UUID] | None = None,
) -> int:
    """One pass over every project with time-dependent segments (or over `projects`, in
    that order), a step of each in turn (round-robin); with `state`, sweeps after a
    project's first are incremental (see the module doc). Answers how many contacts were
    re-evaluated."""
    if projects is None:
        s = tables.segments.c
        with sessions.begin() as session:
            set_budget(session, budget)
            projects = list(
                session.execute(
                    select(s.project_id)
                    .distinct()
                    .where(s.type == "DYNAMIC", s.time_dependent)
                    .order_by(s.project_id)
                ).scalars()
            )
    queue: deque[tuple[ProjectPass, Iterator[None]]] = deque()
    for project_id in projects:
        since = state.since(project_id) if state is not None else None
        work = ProjectPass(project_id, since, budget, size)
        queue.append((work, work.steps(sessions)))
    moved = 0
    while queue:
        work, steps = queue.popleft()
        step = run_step(engine, work, steps)
        if step is Step.MORE:
            queue.append((work, steps))
            continue
        moved += work.moved
        if step is Step.DONE and state is not None and work.now is not None and not work.failed:
            state.record(work.project_id, work.now, full=work.full)
    return moved


class Sweeper(threading.Thread):
    """Runs sweep_once every `period` seconds (with jitter, so replicas spread out)."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        period: float,
        background_timeout: float,
    ) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.engine = engine
        self.sessions = sessions
        self.period = period
        self.background_timeout = background_timeout
        self.stopping = threading.Event()
        self.state = SweepState()

    def run(self) -> None:
        while not self.stopping.wait(self.period * random.uniform(0.8, 1.2)):
            started = time.perf_counter()
            try:
                moved = sweep_once(
                    self.engine, self.sessions, self.state, budget=self.background_timeout
                )
            except Exception:
                # The database may be restarting; the next period tries again.
                log.exception("sweep failed")
                continue
            seconds = time.perf_counter() - started
            metrics.SWEEP_DURATION.observe(seconds)
            # Routine work is not news: a healthy server's log stays quiet, and the metrics
            # (segments_sweep_*) tell how much each pass did.
            log.debug("sweep re-evaluated %d contacts in %.3f s", moved, seconds)

    def stop(self) -> None:
        self.stopping.set()
