"""Contacts: email normalisation, upsert by email with key-by-key data merge, changes by
id, reads (one, or pages of a project's), deletes, and the segments a contact is in."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg.errors
from sqlalchemy import (
    DateTime,
    Row,
    Uuid,
    bindparam,
    delete,
    exists,
    func,
    literal,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.types import Text

from segments_service import event_ids, membership, tables
from segments_service.errors import (
    AlreadyExists,
    FieldViolation,
    NotFound,
    Unavailable,
    ValidationError,
)

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


def update_contact(
    session: Session,
    project_id: uuid.UUID,
    contact_id: uuid.UUID,
    *,
    email: str | None,
    subscribed: bool | None,
    patch: dict[str, Any] | None,
) -> Row[Any]:
    """Change a contact by id: a new (normalised) email, subscription, and `patch` merged
    into its data as an upsert merges it; then its memberships are brought up to date, as
    after any contact write. Nothing given changes nothing. AlreadyExists when `email` is
    another contact's of the project."""
    if email is None and subscribed is None and not patch:
        return get_contact(session, project_id, contact_id)
    c = tables.contacts.c
    changes: dict[str, Any] = {"updated_at": func.now()}
    if email is not None:
        changes["email"] = email
    if subscribed is not None:
        changes["subscribed"] = subscribed
    if patch:
        changes["data"] = func.segments_merge_data(c.data, literal(patch, JSONB))
    statement = (
        update(tables.contacts)
        .where(c.project_id == project_id, c.id == contact_id)
        .values(**changes)
        .returning(c.id)
    )
    if email is None:
        changed = session.execute(statement).first()
    else:
        # The unique (project_id, email) key decides, also against a contact inserted
        # concurrently; the savepoint keeps the transaction usable to report it.
        try:
            with session.begin_nested():
                changed = session.execute(statement).first()
        except IntegrityError as exc:
            if not isinstance(exc.orig, psycopg.errors.UniqueViolation):
                raise
            raise AlreadyExists(
                f"email {email} is already used by another contact of this project"
            ) from exc
    if changed is None:
        raise NotFound(f"contact {contact_id} not found")
    membership.refresh_contacts(session, project_id, [contact_id])
    return get_contact(session, project_id, contact_id)


# -- the listing of a project's contacts ------------------------------------------------------

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A cursor: version, the last contact's created_at (microseconds since the epoch) and id,
# then the first bytes of an HMAC under a key of the project's own.
_CURSOR_VERSION = 1
_CURSOR_POSITION = struct.Struct(">Bq16s")
_CURSOR_MAC_BYTES = 8
_CURSOR_MESSAGE = "is not a cursor returned by this listing"


@dataclass(frozen=True)
class ContactPage:
    rows: list[Row[Any]]
    # Where the next page starts, None after the last one.
    cursor: str | None
    # Contacts matching the filters; counted on the first page only (None on later ones).
    total: int | None


def _listing_violations(limit: int, search: str) -> list[FieldViolation]:
    violations = []
    if limit < 0:
        violations.append(FieldViolation("limit", "must not be negative", "too_small"))
    if len(search) > MAX_EMAIL_LENGTH:
        violations.append(
            FieldViolation("search", f"must be at most {MAX_EMAIL_LENGTH} characters", "too_long")
        )
    elif "\x00" in search:
        violations.append(FieldViolation("search", NUL_MESSAGE, "invalid_character"))
    return violations


def _cursor_key(session: Session, project_id: uuid.UUID) -> bytes:
    """The key of the project's cursors: one project's cursors are refused by another, and
    none can be made without the database's secret."""
    return hmac.new(
        event_ids.server_secret(session), b"contact-cursor:" + project_id.bytes, hashlib.sha256
    ).digest()


def _cursor_mac(key: bytes, position: bytes) -> bytes:
    return hmac.new(key, position, hashlib.sha256).digest()[:_CURSOR_MAC_BYTES]


def encode_cursor(key: bytes, created_at: datetime, contact_id: uuid.UUID) -> str:
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    position = _CURSOR_POSITION.pack(_CURSOR_VERSION, micros, contact_id.bytes)
    return base64.urlsafe_b64encode(position + _cursor_mac(key, position)).decode().rstrip("=")


