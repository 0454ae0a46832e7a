"""Webhooks as the API sees them: create (with the URL and segment checks), list, get,
delete, and a webhook's recent deliveries."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from segments_service import tables
from segments_service.errors import FailedPrecondition, FieldViolation, NotFound, ValidationError
from segments_service.members import bounded_limit
from segments_service.webhooks.sender import address_problem, literal_address

MAX_URL = 2048
MAX_SEGMENT_IDS = 100
# Each webhook adds an outbox row per event of the project: a bound on what one project
# can make the workers do.
MAX_WEBHOOKS = 25
DEFAULT_DELIVERIES = 20
MAX_DELIVERIES = 100
SECRET_PREFIX = "whsec_"
# Host names: letters, digits, hyphens and dots (IDN hosts in their xn-- form).
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.?$"
)
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class WebhookView:
    id: uuid.UUID
    url: str
    # Empty: every tracked segment of the project.
    segment_ids: list[uuid.UUID]
    created_at: datetime
    # Only when just created.
    secret: str | None = None


@dataclass(frozen=True)
class DeliveryView:
    feed_seq: int
    event_id: str
    type: str
    status: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None


def check_url(raw: str, allow_private: bool) -> str:
    """The URL to store, or a ValidationError naming `url`. Literal addresses are checked
    here as deliveries check them; host names are resolved and checked at each attempt."""

    def bad(message: str, code: str = "invalid") -> ValidationError:
        return ValidationError.single("url", message, code)

    url = raw.strip()
    if not url:
        raise bad("is required", "required")
    if len(url) > MAX_URL:
        raise bad(f"is longer than {MAX_URL} characters", "too_long")
    if _UNSAFE.search(url):
        raise bad("contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(f"is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise bad("must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise bad("must not carry credentials: deliveries are authenticated by their signature")
    if parts.fragment:
        raise bad("must not have a fragment")
    host = (parts.hostname or "").lower()
    if not host:
        raise bad("has no host")
    if port == 0:
        raise bad("has an invalid port")
    address = literal_address(host)
    if address is not None:
        problem = address_problem(address, allow_private)
        if problem is not None:
            raise bad(f"is refused: {problem}", "forbidden_address")
    elif not _HOST_NAME.match(host):
        raise bad("has an invalid host name")
    return url


def _segment_ids(session: Session, project_id: uuid.UUID, raw: Sequence[str]) -> list[uuid.UUID]:
    """The tracked segments named, in the order given, without repeats."""
    if len(raw) > MAX_SEGMENT_IDS:
        raise ValidationError.single(
            "segmentIds", f"at most {MAX_SEGMENT_IDS} segments, got {len(raw)}", "too_many"
        )
    violations: list[FieldViolation] = []
    ids: dict[uuid.UUID, int] = {}
    for i, text in enumerate(raw):
        try:
            ids.setdefault(uuid.UUID(text.strip()), i)
        except ValueError:
            violations.append(FieldViolation(f"segmentIds.{i}", "is not a segment id"))
    if ids:
        s = tables.segments.c
        rows = session.execute(
            select(s.id, s.track_membership).where(
                s.project_id == project_id, s.id == tables.any_uuid(ids)
            )
        )
        tracked = {r.id: r.track_membership for r in rows}
        for segment_id, i in ids.items():
            if segment_id not in tracked:
                violations.append(
                    FieldViolation(
                        f"segmentIds.{i}", "no segment with this id in the project", "not_found"
                    )
                )
            elif not tracked[segment_id]:
                violations.append(
                    FieldViolation(
                        f"segmentIds.{i}",
                        "is not tracked: only tracked segments record entries and exits",
                        "not_tracked",
                    )
                )
    if violations:
        raise ValidationError(sorted(violations, key=lambda v: int(v.field.split(".")[1])))
    return list(ids)


def _view(row: Any, secret: str | None = None) -> WebhookView:
    return WebhookView(row.id, row.url, list(row.segment_ids or []), row.created_at, secret)


_COLUMNS = (
    tables.webhooks.c.id,
    tables.webhooks.c.url,
    tables.webhooks.c.segment_ids,
    tables.webhooks.c.created_at,
)


def create_webhook(
    session: Session,
    project_id: uuid.UUID,
    url: str,
    segment_ids: Sequence[str],
    *,
    allow_private: bool,
) -> WebhookView:
    """A new webhook, delivering the events recorded after it (its secret in the view)."""
    checked_url = check_url(url, allow_private)
    ids = _segment_ids(session, project_id, segment_ids)
    w = tables.webhooks.c
    existing = session.execute(
        select(func.count()).where(w.project_id == project_id, w.deleted_at.is_(None))
    ).scalar_one()
    if existing >= MAX_WEBHOOKS:
        raise FailedPrecondition(
            f"the project has {existing} webhooks, the most it may have; delete one first"
        )
    f = tables.feed_positions.c
    # Events whose positions are not yet committed come after this one: positions become
    # visible in order (migration 0003), so the webhook gets every event after its creation.
    start = select(func.coalesce(f.last_seq, 0)).where(f.project_id == project_id)
    fanned = session.execute(start).scalar_one_or_none() or 0
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    row = session.execute(
        insert(tables.webhooks)
        .values(
            project_id=project_id,
            url=checked_url,
            segment_ids=ids or None,
            secret=secret,
            created_at=func.now(),
            fanned_seq=fanned,
            pending=0,
        )
        .returning(*_COLUMNS)
    ).one()
    return _view(row, secret)


def list_webhooks(session: Session, project_id: uuid.UUID) -> list[WebhookView]:
    """The project's webhooks, newest first."""
    w = tables.webhooks.c
    rows = session.execute(
        select(*_COLUMNS)
        .where(w.project_id == project_id, w.deleted_at.is_(None))
        .order_by(w.created_at.desc(), w.id)
    )
    return [_view(r) for r in rows]


