"""Contacts: email normalisation, upsert by email with key-by-key data merge, reads, deletes."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, bindparam, delete, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session
from sqlalchemy.types import Text

from segments_service import membership, tables
from segments_service.errors import FieldViolation, NotFound, Unavailable, ValidationError

MAX_BATCH = 1000
MAX_EMAIL_LENGTH = 254
# Deliberately simple: one @, a dot in the domain, no spaces or control characters.
_EMAIL_RE = re.compile(r"^[^\s@\x00-\x1f\x7f]+@[^\s@\x00-\x1f\x7f]+\.[^\s@\x00-\x1f\x7f]+$")


def normalize_email(raw: str) -> str | None:
    """The stored form of an email (trimmed, lower-cased), or None when it is not one."""
    email = raw.strip().lower()
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL_RE.match(email):
        return None
    return email


def require_email(raw: str, field: str) -> str:
    email = normalize_email(raw)
    if email is None:
        message = "is required" if not raw.strip() else f"is not a valid email address: {raw!r}"
        raise ValidationError.single(field, message, "invalid_email")
    return email


NUL_MESSAGE = "must not contain NUL (\\u0000) characters"


# JSON data (contact data, event data) nests at most this deep: `{"a": {"b": 1}}` is 2.
MAX_JSON_DEPTH = 64


def check_json(value: Any, field: str) -> list[FieldViolation]:
    """What PostgreSQL's jsonb cannot store (non-finite numbers, NUL characters in strings
    or keys) and nesting deeper than MAX_JSON_DEPTH; report where it is, in document
    order. An explicit stack, not recursion: no depth of input exhausts Python's."""
    violations: list[FieldViolation] = []
    # (value, its path, how many objects and arrays enclose it)
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            violations.append(FieldViolation(path, "must be a finite number", "invalid_number"))
        elif isinstance(item, str) and "\x00" in item:
            violations.append(FieldViolation(path, NUL_MESSAGE, "invalid_character"))
        elif isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                violations.append(
                    FieldViolation(
                        path, f"must not nest more than {MAX_JSON_DEPTH} levels deep", "too_deep"
                    )
                )
                continue
            if isinstance(item, dict):
                violations.extend(
                    FieldViolation(f"{path}.{k}", f"key {NUL_MESSAGE}", "invalid_character")
                    for k in item
                    if "\x00" in k
                )
                children = [(v, f"{path}.{k}", depth + 1) for k, v in item.items()]
            else:
                children = [(v, f"{path}.{i}", depth + 1) for i, v in enumerate(item)]
            stack.extend(reversed(children))
    return violations


@dataclass
class ContactWrite:
    """One upsert: `subscribed` None keeps the stored value; a None in `patch` removes the key."""

    email: str
    subscribed: bool | None = None
    patch: dict[str, Any] | None = None

    def merge(self, later: ContactWrite) -> None:
        """Apply a later write to the same email, as if both were sent one after the other."""
        if later.subscribed is not None:
            self.subscribed = later.subscribed
        if later.patch:
            self.patch = {**(self.patch or {}), **later.patch}


def _coalesce_writes(writes: Iterable[ContactWrite]) -> list[ContactWrite]:
    by_email: dict[str, ContactWrite] = {}
    for w in writes:
        if w.email in by_email:
            by_email[w.email].merge(w)
        else:
            by_email[w.email] = ContactWrite(w.email, w.subscribed, dict(w.patch or {}))
    # Sorted, so concurrent batches lock rows in the same order.
    return [by_email[e] for e in sorted(by_email)]


_INSERT_NEW = text(
    """
    INSERT INTO contacts (project_id, email, subscribed, data)
    SELECT :project_id, r.email, coalesce(r.subscribed, true), segments_merge_data('{}', r.patch)
    FROM jsonb_to_recordset(:rows) AS r(email text, subscribed boolean, patch jsonb)
    ORDER BY r.email
    ON CONFLICT (project_id, email) DO NOTHING
    RETURNING id, email
    """
).bindparams(bindparam("rows", type_=JSONB))

_UPDATE_EXISTING = text(
    """
    UPDATE contacts AS c
    SET subscribed = coalesce(r.subscribed, c.subscribed),
        data = segments_merge_data(c.data, r.patch),
        updated_at = now()
    FROM jsonb_to_recordset(:rows) AS r(email text, subscribed boolean, patch jsonb)
    WHERE c.project_id = :project_id AND c.email = r.email AND NOT (c.email = ANY(:created))
    RETURNING c.id, c.email
    """
).bindparams(bindparam("rows", type_=JSONB), bindparam("created", type_=ARRAY(Text)))


@dataclass(frozen=True)
class UpsertResult:
    created: dict[str, uuid.UUID]
    updated: dict[str, uuid.UUID]

    @property
    def ids(self) -> list[uuid.UUID]:
        return [*self.created.values(), *self.updated.values()]


