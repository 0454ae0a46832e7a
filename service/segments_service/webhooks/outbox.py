"""The deliveries outbox: filled from the membership feed, drained in feed order.

Only the worker holding a webhook's lock (worker.py) calls the functions that change its
deliveries, each in a short transaction of its own, never across an HTTP attempt.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from segments_service import event_ids, tables

PENDING = "PENDING"
DELIVERED = "DELIVERED"
FAILED = "FAILED"
# Feed positions one fan-out step reads past, at most.
SCAN = 5000
# Deliveries one fan-out step writes, at most.
FAN_OUT_BATCH = 1000


@dataclass(frozen=True)
class WebhookKey:
    project_id: uuid.UUID
    id: uuid.UUID


@dataclass(frozen=True)
class Due:
    key: WebhookKey
    deleted: bool


_DUE = text(
    """
    SELECT w.project_id, w.id, w.deleted_at IS NOT NULL AS deleted
    FROM webhooks w
    LEFT JOIN feed_positions f ON f.project_id = w.project_id
    WHERE (w.deleted_at IS NOT NULL
           OR w.due_at <= now()
           OR (f.last_seq > w.fanned_seq AND w.pending < :read_ahead))
      AND (CAST(:projects AS uuid[]) IS NULL OR w.project_id = ANY(:projects))
    ORDER BY coalesce(w.due_at, now()), w.project_id, w.id
    LIMIT :limit
    """
).bindparams(bindparam("projects", type_=tables.UUID_ARRAY))


_BACKLOG = text(
    """
    SELECT coalesce(sum(w.pending + greatest(coalesce(f.last_seq, 0) - w.fanned_seq, 0)), 0)
    FROM webhooks w
    LEFT JOIN feed_positions f ON f.project_id = w.project_id
    WHERE w.deleted_at IS NULL
      AND (CAST(:projects AS uuid[]) IS NULL OR w.project_id = ANY(:projects))
    """
).bindparams(bindparam("projects", type_=tables.UUID_ARRAY))


def backlog(session: Session, projects: Sequence[uuid.UUID] | None = None) -> int:
    """Deliveries of live webhooks waiting (PENDING: not yet attempted, or to be retried),
    plus the feed positions they have not fanned out yet (some may be of segments a
    webhook does not follow: the fan-out passes over those at once)."""
    found = session.execute(
        _BACKLOG, {"projects": list(projects) if projects is not None else None}
    ).scalar_one()
    return int(found)


def due_webhooks(
    session: Session,
    read_ahead: int,
    limit: int,
    projects: list[uuid.UUID] | None = None,
) -> list[Due]:
    """Webhooks with something to do now: events to copy from the feed, a delivery due,
    or deliveries of a deleted webhook to remove; those waiting longest first."""
    rows = session.execute(_DUE, {"read_ahead": read_ahead, "limit": limit, "projects": projects})
    return [Due(WebhookKey(r.project_id, r.id), r.deleted) for r in rows]


_STATE = text(
    """
    SELECT w.segment_ids, w.fanned_seq, w.pending, coalesce(f.last_seq, 0) AS last_seq
    FROM webhooks w
    LEFT JOIN feed_positions f ON f.project_id = w.project_id
    WHERE w.project_id = :project_id AND w.id = :id AND w.deleted_at IS NULL
    """
)

_FEED = text(
    """
    SELECT e.id, e.feed_seq, e.name, e.data, e.occurred_at, e.contact_id, c.email
    FROM events e
    JOIN contacts c ON c.project_id = e.project_id AND c.id = e.contact_id
    WHERE e.project_id = :project_id AND e.feed_seq > :after AND e.feed_seq <= :upto
      AND (CAST(:segment_ids AS text[]) IS NULL OR e.data ->> 'segmentId' = ANY(:segment_ids))
    ORDER BY e.feed_seq
    LIMIT :limit
    """
).bindparams(bindparam("segment_ids", type_=ARRAY(Text())))

_INSERT = text(
    """
    INSERT INTO webhook_deliveries
        (project_id, webhook_id, feed_seq, event_id, type, body, occurred_at, status, attempts)
    SELECT :project_id, :webhook_id, d.feed_seq, d.event_id, d.type, d.body, d.occurred_at,
           'PENDING', 0
    FROM unnest(CAST(:seqs AS bigint[]), CAST(:ids AS text[]), CAST(:types AS text[]),
                CAST(:bodies AS text[]), CAST(:times AS timestamptz[]))
         AS d (feed_seq, event_id, type, body, occurred_at)
    ON CONFLICT DO NOTHING
    """
)

_ADVANCE = text(
    """
    UPDATE webhooks
    SET fanned_seq = :fanned, pending = pending + :added,
        due_at = CASE WHEN :added > 0 THEN coalesce(due_at, now()) ELSE due_at END
    WHERE project_id = :project_id AND id = :id
    """
)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def payload(event_id: str, row: Any) -> tuple[str, str]:
    """(type, JSON body) of a feed event: the body POSTed on every attempt."""
    kind = "segment.entry" if row.name.endswith(".entry") else "segment.exit"
    body = {
        "id": event_id,
        "type": kind,
        "segmentId": str(row.data.get("segmentId", "")),
        "segmentName": str(row.data.get("segmentName", "")),
        "contactId": str(row.contact_id),
        "email": row.email,
        "occurredAt": _rfc3339(row.occurred_at),
    }
    return kind, json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def fan_out(session: Session, key: WebhookKey, read_ahead: int) -> int | None:
    """Copies the webhook's next events from the feed into its deliveries, keeping at most
    `read_ahead` PENDING (beyond that the feed itself holds the backlog); bounded by SCAN
    positions and FAN_OUT_BATCH rows. Answers the rows added, or None if the webhook is
    gone. Only positions up to the committed end of the feed are read, all of which are
    visible (migration 0003), so none is passed over."""
    state = session.execute(_STATE, {"project_id": key.project_id, "id": key.id}).first()
    if state is None:
        return None
    room = min(read_ahead - state.pending, FAN_OUT_BATCH)
    if room <= 0 or state.last_seq <= state.fanned_seq:
        return 0
    upto = min(state.last_seq, state.fanned_seq + SCAN)
    rows = list(
        session.execute(
            _FEED,
            {
                "project_id": key.project_id,
                "after": state.fanned_seq,
                "upto": upto,
                "segment_ids": [str(s) for s in state.segment_ids] if state.segment_ids else None,
                "limit": room,
            },
        )
    )
    # A full batch may stop short of `upto`: resume after its last row.
    fanned = rows[-1].feed_seq if len(rows) == room else upto
    if rows:
        secret_key = event_ids.key_for(session, key.project_id)
        seqs, ids, types, bodies, times = [], [], [], [], []
        for row in rows:
            public_id = event_ids.public_event_id(secret_key, row.id)
            kind, body = payload(public_id, row)
            seqs.append(row.feed_seq)
            ids.append(public_id)
            types.append(kind)
            bodies.append(body)
            times.append(row.occurred_at)
        session.execute(
            _INSERT,
            {
                "project_id": key.project_id,
                "webhook_id": key.id,
                "seqs": seqs,
                "ids": ids,
                "types": types,
                "bodies": bodies,
                "times": times,
            },
        )
    session.execute(
        _ADVANCE,
        {"fanned": fanned, "added": len(rows), "project_id": key.project_id, "id": key.id},
    )
    return len(rows)


@dataclass(frozen=True)
class Attempt:
    """A delivery to attempt now."""

    feed_seq: int
    body: str
    url: str
    secret: str
    attempts: int  # made before this one


_HEAD = text(
    """
    SELECT w.url, w.secret, d.feed_seq, d.body, d.attempts, d.next_attempt_at,
           d.next_attempt_at IS NULL OR d.next_attempt_at <= now() AS due
    FROM webhooks w
    JOIN webhook_deliveries d
      ON d.project_id = w.project_id AND d.webhook_id = w.id AND d.status = 'PENDING'
    WHERE w.project_id = :project_id AND w.id = :id AND w.deleted_at IS NULL
    ORDER BY d.feed_seq
    LIMIT :limit
    """
)

_SET_DUE = text(
    """
    UPDATE webhooks SET due_at = :due_at
    WHERE project_id = :project_id AND id = :id AND deleted_at IS NULL
    """
)


def next_attempts(session: Session, key: WebhookKey, limit: int) -> list[Attempt]:
    """The webhook's oldest PENDING deliveries, in feed order, if the first is due (the
    rest follow it as soon as it is delivered); the webhook's due_at is set to when its
    next attempt is due (NULL with nothing pending)."""
    params = {"project_id": key.project_id, "id": key.id}
    rows = list(session.execute(_HEAD, {**params, "limit": limit}))
    if not rows or not rows[0].due:
        due_at = rows[0].next_attempt_at if rows else None
        session.execute(_SET_DUE, {**params, "due_at": due_at})
        return []
    return [Attempt(r.feed_seq, r.body, r.url, r.secret, r.attempts) for r in rows]


_DELIVERED = text(
    """
    WITH done AS (
        UPDATE webhook_deliveries
        SET status = 'DELIVERED', attempts = attempts + 1, next_attempt_at = NULL,
            finished_at = now()
        WHERE project_id = :project_id AND webhook_id = :id
          AND feed_seq = ANY(CAST(:seqs AS bigint[])) AND status = 'PENDING'
        RETURNING 1
    )
    UPDATE webhooks SET pending = pending - (SELECT count(*) FROM done)
    WHERE project_id = :project_id AND id = :id
    RETURNING deleted_at IS NULL AS live
    """
)

_FAILED = text(
    """
    WITH done AS (
        UPDATE webhook_deliveries
        SET attempts = attempts + 1,
            last_error = :error,
            status = CASE WHEN now() - occurred_at >= make_interval(secs => :give_up)
                          THEN 'FAILED' ELSE 'PENDING' END,
            next_attempt_at = CASE WHEN now() - occurred_at >= make_interval(secs => :give_up)
                                   THEN NULL ELSE now() + make_interval(secs => :delay) END,
            finished_at = CASE WHEN now() - occurred_at >= make_interval(secs => :give_up)
                               THEN now() END
        WHERE project_id = :project_id AND webhook_id = :id AND feed_seq = :seq
          AND status = 'PENDING'
        RETURNING status, next_attempt_at
    )
    UPDATE webhooks
    SET pending = pending - (SELECT count(*) FROM done WHERE status = 'FAILED'),
        due_at = coalesce((SELECT next_attempt_at FROM done), now())
    WHERE project_id = :project_id AND id = :id
    RETURNING (SELECT status FROM done) AS status, deleted_at IS NULL AS live
    """
)


def record_delivered(session: Session, key: WebhookKey, feed_seqs: Sequence[int]) -> bool:
    """Marks deliveries DELIVERED; answers whether the webhook still exists."""
    row = session.execute(
        _DELIVERED, {"project_id": key.project_id, "id": key.id, "seqs": list(feed_seqs)}
    ).first()
    return bool(row is not None and row.live)


def record_failed(
    session: Session, key: WebhookKey, feed_seq: int, error: str, delay: float, give_up: float
) -> bool:
    """Records a failed attempt: the delivery is retried after `delay` seconds, or FAILED
    when its event is `give_up` seconds old. Answers whether the next delivery may be
    attempted now (this one was given up and the webhook still exists)."""
    row = session.execute(
        _FAILED,
        {
            "project_id": key.project_id,
            "id": key.id,
            "seq": feed_seq,
            "error": error,
            "delay": delay,
            "give_up": give_up,
        },
    ).first()
    return bool(row is not None and row.live and row.status == FAILED)


_PURGE = text(
    """
    DELETE FROM webhook_deliveries
    WHERE project_id = :project_id AND webhook_id = :id
      AND feed_seq IN (SELECT feed_seq FROM webhook_deliveries
                       WHERE project_id = :project_id AND webhook_id = :id
                       ORDER BY feed_seq LIMIT :slice)
    """
)

_DROP = text(
    """
    DELETE FROM webhooks
    WHERE project_id = :project_id AND id = :id AND deleted_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries
                      WHERE project_id = :project_id AND webhook_id = :id)
    """
)


def purge_deleted(session: Session, key: WebhookKey, slice_rows: int) -> bool:
    """Removes up to `slice_rows` deliveries of a deleted webhook, and the webhook once it
    has none left; answers whether it is gone."""
    params = {"project_id": key.project_id, "id": key.id}
    removed = session.execute(_PURGE, {**params, "slice": slice_rows}).rowcount  # type: ignore[attr-defined]
    if removed >= slice_rows:
        return False
    session.execute(_DROP, params)
    return True


# Across projects: the retention of every project's finished deliveries. A row is named by
# its project and its ctid: a ctid alone is a position in one table, and were the table
# distributed by project its shards would each have a row at that position. The plan is the
# one of ctid alone (a TID scan per row, the project a filter on it).
_PRUNE = text(
    """
    DELETE FROM webhook_deliveries
    WHERE (project_id, ctid) IN (
        SELECT project_id, ctid FROM webhook_deliveries
        WHERE status <> 'PENDING' AND finished_at < now() - make_interval(secs => :age)
        LIMIT :slice)
    """
)


def prune_finished(session: Session, age: float, slice_rows: int) -> int:
    """Removes up to `slice_rows` deliveries finished more than `age` seconds ago."""
    result = session.execute(_PRUNE, {"age": age, "slice": slice_rows})
    return int(result.rowcount)  # type: ignore[attr-defined]
