"""The members of a segment: pages of them, an export of all, and the edits of a
STATIC segment's list."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, func, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from segments_service import membership, tables
from segments_service.contacts import ensure_contacts, normalize_email
from segments_service.errors import FailedPrecondition, FieldViolation, ValidationError
from segments_service.filters import parse_condition
from segments_service.segments import STATIC, _live, count_members, get_row, is_stored, member_ids

MAX_MEMBER_EMAILS = 500
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class Page:
    rows: list[Row[Any]]
    total: int
    page: int
    page_size: int

    @property
    def total_pages(self) -> int:
        return math.ceil(self.total / self.page_size) if self.total else 0


def normalize_paging(page: int, page_size: int) -> tuple[int, int]:
    violations = []
    if page < 0:
        violations.append(FieldViolation("page", "must not be negative", "too_small"))
    if page_size < 0:
        violations.append(FieldViolation("pageSize", "must not be negative", "too_small"))
    if violations:
        raise ValidationError(violations)
    return page or 1, min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def bounded_limit(limit: int, default: int, maximum: int) -> int:
    """A listing's `limit`: unset (0) is `default`, above `maximum` is `maximum`, negative
    is a 400 naming `limit`."""
    if limit < 0:
        raise ValidationError.single("limit", "must not be negative", "too_small")
    return min(limit or default, maximum)


def list_members(
    session: Session, project_id: uuid.UUID, segment_id: uuid.UUID, page: int, page_size: int
) -> Page:
    row = get_row(session, project_id, segment_id)
    c = tables.contacts
    offset = (page - 1) * page_size
    if row.type == STATIC:
        m = tables.static_members
        query = (
            select(c)
            .join(m, (m.c.project_id == c.c.project_id) & (m.c.contact_id == c.c.id))
            .where(m.c.project_id == project_id, m.c.segment_id == segment_id)
            .order_by(m.c.added_at.desc(), m.c.contact_id.desc())
            .limit(page_size)
            .offset(offset)
        )
    elif not is_stored(row):
        # Being built: the page is cut from the condition's members, under the budget.
        live = member_ids(session, project_id, parse_condition(row.condition)).subquery("live")
        query = (
            select(c)
            .join(live, (c.c.project_id == project_id) & (c.c.id == live.c.contact_id))
            .order_by(c.c.created_at.desc(), c.c.id.desc())
            .limit(page_size)
            .offset(offset)
        )
        rows = list(_live(session, query).all())
        return Page(rows, count_members(session, row), page, page_size)
    else:
        # The page is cut from the segment_members_page index, which holds the contacts'
        # order (created_at DESC, id DESC); only the page's contacts are then read.
        sm = tables.segment_members.c
        members = (
            select(sm.contact_id)
            .where(sm.project_id == project_id, sm.segment_id == segment_id)
            .order_by(sm.contact_created_at.desc(), sm.contact_id.desc())
            .limit(page_size)
            .offset(offset)
            .subquery("page")
        )
        query = (
            select(c)
            .join(members, (c.c.project_id == project_id) & (c.c.id == members.c.contact_id))
            .order_by(c.c.created_at.desc(), c.c.id.desc())
        )
    rows = list(session.execute(query).all())
    total = count_members(session, row)
    return Page(rows, total, page, page_size)


def _static_row(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> Row[Any]:
    row = get_row(session, project_id, segment_id)
    if row.type != STATIC:
        raise FailedPrecondition(
            "members can only be added to or removed from STATIC segments; "
            "a DYNAMIC segment's members follow its condition"
        )
    return row


def _check_email_count(emails: Sequence[str]) -> None:
    """1 to MAX_MEMBER_EMAILS emails a call: an empty list is a mistake, not a no-op."""
    if not emails:
        raise ValidationError.single(
            "emails", f"must hold 1 to {MAX_MEMBER_EMAILS} emails, got none", "required"
        )
    if len(emails) > MAX_MEMBER_EMAILS:
        raise ValidationError.single(
            "emails", f"at most {MAX_MEMBER_EMAILS} emails per call, got {len(emails)}", "too_big"
        )


@dataclass(frozen=True)
class AddResult:
    added: int
    created: int
    not_found: list[str]


def add_members(
    session: Session,
    project_id: uuid.UUID,
    segment_id: uuid.UUID,
    emails: Sequence[str],
    *,
    create_missing: bool,
    subscribed: bool,
) -> AddResult:
    _check_email_count(emails)
    _static_row(session, project_id, segment_id)
    valid: dict[str, str] = {}
    not_found: list[str] = []
    for raw in emails:
        email = normalize_email(raw)
        if email is None:
            not_found.append(raw)
        else:
            valid.setdefault(email, raw)
    ids, created = ensure_contacts(
        session, project_id, list(valid), create=create_missing, subscribed=subscribed
    )
    not_found.extend(raw for email, raw in valid.items() if email not in ids)
    added = 0
    if ids:
        m = tables.static_members
        # In request order, so "time added, newest first" lists the last email first.
        ordered = [ids[e] for e in valid if e in ids]
        stmt = (
            pg_insert(m)
            .from_select(
                ["project_id", "segment_id", "contact_id", "added_at"],
                select(
                    literal(project_id),
                    literal(segment_id),
                    func.unnest(literal(ordered, type_=tables.UUID_ARRAY)),
                    func.clock_timestamp(),
                ),
            )
            .on_conflict_do_nothing()
            .returning(m.c.contact_id)
        )
        added_ids = [r.contact_id for r in session.execute(stmt)]
        added = len(added_ids)
        membership.adjust_count(session, project_id, segment_id, added)
        membership.refresh_contacts(
            session,
            project_id,
            added_ids,
            static_segment=segment_id,
            new_contacts=[ids[e] for e in created],  # new contacts meet every segment
        )
    return AddResult(added=added, created=len(created), not_found=not_found)


def remove_members(
    session: Session, project_id: uuid.UUID, segment_id: uuid.UUID, emails: Sequence[str]
) -> int:
    _check_email_count(emails)
    _static_row(session, project_id, segment_id)
    wanted = {e for e in (normalize_email(raw) for raw in emails) if e is not None}
    if not wanted:
        return 0
    m = tables.static_members
    c = tables.contacts.c
    contact_ids = select(c.id).where(c.project_id == project_id, c.email == tables.any_text(wanted))
    result = session.execute(
        delete(m)
        .where(
            m.c.project_id == project_id,
            m.c.segment_id == segment_id,
            m.c.contact_id.in_(contact_ids),
        )
        .returning(m.c.contact_id)
    )
    removed = [r.contact_id for r in result]
    membership.adjust_count(session, project_id, segment_id, -len(removed))
    membership.refresh_contacts(session, project_id, removed, static_segment=segment_id)
    return len(removed)


def export_members(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> Any:
    """Every member, streamed from the database in batches (server-side cursor), so memory
    stays bounded whatever the segment's size. Ordered by contact id."""
    row = get_row(session, project_id, segment_id)
    c = tables.contacts
    if not is_stored(row):
        live = member_ids(session, project_id, parse_condition(row.condition)).subquery("live")
        return _live(
            session,
            select(c)
            .join(live, (c.c.project_id == project_id) & (c.c.id == live.c.contact_id))
            .order_by(c.c.id)
            .execution_options(yield_per=1000),
        )
    members = tables.static_members if row.type == STATIC else tables.segment_members
    query = (
        select(c)
        .join(
            members,
            (members.c.project_id == c.c.project_id) & (members.c.contact_id == c.c.id),
        )
        .where(members.c.project_id == project_id, members.c.segment_id == segment_id)
        .order_by(c.c.id)
    )
    return session.execute(query, execution_options={"yield_per": 1000})