def get_webhook(session: Session, project_id: uuid.UUID, webhook_id: uuid.UUID) -> WebhookView:
    w = tables.webhooks.c
    row = session.execute(
        select(*_COLUMNS).where(
            w.project_id == project_id, w.id == webhook_id, w.deleted_at.is_(None)
        )
    ).first()
    if row is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return _view(row)


def delete_webhook(session: Session, project_id: uuid.UUID, webhook_id: uuid.UUID) -> None:
    """Hides the webhook at once; a worker delivering it stops at its next record (at most
    RECORD_BATCH deliveries or RECORD_SECONDS later, worker.py), and removes its deliveries
    afterwards, in slices."""
    w = tables.webhooks.c
    deleted = session.execute(
        update(tables.webhooks)
        .where(w.project_id == project_id, w.id == webhook_id, w.deleted_at.is_(None))
        .values(deleted_at=func.now(), due_at=func.now())
        .returning(w.id)
    ).first()
    if deleted is None:
        raise NotFound(f"webhook {webhook_id} not found")


def deliveries_limit(limit: int) -> int:
    return bounded_limit(limit, DEFAULT_DELIVERIES, MAX_DELIVERIES)


def list_deliveries(
    session: Session, project_id: uuid.UUID, webhook_id: uuid.UUID, limit: int
) -> list[DeliveryView]:
    """The webhook's `limit` most recent deliveries, newest event first."""
    get_webhook(session, project_id, webhook_id)
    d = tables.webhook_deliveries.c
    rows = session.execute(
        select(
            d.feed_seq,
            d.event_id,
            d.type,
            d.status,
            d.attempts,
            d.last_error,
            d.next_attempt_at,
        )
        .where(d.project_id == project_id, d.webhook_id == webhook_id)
        .order_by(d.feed_seq.desc())
        .limit(deliveries_limit(limit))
    )
    return [
        DeliveryView(
            r.feed_seq, r.event_id, r.type, r.status, r.attempts, r.last_error, r.next_attempt_at
        )
        for r in rows
    ]
