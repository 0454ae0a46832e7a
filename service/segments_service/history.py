"""A tracked segment's membership over time, read from the project's ordered feed of
entry/exit events (the log WatchSegmentEvents streams, feed.py): the segment's feed page
by page (GET /segments/{id}/events), and its entries, exits and size per hour or day
(GET /segments/{id}/history).

Both read one segment's part of the feed through `events_segment_feed` (project, segment,
feed position; migration 0015), so a quiet segment of a busy project costs its own events
only. Sizes are anchored at the segment's member count now and walked back through the
changes after each bucket, which stays exact however the feed began (tracking turned on
later emits entries for the members it finds, turning it off emits no exits).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from segments_service import segments
from segments_service.errors import ValidationError
from segments_service.feed import Cursor
from segments_service.filters import parse_value_timestamp
from segments_service.members import bounded_limit

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Buckets one history answer may hold.
MAX_BUCKETS = 1000
INTERVALS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
# The span of a history asked for without `from`: two days of hours, thirty of days.
DEFAULT_SPAN = {"hour": timedelta(days=2), "day": timedelta(days=30)}


@dataclass(frozen=True)
class FeedEntry:
    cursor: Cursor
    type: str  # "entry" or "exit"
    contact_id: uuid.UUID
    email: str
    occurred_at: datetime


@dataclass(frozen=True)
class FeedPage:
    entries: list[FeedEntry]
    # Where the next page starts: the last entry's cursor, or `after` when there is none
    # yet (the caller polls with it).
    next_cursor: Cursor


def _tracked(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> Row[Any]:
    row = segments.get_row(session, project_id, segment_id)
    if not row.track_membership:
        raise ValidationError.single(
            "id",
            f"segment {segment_id} does not track membership: it has no feed "
            "(turn trackMembership on)",
            "not_tracked",
        )
    return row


_PAGE = text(
    """
    SELECT e.feed_seq, e.name, e.occurred_at, e.contact_id, c.email
    FROM events e
    JOIN contacts c ON c.project_id = e.project_id AND c.id = e.contact_id
    WHERE e.project_id = :project_id AND e.data ->> 'segmentId' = :segment_id
      AND e.feed_seq IS NOT NULL AND e.feed_seq > :after
    ORDER BY e.feed_seq
    LIMIT :limit
    """
)


def feed_page(
    session: Session,
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    after: str,
    limit: int,
) -> FeedPage:
    """The segment's entries and exits after the cursor `after` ("": the oldest
    retained), oldest first; resuming from any cursor neither repeats nor misses one."""
    start = Cursor.parse(after) if after.strip() else Cursor(0)
    size = bounded_limit(limit, DEFAULT_LIMIT, MAX_LIMIT)
    _tracked(session, project_id, segment_id)
    rows = session.execute(
        _PAGE,
        {
            "project_id": project_id,
            "segment_id": str(segment_id),
            "after": start.seq,
            "limit": size,
        },
    ).all()
    entries = [
        FeedEntry(
            Cursor(r.feed_seq),
            "entry" if r.name.endswith(".entry") else "exit",
            r.contact_id,
            r.email,
            r.occurred_at,
        )
        for r in rows
    ]
    return FeedPage(entries, entries[-1].cursor if entries else start)


@dataclass(frozen=True)
class Bucket:
    start: datetime
    entries: int
    exits: int
    size: int  # members at the bucket's end


# Buckets from `first` to `last` (their starts, UTC-aligned), each with the segment's
# entries and exits in it; the size at each bucket's end is the count now less the net
# change after it (the later buckets', and after the range).
_HISTORY = text(
    """
    WITH buckets AS (
        SELECT generate_series(CAST(:first AS timestamptz), CAST(:last AS timestamptz),
                               CAST(:step AS interval)) AS start
    ),
    changes AS (
        SELECT e.occurred_at, CASE WHEN e.name LIKE '%.entry' THEN 1 ELSE -1 END AS delta
        FROM events e
        WHERE e.project_id = :project_id AND e.data ->> 'segmentId' = :segment_id
          AND e.feed_seq IS NOT NULL AND e.occurred_at >= :first
    ),
    counted AS (
        SELECT b.start,
               count(*) FILTER (WHERE c.delta = 1) AS entries,
               count(*) FILTER (WHERE c.delta = -1) AS exits,
               coalesce(sum(c.delta), 0) AS net
        FROM buckets b
        LEFT JOIN changes c
          ON c.occurred_at >= b.start AND c.occurred_at < b.start + CAST(:step AS interval)
        GROUP BY b.start
    )
    SELECT start, entries, exits,
           :count - (SELECT coalesce(sum(delta), 0) FROM changes
                     WHERE occurred_at >= CAST(:last AS timestamptz) + CAST(:step AS interval))
                  - coalesce(sum(net) OVER (ORDER BY start DESC
                                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
             AS size
    FROM counted
    ORDER BY start
    """
)


def _instant(raw: str, field: str) -> datetime:
    found = parse_value_timestamp(raw.strip()) if raw.strip() else None
    if found is None:
        raise ValidationError.single(
            field, f"must be an RFC 3339 timestamp such as 2024-01-31T12:00:00Z, got {raw!r}"
        )
    return found


def _floor(moment: datetime, interval: str) -> datetime:
    utc = moment.astimezone(UTC)
    if interval == "hour":
        return utc.replace(minute=0, second=0, microsecond=0)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


def history(
    session: Session,
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    interval: str,
    from_raw: str,
    to_raw: str,
    now: datetime,
) -> list[Bucket]:
    """Entries, exits and size per UTC hour or day, for the buckets from the one holding
    `from` (default: two days or thirty days before `to`) to the one holding `to`
    (default: now)."""
    interval = interval or "day"
    if interval not in INTERVALS:
        raise ValidationError.single("interval", f"must be hour or day, got {interval!r}")
    to = _instant(to_raw, "to") if to_raw.strip() else now
    start = _instant(from_raw, "from") if from_raw.strip() else to - DEFAULT_SPAN[interval]
    if start > to:
        raise ValidationError.single("from", "must not be after `to`")
    first, last = _floor(start, interval), _floor(to, interval)
    if (last - first) / INTERVALS[interval] >= MAX_BUCKETS:
        raise ValidationError.single(
            "from", f"the range may hold at most {MAX_BUCKETS} buckets of an {interval}", "too_many"
        )
    row = _tracked(session, project_id, segment_id)
    rows = session.execute(
        _HISTORY,
        {
            "project_id": project_id,
            "segment_id": str(segment_id),
            "first": first,
            "last": last,
            "step": INTERVALS[interval],
            "count": int(row.member_count),
        },
    ).all()
    return [Bucket(r.start, int(r.entries), int(r.exits), int(r.size)) for r in rows]
