"""The project's membership advisory lock, the contacts' row locks, and the transaction's
clock and statement budget."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from segments_service import config, tables


def advisory_key(purpose: str, project_id: uuid.UUID) -> int:
    """A signed 64-bit advisory lock key for one purpose ("membership", "sweep") of a project."""
    digest = hashlib.blake2b(f"{purpose}:".encode() + project_id.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_shared(session: Session, project_id: uuid.UUID) -> None:
    session.execute(
        text("SELECT pg_advisory_xact_lock_shared(:k)"),
        {"k": advisory_key("membership", project_id)},
    )


def lock_exclusive(session: Session, project_id: uuid.UUID) -> None:
    session.execute(
        text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("membership", project_id)}
    )


# The budget of every background statement (a slice of a build, a sweep's), and of the
# inline builds of small projects, in seconds: none runs unbounded (docs/limits.md).
BACKGROUND_TIMEOUT = config.background_timeout()


def allow_long_statements(session: Session, seconds: float | None = None) -> None:
    """Until the end of this transaction, statements may run for the background budget."""
    budget = BACKGROUND_TIMEOUT if seconds is None else seconds
    session.execute(text(f"SET LOCAL statement_timeout = {max(1, round(budget * 1000))}"))


def db_now(session: Session) -> datetime:
    """The database clock, so windows agree with timestamps the database wrote."""
    now: datetime = session.execute(select(func.clock_timestamp())).scalar_one()
    return now


def db_clock(session: Session) -> tuple[datetime, datetime]:
    """The database clock (db_now) and the start of the transaction, when what it stores
    with `now()` is dated."""
    row = session.execute(select(func.clock_timestamp(), func.now())).one()
    return row[0], row[1]


def lock_contacts(
    session: Session, project_id: uuid.UUID, contact_ids: Iterable[uuid.UUID]
) -> list[uuid.UUID]:
    """Lock these contacts' rows until commit, in id order; answers the ids that exist.

    The caller holds the project's shared membership lock (lock_shared). Every writer that
    re-evaluates membership for contacts takes these locks first (after that lock, before
    any statement that takes the count or feed locks): concurrent writers of one contact evaluate one after the other, each
    statement seeing the events of those before it, and two writers never wait on each
    other in opposite orders. Writers of events hold at least a KEY SHARE lock of their
    contacts (contacts.ensure_contacts) so none can be deleted meanwhile: events and
    memberships have no foreign key to contacts (migrations 0004 and 0008).
    """
    wanted = list(set(contact_ids))
    if not wanted:
        return []
    c = tables.contacts.c
    locked = session.execute(
        select(c.id)
        .where(c.project_id == project_id, c.id == tables.any_uuid(wanted))
        .order_by(c.id)
        # FOR NO KEY UPDATE: static list inserts (a foreign key) still pass.
        .with_for_update(key_share=True)
    )
    # Fetched at once: row by row was a fetch call per contact.
    return list(locked.scalars().all())