def upsert_contacts(
    session: Session, project_id: uuid.UUID, writes: Sequence[ContactWrite]
) -> UpsertResult:
    """Insert new emails, merge into existing ones; one statement each, safe under concurrency.

    A row a concurrent transaction inserts first makes our INSERT wait and skip it; the
    UPDATE that follows then sees it committed and merges into it.
    """
    merged = _coalesce_writes(writes)
    if not merged:
        return UpsertResult({}, {})
    rows = [{"email": w.email, "subscribed": w.subscribed, "patch": w.patch or {}} for w in merged]
    created = {
        r.email: r.id
        for r in session.execute(_INSERT_NEW, {"project_id": project_id, "rows": rows})
    }
    updated: dict[str, uuid.UUID] = {}
    if len(created) < len(rows):
        updated = {
            r.email: r.id
            for r in session.execute(
                _UPDATE_EXISTING,
                {"project_id": project_id, "rows": rows, "created": list(created)},
            )
        }
    return UpsertResult(created, updated)


def upsert(session: Session, project_id: uuid.UUID, writes: Sequence[ContactWrite]) -> UpsertResult:
    """Upsert contacts, then bring their segment memberships up to date."""
    result = upsert_contacts(session, project_id, writes)
    membership.refresh_contacts(session, project_id, result.ids)
    return result


# Rounds of look up / insert when concurrent writers keep creating and deleting the same
# emails underneath; each round settles at least one of them in practice.
ENSURE_ATTEMPTS = 3


def ensure_contacts(
    session: Session,
    project_id: uuid.UUID,
    emails: Sequence[str],
    *,
    create: bool,
    subscribed: bool | None = None,
    lock: bool = False,
) -> tuple[dict[str, uuid.UUID], set[str]]:
    """Ids of these (normalised) emails, creating the missing ones when `create`.

    Answers (email -> id, emails created). Existing contacts are left untouched. With
    `lock`, every contact answered is held until commit so that none can be deleted
    meanwhile: existing ones with a KEY SHARE lock taken by the statement that finds them
    (it conflicts only with deleting, not with other writers), created ones being this
    transaction's own.
    """
    c = tables.contacts.c
    found: dict[str, uuid.UUID] = {}
    created: set[str] = set()
    pending = sorted(set(emails))
    if lock and pending:
        membership.lock_shared(session, project_id)
    for _attempt in range(ENSURE_ATTEMPTS):
        query = select(c.email, c.id).where(
            c.project_id == project_id, c.email == tables.any_text(pending)
        )
        if lock:
            # A contact deleted meanwhile is skipped here, and created again below.
            query = query.with_for_update(read=True, key_share=True)
        # One row of two arrays: a result row per contact costs more Python than the
        # lookup costs PostgreSQL.
        hits = query.subquery()
        emails_found, ids_found = session.execute(
            select(func.array_agg(hits.c.email), func.array_agg(hits.c.id))
        ).one()
        found.update(zip(emails_found or (), ids_found or (), strict=True))
        missing = [e for e in pending if e not in found]
        if not create or not missing:
            return found, created
        rows: list[dict[str, Any]] = [
            {"email": e, "subscribed": subscribed, "patch": {}} for e in missing
        ]
        for r in session.execute(_INSERT_NEW, {"project_id": project_id, "rows": rows}):
            found[r.email] = r.id
            created.add(r.email)
        # Lost a race for some: they exist now, committed by someone else.
        pending = [e for e in missing if e not in found]
        if not pending:
            return found, created
    raise Unavailable("contacts were created and deleted concurrently with this request; retry")


def get_contact(session: Session, project_id: uuid.UUID, contact_id: uuid.UUID) -> Row[Any]:
    c = tables.contacts
    row = session.execute(
        select(c).where(c.c.project_id == project_id, c.c.id == contact_id)
    ).first()
    if row is None:
        raise NotFound(f"contact {contact_id} not found")
    return row


def delete_contact(session: Session, project_id: uuid.UUID, contact_id: uuid.UUID) -> None:
    """Delete a contact with its events and memberships.

    The row is locked first: writers recording events for it hold a weaker lock that this
    waits for, so events committed before are deleted here and none can follow."""
    membership.lock_shared(session, project_id)
    c = tables.contacts.c
    exists_now = session.execute(
        select(c.id).where(c.project_id == project_id, c.id == contact_id).with_for_update()
    ).first()
    if exists_now is None:
        raise NotFound(f"contact {contact_id} not found")
    e = tables.events.c
    session.execute(
        delete(tables.events).where(e.project_id == project_id, e.contact_id == contact_id)
    )
    membership.forget_contact(session, project_id, contact_id)
    session.execute(delete(tables.contacts).where(c.project_id == project_id, c.id == contact_id))
