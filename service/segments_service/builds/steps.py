"""The steps of a build (compute, apply, catch up, final), each run inside the transaction
of one Builder step."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Row,
    and_,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from segments_service import membership, metrics, tables
from segments_service.builds.queue import APPLY, CATCHUP, FAILED, FINAL, READY, BuildSettings


def _advance(session: Session, build: Row[Any], **values: Any) -> None:
    b = tables.segment_builds
    session.execute(
        update(b)
        .where(b.c.project_id == build.project_id, b.c.segment_id == build.segment_id)
        .values(**values)
    )


def _segment(session: Session, build: Row[Any]) -> membership.Dynamic:
    (seg,) = membership.dynamic_segments(session, build.project_id, [build.segment_id])
    return seg


def _compute(session: Session, build: Row[Any], settings: BuildSettings) -> None:
    """The new members among the next slice of contacts, into the shadow table."""
    end = _slice_end(session, build, settings.slice)
    seg = _segment(session, build)
    bounds = (
        (lambda column: and_(*_in_slice(column, build, end)))
        if build.cursor is not None or end is not None
        else None  # the whole project fits in one slice
    )
    members = seg.members(build.project_id, membership.db_now(session), bounds).subquery()
    sh = tables.segment_build_shadow
    session.execute(
        insert(sh).from_select(
            ["project_id", "segment_id", "contact_id"],
            select(literal(build.project_id), literal(seg.id), members.c.contact_id),
        )
    )
    if end is None:
        # Without statistics of the shadow just written the planner takes it for empty
        # and probes it row by row against whole slices: the apply ran out of budget.
        session.execute(text("ANALYZE segment_build_shadow"))
        _advance(session, build, phase=APPLY, cursor=None)
    else:
        _advance(session, build, cursor=end)


def _slice_end(session: Session, build: Row[Any], size: int) -> uuid.UUID | None:
    """The last contact id of the next slice of `size` after the build's cursor; None
    when the rest of the contacts fit in it (the slice is then open-ended)."""
    c = tables.contacts.c
    query = (
        select(c.id)
        .where(c.project_id == build.project_id)
        .order_by(c.id)
        .offset(size - 1)
        .limit(1)
    )
    if build.cursor is not None:
        query = query.where(c.id > build.cursor)
    end: uuid.UUID | None = session.execute(query).scalar_one_or_none()
    return end


def _in_slice(column: Any, build: Row[Any], end: uuid.UUID | None) -> list[Any]:
    """`column` within (cursor, end]: a range of contact ids, which an index scans as one
    range (contacts by their primary key, events by project, name and contact), where
    an array of 50,000 ids was probed id by id or hashed against every event of the
    project, once per slice."""
    bounds = []
    if build.cursor is not None:
        bounds.append(column > build.cursor)
    if end is not None:
        bounds.append(column <= end)
    return bounds


def _clean(build: Row[Any], contact_id: Any) -> Any:
    """The contact is not dirty: no writer touched it since the build started."""
    d = tables.segment_build_dirty.c
    return ~exists(
        select(literal(1)).where(
            d.project_id == build.project_id,
            d.segment_id == build.segment_id,
            d.contact_id == contact_id,
        )
    )


def _forget_members(session: Session, build: Row[Any], contact_ids: Sequence[uuid.UUID]) -> int:
    """Delete these contacts' stored memberships of the segment, without events (their
    entries are recorded again, or their contacts are gone); answers how many."""
    if not contact_ids:
        return 0
    m = tables.segment_members
    return _forget_where(session, build, m.c.contact_id == tables.any_uuid(contact_ids))


def _forget_where(session: Session, build: Row[Any], *where: Any) -> int:
    m = tables.segment_members
    gone = session.execute(
        delete(m)
        .where(m.c.project_id == build.project_id, m.c.segment_id == build.segment_id, *where)
        .returning(m.c.contact_id)
    ).all()
    membership.adjust_count(session, build.project_id, build.segment_id, -len(gone))
    return len(gone)


def _apply_slice(session: Session, build: Row[Any], settings: BuildSettings) -> None:
    """Make the stored memberships of the next slice's clean contacts those of the shadow."""
    end = _slice_end(session, build, settings.slice)
    seg = _segment(session, build)
    moved = 0
    if build.enter_all:
        # Every member gets an entry: the stored memberships are entered again, with
        # events, here (clean contacts) or by the catch-up (dirty ones, whatever their
        # stored membership was when they became dirty).
        m = tables.segment_members.c
        entered = [] if build.entered_to is None else [m.contact_id > build.entered_to]
        moved += _forget_where(session, build, *_in_slice(m.contact_id, build, end), *entered)
    row = session.execute(_diff_statement(build, seg, end)).one()._mapping
    moved += row["entered"] + row["exited"]
    metrics.events_written(row.get("events", 0))
    values: dict[str, Any] = {"moved": build.moved + moved}
    if end is None:
        values.update(phase=CATCHUP, cursor=None)
        if build.moved + moved >= membership.refresh.ANALYZE_AFTER_ROWS:
            # The catch-up runs the writers' scoped statement: planned with statistics
            # from before the bulk change, it took 10 s a chunk instead of milliseconds
            # (see membership.rebuild).
            session.execute(text("ANALYZE segment_members"))
    else:
        values["cursor"] = end
    _advance(session, build, **values)