def decode_cursor(key: bytes, raw: str) -> tuple[datetime, uuid.UUID] | None:
    """The (created_at, id) a cursor of this project stands for, or None for anything else
    (malformed, altered, or another project's)."""
    try:
        blob = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        return None
    position, mac = blob[: _CURSOR_POSITION.size], blob[_CURSOR_POSITION.size :]
    if len(position) != _CURSOR_POSITION.size or not hmac.compare_digest(
        mac, _cursor_mac(key, position)
    ):
        return None
    version, micros, id_bytes = _CURSOR_POSITION.unpack(position)
    if version != _CURSOR_VERSION:
        return None
    return _EPOCH + timedelta(microseconds=micros), uuid.UUID(bytes=id_bytes)


def list_contacts(
    session: Session,
    project_id: uuid.UUID,
    *,
    limit: int,
    cursor: str,
    search: str,
    subscribed: bool | None,
) -> ContactPage:
    """A page of the project's contacts, newest first (created_at DESC, id DESC), after
    `cursor` (keyset paging: no page costs more than the first), with an email substring
    and the subscribed flag as filters.

    The walk is an index-only scan of contacts_by_created, which carries email and
    subscribed (migration 0014): an entry that does not match costs no heap visit, and only
    the page's contacts are read from the table. The first page also counts the matches.

    `limit` 0 means DEFAULT_LIMIT, above MAX_LIMIT means MAX_LIMIT; `search` is compared in
    the stored form of emails (trimmed, lower-cased)."""
    search = search.strip().lower()
    cursor = cursor.strip()
    violations = _listing_violations(limit, search)
    key = _cursor_key(session, project_id)
    after = decode_cursor(key, cursor) if cursor else None
    if cursor and after is None:
        violations.append(FieldViolation("cursor", _CURSOR_MESSAGE, "invalid"))
    if violations:
        raise ValidationError(violations)
    limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
    c = tables.contacts
    wanted = [c.c.project_id == project_id]
    if search:
        wanted.append(func.strpos(c.c.email, search) > 0)
    if subscribed is not None:
        wanted.append(c.c.subscribed if subscribed else ~c.c.subscribed)
    keys = select(c.c.id, c.c.created_at).where(*wanted)
    if after is not None:
        created_at, contact_id = after
        keys = keys.where(
            tuple_(c.c.created_at, c.c.id)
            < tuple_(literal(created_at, DateTime(timezone=True)), literal(contact_id, Uuid))
        )
    page = keys.order_by(c.c.created_at.desc(), c.c.id.desc()).limit(limit + 1).subquery("page")
    contact = c.alias("contact")
    rows = list(
        session.execute(
            select(contact)
            .join(page, (contact.c.project_id == project_id) & (contact.c.id == page.c.id))
            .order_by(page.c.created_at.desc(), page.c.id.desc())
        ).all()
    )
    following = None
    if len(rows) > limit:
        rows = rows[:limit]
        following = encode_cursor(key, rows[-1].created_at, rows[-1].id)
    total = None
    if not cursor:
        total = int(
            session.execute(select(func.count()).select_from(c).where(*wanted)).scalar_one()
        )
    return ContactPage(rows, following, total)


# -- the segments a contact is in --------------------------------------------------------------


def contact_segments(
    session: Session, project_id: uuid.UUID, contact_id: uuid.UUID
) -> list[Row[Any, Any, Any]]:
    """(id, name, type) of the segments the contact is a member of now, newest first.

    STATIC lists and DYNAMIC segments whose membership is stored answer from their tables;
    a DYNAMIC segment being built (or whose first build failed) has no current membership
    stored, so the contact is evaluated against its condition, in the same statement."""
    get_contact(session, project_id, contact_id)
    live = membership.dynamic_segments(
        session, project_id, states=(membership.BUILDING, membership.NOT_STORED)
    )
    now = datetime.now(UTC)
    scope = tables.any_uuid([contact_id])
    sm, st = tables.segment_members.c, tables.static_members.c
    stored = select(sm.segment_id).where(sm.project_id == project_id, sm.contact_id == contact_id)
    if live:
        # Stored rows of a segment being rebuilt are its previous condition's.
        stored = stored.where(sm.segment_id.not_in([seg.id for seg in live]))
    parts: list[Any] = [
        stored,
        select(st.segment_id).where(st.project_id == project_id, st.contact_id == contact_id),
    ]
    parts.extend(
        select(literal(seg.id, Uuid).label("segment_id")).where(
            exists(seg.members(project_id, now, scope))
        )
        for seg in live
    )
    s = tables.segments.c
    return list(
        session.execute(
            select(s.id, s.name, s.type)
            .where(s.project_id == project_id, s.id.in_(union_all(*parts)))
            .order_by(s.created_at.desc(), s.id.desc())
        ).all()
    )
