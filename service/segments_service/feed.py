"""The feed of entry/exit events that WatchSegmentEvents streams, with gap-free resume.

An event's cursor is (committing transaction id, event id). A reader only takes events of
transactions older than the oldest one still running (pg_snapshot_xmin), in cursor order:
a transaction that commits late has an id at or above that bound, so it is read later,
never skipped. Resuming after a cursor therefore neither repeats nor misses an event.
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

from segments_service.errors import ValidationError

BATCH = 500
_CURSOR = re.compile(r"^(\d{1,20})-(\d{1,20})$")


@dataclass(frozen=True)
class Cursor:
    tx: int
    event_id: int

    def __str__(self) -> str:
        return f"{self.tx}-{self.event_id}"

    @classmethod
    def parse(cls, raw: str, field: str = "after") -> Cursor:
        match = _CURSOR.match(raw.strip())
        if match is None:
            raise ValidationError.single(field, "is not a cursor returned by this stream")
        return cls(int(match.group(1)), int(match.group(2)))


def start_cursor(session: Session) -> Cursor:
    """Where a stream that asks for "from now on" starts."""
    xmin = session.execute(
        text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
    ).scalar_one()
    return Cursor(int(xmin), 0)


@dataclass(frozen=True)
class FeedEvent:
    cursor: Cursor
    event_id: int
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
    SELECT e.id, e.tx::text AS tx, e.name, e.data, e.occurred_at, e.contact_id, c.email
    FROM events e
    JOIN contacts c ON c.project_id = e.project_id AND c.id = e.contact_id
    WHERE e.project_id = :project_id
      AND e.name LIKE 'segment.%' AND (e.name LIKE '%.entry' OR e.name LIKE '%.exit')
      AND (e.tx, e.id) > (CAST(:tx AS xid8), :event_id)
      AND e.tx < pg_snapshot_xmin(pg_current_snapshot())
      AND (CAST(:segment_ids AS text[]) IS NULL OR e.data ->> 'segmentId' = ANY(:segment_ids))
    ORDER BY e.tx, e.id
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
            "tx": str(after.tx),
            "event_id": after.event_id,
            "segment_ids": list(segment_ids) if segment_ids else None,
            "limit": limit,
        },
    )
    return [
        FeedEvent(
            cursor=Cursor(int(r.tx), r.id),
            event_id=r.id,
            name=r.name,
            segment_id=str(r.data.get("segmentId", "")),
            segment_name=str(r.data.get("segmentName", "")),
            contact_id=r.contact_id,
            email=r.email,
            occurred_at=r.occurred_at,
        )
        for r in rows
    ]