def _diff_statement(build: Row[Any], seg: membership.Dynamic, end: uuid.UUID | None) -> Any:
    """Entries (shadow, not stored) and exits (stored, not shadow) of the slice's clean
    contacts, with the count and, for a tracked segment, the entry/exit events, in one
    statement."""
    project_id, segment_id = build.project_id, build.segment_id
    m = tables.segment_members
    sh = tables.segment_build_shadow
    c = tables.contacts.c
    desired = (
        select(sh.c.contact_id)
        .where(
            sh.c.project_id == project_id,
            sh.c.segment_id == segment_id,
            *_in_slice(sh.c.contact_id, build, end),
            _clean(build, sh.c.contact_id),
        )
        .cte("desired")
    )
    rows = (
        select(literal(project_id), literal(segment_id), desired.c.contact_id, c.created_at)
        .join_from(
            desired,
            tables.contacts,
            (c.project_id == project_id) & (c.id == desired.c.contact_id),
        )
        .order_by(desired.c.contact_id)
    )
    # Members already stored are skipped by the conflict on the primary key, and only the
    # rows inserted are returned: an anti-join against the stored members, planned with
    # statistics from before the build (a new segment: "1 row"), rescanned all members
    # stored so far for every desired contact and ran past its budget.
    entered = (
        pg_insert(m)
        .from_select(["project_id", "segment_id", "contact_id", "contact_created_at"], rows)
        .on_conflict_do_nothing()
        .returning(m.c.segment_id, m.c.contact_id)
        .cte("entered")
    )
    wanted = select(literal(1)).where(
        sh.c.project_id == project_id,
        sh.c.segment_id == segment_id,
        sh.c.contact_id == m.c.contact_id,
    )
    exited = (
        delete(m)
        .where(
            m.c.project_id == project_id,
            m.c.segment_id == segment_id,
            *_in_slice(m.c.contact_id, build, end),
            _clean(build, m.c.contact_id),
            ~exists(wanted),
        )
        .returning(m.c.segment_id, m.c.contact_id)
        .cte("exited")
    )

    n_entered = select(func.count()).select_from(entered).scalar_subquery()
    n_exited = select(func.count()).select_from(exited).scalar_subquery()
    s = tables.segments
    counted = (
        update(s)
        .where(s.c.project_id == project_id, s.c.id == segment_id)
        .values(member_count=s.c.member_count + n_entered - n_exited)
        .returning(s.c.id)
        .cte("counted")
    )
    outputs = [
        n_exited.label("exited"),
        n_entered.label("entered"),
        select(func.count()).select_from(counted).scalar_subquery().label("counted"),
    ]
    if seg.tracked:
        changes = union_all(
            select(entered.c.segment_id, entered.c.contact_id, literal("entry").label("kind")),
            select(exited.c.segment_id, exited.c.contact_id, literal("exit").label("kind")),
        ).subquery("changes")
        recorded = membership.record_events(project_id, [seg], changes)
        outputs.append(select(func.count()).select_from(recorded).scalar_subquery().label("events"))
    return select(*outputs)


def _catch_up(session: Session, build: Row[Any]) -> None:
    """Re-evaluate a chunk of the dirty contacts; when fewer than a chunk were left, the
    next step is the final one."""
    ids = _dirty(session, build, membership.CHUNK)
    moved = _reevaluate(session, build, ids)
    values: dict[str, Any] = {"moved": build.moved + moved}
    if len(ids) < membership.CHUNK:
        values["phase"] = FINAL
    _advance(session, build, **values)


def _dirty(session: Session, build: Row[Any], limit: int | None = None) -> list[uuid.UUID]:
    """The contacts writers marked dirty for this build, in id order (the first `limit`)."""
    d = tables.segment_build_dirty.c
    query = (
        select(d.contact_id)
        .where(d.project_id == build.project_id, d.segment_id == build.segment_id)
        .order_by(d.contact_id)
        .limit(limit)
    )
    return list(session.execute(query).scalars())


def _reevaluate(session: Session, build: Row[Any], ids: Sequence[uuid.UUID]) -> int:
    """The writers' path for dirty contacts: locked in id order, evaluated against the
    segment, then no longer dirty; contacts deleted meanwhile lose their membership."""
    if not ids:
        return 0
    present = membership.lock_contacts(session, build.project_id, ids)
    seg = _segment(session, build)
    moved = _forget_members(session, build, sorted(set(ids) - set(present)))
    if present:
        changes = membership.apply_scoped(session, build.project_id, seg, present)
        moved += changes.entered + changes.exited
    d = tables.segment_build_dirty
    session.execute(
        delete(d).where(
            d.c.project_id == build.project_id,
            d.c.segment_id == build.segment_id,
            d.c.contact_id == tables.any_uuid(ids),
        )
    )
    return moved


def _finish(session: Session, build: Row[Any]) -> None:
    """Under the exclusive lock: the last dirty contacts, then the switch to stored
    membership (READY, or FAILED with the previous condition back)."""
    _reevaluate(session, build, _dirty(session, build))
    seg = _segment(session, build)
    s = tables.segments
    session.execute(
        update(s)
        .where(s.c.project_id == build.project_id, s.c.id == build.segment_id)
        .values(
            status=FAILED if build.failure else READY,
            status_reason=build.failure,
            membership_state=membership.STORED,
            time_dependent=seg.time_dependent,
        )
    )
    _drop_build(session, build.project_id, build.segment_id)


def _drop_build(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> None:
    for table in (tables.segment_build_shadow, tables.segment_builds):
        session.execute(
            delete(table).where(table.c.project_id == project_id, table.c.segment_id == segment_id)
        )
