"""Time passing moves contacts across window edges; the sweeper finds and applies those moves.

Every period, per project with time-dependent segments, a read-only statement finds the
contacts that may have crossed a window edge; they are then re-evaluated through the same
locked path as writes (membership.refresh_contacts), so the sweep and concurrent writers
never record an entry or exit twice. A session-level advisory lock lets one replica sweep
a project while the others skip it.

Which contacts: a filter with window W (`triggeredWithin`, `notTriggeredWithin`,
`triggeredOlderThan`, `within`, `olderThan`) can change its answer between two instants
`since` and `now` only for a contact with a matching event, or a timestamp, in
[since - W, now - W) (it left the window), or, for `within`, a timestamp in (since, now]
(it reached it). So after a first full pass a sweep reads those ranges (indexes on event
names and contact timestamps; data timestamps read the project's contacts) rather than
evaluating every contact against every segment. `since` reaches back OVERLAP further, for
writes that evaluated before the previous sweep and committed after it read; and every
FULL_EVERY passes a full comparison of stored and computed membership runs anyway.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, and_, except_, or_, select, text, union
from sqlalchemy.orm import Session, sessionmaker

from segments_service import membership, tables
from segments_service.filters import Kind, Op, window_value

log = logging.getLogger(__name__)


def stale_contacts(
    session: Session, project_id: uuid.UUID, now: datetime | None = None
) -> list[uuid.UUID]:
    """Contacts whose membership of a time-dependent segment is out of date at `now`
    (default: the database clock)."""
    segments = [s for s in membership.dynamic_segments(session, project_id) if s.time_dependent]
    if not segments:
        return []
    now = now or membership.db_now(session)
    desired = membership.desired_members(project_id, segments, None, now)
    m = tables.segment_members.c
    current = select(m.segment_id, m.contact_id).where(
        m.project_id == project_id, m.segment_id.in_([s.id for s in segments])
    )
    diff = union(except_(desired, current), except_(current, desired)).subquery()
    return list(session.execute(select(diff.c.contact_id).distinct()).scalars())


# Longer than any write transaction takes between evaluating and committing.
OVERLAP = timedelta(minutes=10)
# A full comparison every this many passes (an hour at the default period).
FULL_EVERY = 60


def crossed_contacts(
    session: Session, project_id: uuid.UUID, since: datetime, now: datetime
) -> list[uuid.UUID]:
    """Contacts that may have crossed a window edge of a time-dependent segment between
    `since` and `now` (see the module doc)."""
    segments = [s for s in membership.dynamic_segments(session, project_id) if s.time_dependent]
    earlier = since - OVERLAP
    parts: list[Select[Any]] = []
    c = tables.contacts.c
    e = tables.events.c
    for seg in segments:
        for f in seg.filters():
            if f.window is None:
                continue
            lo, hi = earlier - f.window, now - f.window
            if f.kind is Kind.EVENT:
                parts.append(
                    select(e.contact_id).where(
                        e.project_id == project_id,
                        e.name.in_(f.events),
                        e.occurred_at >= lo,
                        e.occurred_at < hi,
                    )
                )
                continue
            value = window_value(f)
            crossed = and_(value >= lo, value < hi)
            if f.operator is Op.WITHIN:
                crossed = or_(crossed, and_(value > earlier, value <= now))
            parts.append(
                select(c.id.label("contact_id")).where(c.project_id == project_id, crossed)
            )
    if not parts:
        return []
    found = union(*parts).subquery()
    return list(session.execute(select(found.c.contact_id)).scalars())


def sweep_project(
    engine: Engine,
    sessions: sessionmaker[Session],
    project_id: uuid.UUID,
    since: datetime | None = None,
) -> tuple[int, datetime | None]:
    """Re-evaluate one project's contacts that time may have moved: all whose stored
    membership differs from their condition now, or with `since`, those that may have
    crossed a window edge since then. Answers (contacts re-evaluated, the instant swept
    up to), or (0, None) if another replica is sweeping the project."""
    with engine.connect() as lock_conn:
        key = membership.advisory_key("sweep", project_id)
        got = lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        lock_conn.commit()
        if not got:
            return 0, None
        try:
            with sessions.begin() as session:
                membership.allow_long_statements(session)
                now = membership.db_now(session)
                if since is None or since >= now:
                    stale = stale_contacts(session, project_id, now)
                else:
                    stale = crossed_contacts(session, project_id, since, now)
            for start in range(0, len(stale), membership.CHUNK):
                with sessions.begin() as session:
                    membership.refresh_contacts(
                        session, project_id, stale[start : start + membership.CHUNK]
                    )
            return len(stale), now
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            lock_conn.commit()


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
    engine: Engine, sessions: sessionmaker[Session], state: SweepState | None = None
) -> int:
    """One pass over every project with time-dependent segments; with `state`, sweeps
    after a project's first are incremental (see the module doc)."""
    s = tables.segments.c
    with sessions.begin() as session:
        projects = list(
            session.execute(
                select(s.project_id).distinct().where(s.type == "DYNAMIC", s.time_dependent)
            ).scalars()
        )
    moved = 0
    for project_id in projects:
        since = state.since(project_id) if state is not None else None
        count, now = sweep_project(engine, sessions, project_id, since)
        moved += count
        if state is not None and now is not None:
            state.record(project_id, now, full=since is None)
    return moved


class Sweeper(threading.Thread):
    """Runs sweep_once every `period` seconds (with jitter, so replicas spread out)."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session], period: float) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.engine = engine
        self.sessions = sessions
        self.period = period
        self.stopping = threading.Event()
        self.state = SweepState()

    def run(self) -> None:
        while not self.stopping.wait(self.period * random.uniform(0.8, 1.2)):
            try:
                moved = sweep_once(self.engine, self.sessions, self.state)
                if moved:
                    log.info("sweep re-evaluated %d contacts", moved)
            except Exception:
                # The database may be restarting; the next period tries again.
                log.exception("sweep failed")

    def stop(self) -> None:
        self.stopping.set()
