"""Event history: `/v1/track` for single events, IngestEvents for batches and imports."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from segments_service import event_ids, jsonutil, membership
from segments_service.contacts import (
    NUL_MESSAGE,
    ContactWrite,
    ensure_contacts,
    upsert_contacts,
)

MAX_EVENT_NAME = 200
MAX_BATCH = 1000
# Names the system itself records; refused on the public track endpoint. The slug may be
# empty (a segment named "!!!" records `segment..entry`), so `.*`, not `.+`.
_SEGMENT_SYSTEM_EVENT = re.compile(r"^segment\..*\.(entry|exit)$", re.DOTALL)
_CONTACT_SYSTEM_EVENTS = {"contact.subscribed", "contact.unsubscribed"}


def event_name_problem(name: str, *, allow_email: bool) -> tuple[str, str] | None:
    """Why `name` cannot be recorded through this path: (message, code), or None."""
    if not name.strip():
        return "must not be empty", "required"
    if len(name) > MAX_EVENT_NAME:
        return f"must be at most {MAX_EVENT_NAME} characters", "too_long"
    if "\x00" in name:
        return NUL_MESSAGE, "invalid_character"
    if _SEGMENT_SYSTEM_EVENT.match(name) or name in _CONTACT_SYSTEM_EVENTS:
        return f"{name!r} is a reserved system event name", "reserved_event"
    if not allow_email and name.startswith("email."):
        return f"{name!r} is reserved: email.* events are recorded by the platform", (
            "reserved_event"
        )
    return None


def split_track_data(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(contact patch, event payload): `{"value": x, "persistent": false}` stays on the event."""
    patch: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value.get("persistent") is False and "value" in value:
            payload[key] = value["value"]
        else:
            patch[key] = value
            payload[key] = value
    return patch, payload


# The rows travel as one JSON array of [contact_id, name, data, occurred_at] arrays: one
# call of the C JSON encoder, where array parameters cost a Python call per element
# (a tenth of a batch's Python time). `data` is null for events without data, which most
# are.
_INSERT_EVENTS = """
    INSERT INTO events (project_id, contact_id, name, data, occurred_at)
    SELECT :project_id, (r ->> 0)::uuid, r ->> 1, coalesce(nullif(r -> 2, 'null'), '{}'),
           coalesce((r ->> 3)::timestamptz, now())
    FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS r
    """
_INSERT_EVENTS_RETURNING = text(_INSERT_EVENTS + "RETURNING id, occurred_at")
# A batch answers only how many it stored: no rows to send back and parse.
_INSERT_EVENTS_COUNTED = text(_INSERT_EVENTS)


@dataclass(frozen=True)
class NewEvent:
    contact_id: uuid.UUID
    name: str
    data: dict[str, Any]
    occurred_at: datetime | None = None


def _event_params(project_id: uuid.UUID, new: Sequence[NewEvent]) -> dict[str, Any]:
    rows = [
        [
            str(e.contact_id),
            e.name,
            jsonutil.normalize(e.data) if e.data else None,
            e.occurred_at.isoformat() if e.occurred_at else None,
        ]
        for e in new
    ]
    return {"project_id": project_id, "rows": jsonutil.encode(rows)}


def insert_events(session: Session, project_id: uuid.UUID, new: Sequence[NewEvent]) -> list[Any]:
    """Store events; answers (id, occurred_at) of each."""
    return list(session.execute(_INSERT_EVENTS_RETURNING, _event_params(project_id, new)))


def insert_events_counted(session: Session, project_id: uuid.UUID, new: Sequence[NewEvent]) -> int:
    """Store events; answers how many."""
    result: Any = session.execute(_INSERT_EVENTS_COUNTED, _event_params(project_id, new))
    return int(result.rowcount)


@dataclass(frozen=True)
class Tracked:
    contact_id: uuid.UUID
    # The event's public id (event_ids.public_event_id), never the row's own.
    event_id: str
    occurred_at: datetime


def track(
    session: Session,
    project_id: uuid.UUID,
    *,
    email: str,
    event: str,
    subscribed: bool | None,
    data: dict[str, Any],
) -> Tracked:
    """Upsert the contact with the persistent part of `data`, then record the event."""
    patch, payload = split_track_data(data)
    result = upsert_contacts(session, project_id, [ContactWrite(email, subscribed, patch)])
    contact_id = result.ids[0]
    # The upsert wrote the row, so this transaction holds it: it cannot be deleted now.
    row = insert_events(session, project_id, [NewEvent(contact_id, event, payload)])[0]
    membership.refresh_contacts(session, project_id, [contact_id])
    public_id = event_ids.public_event_id(event_ids.key_for(session, project_id), row.id)
    return Tracked(contact_id, public_id, row.occurred_at)


@dataclass(frozen=True)
class IngestItem:
    email: str
    event: str
    occurred_at: datetime | None
    data: dict[str, Any]


def ingest(session: Session, project_id: uuid.UUID, items: Sequence[IngestItem]) -> int:
    """Record events for existing or new contacts, all in the caller's transaction;
    answers how many were stored."""
    # Locked (KEY SHARE) before the events go in: nobody can delete these contacts until
    # commit, while other writers of events for them go on in parallel.
    ids, created = ensure_contacts(
        session, project_id, [i.email for i in items], create=True, lock=True
    )
    recorded = insert_events_counted(
        session,
        project_id,
        [NewEvent(ids[i.email], i.event, i.data, i.occurred_at) for i in items],
    )
    got: dict[str, set[uuid.UUID]] = {}
    fresh: dict[str, set[uuid.UUID]] = {}
    for i in items:
        got.setdefault(i.event, set()).add(ids[i.email])
        if i.occurred_at is None:
            # Stored at the transaction's start (now()): membership.Dynamic.certain.
            fresh.setdefault(i.event, set()).add(ids[i.email])
    # New contacts can enter any segment; existing ones only gained events.
    membership.refresh_contacts(
        session,
        project_id,
        [contact_id for email, contact_id in ids.items() if email not in created],
        event_contacts=got,
        fresh_contacts=fresh,
        new_contacts=[ids[e] for e in created],
    )
    return recorded
