"""What a build is and how it is started: its states and phases, its settings, and
queueing (or replacing, or cancelling) a segment's build."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from segments_service import config, membership, tables

READY, BUILDING, FAILED = "READY", "BUILDING", "FAILED"
COMPUTE, APPLY, CATCHUP, FINAL = "compute", "apply", "catchup", "final"
# Failed steps after the compute are retried this many times before the build fails.
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class BuildSettings:
    """Where builds leave the request, and how the background runs them."""

    inline_contacts: int = config.DEFAULT_INLINE_BUILD_CONTACTS
    slice: int = config.DEFAULT_BUILD_SLICE
    budget: float = config.DEFAULT_BACKGROUND_TIMEOUT  # seconds, per statement

    @classmethod
    def from_env(cls) -> BuildSettings:
        s = config.Settings.from_env()
        return cls(s.inline_build_contacts, s.build_slice, s.background_timeout)


def builds_inline(session: Session, project_id: uuid.UUID, limit: int) -> bool:
    """Whether the project is small enough to build inside the request (counted cheaply)."""
    n = session.execute(
        text("SELECT count(*) FROM (SELECT 1 FROM contacts WHERE project_id = :p LIMIT :n) small"),
        {"p": project_id, "n": limit + 1},
    ).scalar_one()
    return int(n) <= limit


def cancel_build(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> None:
    """Forget a segment's build, its shadow and dirty contacts, and mark it READY and
    stored: the caller (an inline rebuild, under the exclusive lock) stores its membership."""
    for table in (
        tables.segment_builds,
        tables.segment_build_shadow,
        tables.segment_build_dirty,
    ):
        session.execute(
            delete(table).where(table.c.project_id == project_id, table.c.segment_id == segment_id)
        )
    s = tables.segments
    session.execute(
        update(s)
        .where(s.c.project_id == project_id, s.c.id == segment_id)
        .values(status=READY, status_reason=None, membership_state=membership.STORED)
    )


def start_build(
    session: Session,
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    *,
    previous_condition: Any,
    enter_all: bool,
) -> None:
    """Mark the segment BUILDING and queue its build (a new generation of it).

    The caller holds the project's membership lock exclusively, so every writer that
    commits later sees the segment `building` and notes its contacts as dirty.
    `previous_condition`: the condition its stored memberships follow, which comes back
    if the build fails (None: nothing to come back to). `enter_all`: tracking was turned
    on, every member gets an entry event (not only the difference)."""
    s = tables.segments
    b = tables.segment_builds
    row = session.execute(
        select(s.c.membership_state, s.c.build_generation).where(
            s.c.project_id == project_id, s.c.id == segment_id
        )
    ).one()
    existing = session.execute(
        select(b).where(b.c.project_id == project_id, b.c.segment_id == segment_id)
    ).first()
    entered_to = None
    if existing is not None and existing.enter_all:
        # Its apply entered every member up to its cursor; after it, all of them.
        if existing.phase == COMPUTE:
            enter_all, entered_to = True, existing.entered_to
        elif existing.phase == APPLY:
            done = [i for i in (existing.entered_to, existing.cursor) if i is not None]
            enter_all, entered_to = True, max(done, default=None)
    if existing is not None:
        # Before its apply, a build has not touched the stored memberships: they still
        # follow the condition its own predecessor kept.
        untouched = existing.phase == COMPUTE and existing.failure is None
        previous_condition = existing.previous_condition if untouched else None
    elif row.membership_state != membership.STORED:
        previous_condition = None
    if enter_all:
        previous_condition = None  # the entries of the kept members were never recorded
    generation = row.build_generation + 1
    values = {
        "generation": generation,
        "phase": COMPUTE,
        "cursor": None,
        "previous_condition": previous_condition,
        "enter_all": enter_all,
        "entered_to": entered_to,
        "failure": None,
        "attempts": 0,
        "moved": 0,
        "queued_at": func.clock_timestamp(),
    }
    upsert = pg_insert(b).values(project_id=project_id, segment_id=segment_id, **values)
    session.execute(
        upsert.on_conflict_do_update(
            index_elements=[b.c.project_id, b.c.segment_id],
            set_={k: upsert.excluded[k] for k in values if k != "queued_at"},
        )
    )
    sh = tables.segment_build_shadow
    session.execute(delete(sh).where(sh.c.project_id == project_id, sh.c.segment_id == segment_id))
    session.execute(
        update(s)
        .where(s.c.project_id == project_id, s.c.id == segment_id)
        .values(
            status=BUILDING,
            status_reason=None,
            membership_state=membership.BUILDING,
            build_generation=generation,
        )
    )


def queued_projects(session: Session) -> list[uuid.UUID]:
    b = tables.segment_builds.c
    return list(session.execute(select(b.project_id).distinct().order_by(b.project_id)).scalars())
