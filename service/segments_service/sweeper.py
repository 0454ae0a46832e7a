"""Time passing moves contacts across window edges; the sweeper finds and applies those moves.

Every period, per project with time-dependent segments, one read-only statement finds the
contacts whose stored membership differs from their condition now; they are then
re-evaluated through the same locked path as writes (membership.refresh_contacts), so the
sweep and concurrent writers never record an entry or exit twice. A session-level advisory
lock lets one replica sweep a project while the others skip it.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid

from sqlalchemy import Engine, except_, select, text, union
from sqlalchemy.orm import Session, sessionmaker

from segments_service import membership, tables

log = logging.getLogger(__name__)


def stale_contacts(session: Session, project_id: uuid.UUID) -> list[uuid.UUID]:
    """Contacts whose membership of a time-dependent segment is out of date right now."""
    segments = [s for s in membership.dynamic_segments(session, project_id) if s.time_dependent]
    if not segments:
        return []
    now = membership.db_now(session)
    desired = membership.desired_members(project_id, segments, None, now)
    m = tables.segment_members.c
    current = select(m.segment_id, m.contact_id).where(
        m.project_id == project_id, m.segment_id.in_([s.id for s in segments])
    )
    diff = union(except_(desired, current), except_(current, desired)).subquery()
    return list(session.execute(select(diff.c.contact_id).distinct()).scalars())


def sweep_project(engine: Engine, sessions: sessionmaker[Session], project_id: uuid.UUID) -> int:
    """Re-evaluate one project's stale contacts; answers how many, or 0 if another replica
    is sweeping it."""
    with engine.connect() as lock_conn:
        key = membership.advisory_key("sweep", project_id)
        got = lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        lock_conn.commit()
        if not got:
            return 0
        try:
            with sessions.begin() as session:
                membership.allow_long_statements(session)
                stale = stale_contacts(session, project_id)
            for start in range(0, len(stale), membership.CHUNK):
                with sessions.begin() as session:
                    membership.refresh_contacts(
                        session, project_id, stale[start : start + membership.CHUNK]
                    )
            return len(stale)
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            lock_conn.commit()


def sweep_once(engine: Engine, sessions: sessionmaker[Session]) -> int:
    s = tables.segments.c
    with sessions.begin() as session:
        projects = list(
            session.execute(
                select(s.project_id).distinct().where(s.type == "DYNAMIC", s.time_dependent)
            ).scalars()
        )
    return sum(sweep_project(engine, sessions, p) for p in projects)


class Sweeper(threading.Thread):
    """Runs sweep_once every `period` seconds (with jitter, so replicas spread out)."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session], period: float) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.engine = engine
        self.sessions = sessions
        self.period = period
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.period * random.uniform(0.8, 1.2)):
            try:
                moved = sweep_once(self.engine, self.sessions)
                if moved:
                    log.info("sweep re-evaluated %d contacts", moved)
            except Exception:
                # The database may be restarting; the next period tries again.
                log.exception("sweep failed")

    def stop(self) -> None:
        self.stopping.set()
