"""The feed of entry/exit events that WatchSegmentEvents streams, with gap-free resume.

Each recorded entry/exit event has a position in its project's feed (events.feed_seq),
allocated under a row lock held until commit (migration 0003), so positions become
visible in order. A cursor is a position: resuming after it neither repeats nor misses.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.types import Text

from segments_service import event_ids
from segments_service.errors import ValidationError

BATCH = 500
_CURSOR = re.compile(r"^\d{1,18}$")


@dataclass(frozen=True)
class Cursor:
    """A position in a project's feed."""

    seq: int

    def __str__(self) -> str:
        return str(self.seq)

    @classmethod
    def parse(cls, raw: str, field: str = "after") -> Cursor:
        if not _CURSOR.match(raw.strip()):
            raise ValidationError.single(field, "is not a cursor returned by this stream")
        return cls(int(raw.strip()))


def start_cursor(session: Session, project_id: uuid.UUID) -> Cursor:
    """Where a stream that asks for "from now on" starts: after the last committed event."""
    last = session.execute(
        text("SELECT last_seq FROM feed_positions WHERE project_id = :p"), {"p": project_id}
    ).scalar_one_or_none()
    return Cursor(int(last or 0))


@dataclass(frozen=True)
class FeedEvent:
    cursor: Cursor
    # The event's public id (event_ids.public_event_id), never the row's own.
    event_id: str
    name: str
    segment_id: str
    segment_name: str
    contact_id: uuid.UUID
    email: str
    occurred_at: datetime

    @property
    def kind(self) -> str:
        return "entry" if self.name.endswith(".entry") else "exit"


_READ = text(
    """
    SELECT e.id, e.feed_seq, e.name, e.data, e.occurred_at, e.contact_id, c.email
    FROM events e
    JOIN contacts c ON c.project_id = e.project_id AND c.id = e.contact_id
    WHERE e.project_id = :project_id AND e.feed_seq > :after
      AND (CAST(:segment_ids AS text[]) IS NULL OR e.data ->> 'segmentId' = ANY(:segment_ids))
    ORDER BY e.feed_seq
    LIMIT :limit
    """
).bindparams(bindparam("segment_ids", type_=ARRAY(Text)))


def read_after(
    session: Session,
    project_id: uuid.UUID,
    after: Cursor,
    segment_ids: Sequence[str] | None,
    limit: int = BATCH,
) -> list[FeedEvent]:
    rows: Any = session.execute(
        _READ,
        {
            "project_id": project_id,
            "after": after.seq,
            "segment_ids": list(segment_ids) if segment_ids else None,
            "limit": limit,
        },
    )
    key = event_ids.key_for(session, project_id)
    return [
        FeedEvent(
            cursor=Cursor(r.feed_seq),
            event_id=event_ids.public_event_id(key, r.id),
            name=r.name,
            segment_id=str(r.data.get("segmentId", "")),
            segment_name=str(r.data.get("segmentName", "")),
            contact_id=r.contact_id,
            email=r.email,
            occurred_at=r.occurred_at,
        )
        for r in rows
    ]
