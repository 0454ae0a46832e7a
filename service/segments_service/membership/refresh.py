"""The entry points: re-evaluating contacts after a write, rebuilding segments, and the
bookkeeping around them (dependents, counts, contacts noted for a build)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Uuid, column, delete, func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from segments_service import metrics, tables
from segments_service.membership import wakeups
from segments_service.membership.dynamic import (
    BUILDING,
    FRESH,
    STORED,
    Changes,
    Dynamic,
    dynamic_segments,
)
from segments_service.membership.locks import (
    allow_long_statements,
    db_clock,
    db_now,
    lock_contacts,
    lock_exclusive,
    lock_shared,
)
from segments_service.membership.statement import _apply, record_events

log = logging.getLogger(__name__)

# Rounds of re-evaluation after entry/exit events, for segments that filter on them.
MAX_EVENT_ROUNDS = 5
CHUNK = 1000
# A rebuild that moves at least this many memberships refreshes the table's statistics.
ANALYZE_AFTER_ROWS = 10_000


def apply_scoped(
    session: Session, project_id: uuid.UUID, segment: Dynamic, contact_ids: Sequence[uuid.UUID]
) -> Changes:
    """Re-evaluate these contacts (locked by the caller, lock_contacts) against one
    segment, recording entry/exit events if it is tracked."""
    ids = list(contact_ids)
    return _apply(session, project_id, [segment], {segment.id: ids}, db_now(session))


def refresh_contacts(
    session: Session,
    project_id: uuid.UUID,
    contact_ids: Iterable[uuid.UUID],
    *,
    event_contacts: Mapping[str, Collection[uuid.UUID]] | None = None,
    fresh_contacts: Mapping[str, Collection[uuid.UUID]] | None = None,
    static_segment: uuid.UUID | None = None,
    new_contacts: Iterable[uuid.UUID] = (),
) -> Changes:
    """Re-evaluate contacts against the project's dynamic segments.

    Called at the end of every write that can change membership. Without a hint every
    dynamic segment re-evaluates every contact given. With `static_segment` (only that
    list changed), `contact_ids` meet just the segments whose conditions reach the list.
    With `event_contacts` (only events were added: each event name with the contacts that
    got one), a segment re-evaluates just the contacts that got an event it reads: an
    event no condition reads costs no evaluation and no lock. `fresh_contacts`, with
    `event_contacts`: those of its events stored at the transaction's start (`now()`);
    one of them can settle a segment's condition without evaluating it (Dynamic.certain).
    `new_contacts` meet every segment.

    The contacts to re-evaluate are locked first (lock_contacts).
    """
    new = set(new_contacts)
    given = set(contact_ids) | new
    if not given:
        return Changes(0, 0, 0)
    lock_shared(session, project_id)
    every = dynamic_segments(session, project_id, states=(STORED, BUILDING))
    if not every:
        return Changes(0, 0, 0)

    def wanted_by(seg: Dynamic) -> set[uuid.UUID]:
        if event_contacts is not None:
            return new | who_got(event_contacts, seg.event_names)
        if static_segment is not None and static_segment not in seg.references:
            return new
        return given

    wanted = {seg.id: wanted_by(seg) for seg in every}
    locked = lock_contacts(session, project_id, set().union(*wanted.values()))
    present = set(locked)
    if event_contacts is None and static_segment is None:
        windows = wakeups.data_windows(every)
        if windows:
            # The contacts' data may have changed: so may when time next turns their answer.
            wakeups.refresh(session, project_id, windows, db_now(session), ids=locked)
    # Segments being built are not evaluated: their contacts are noted, after the locks,
    # for the build to catch up (builds.py).
    mark_dirty(
        session,
        project_id,
        {seg.id: wanted[seg.id] & present for seg in every if seg.state == BUILDING},
    )
    every = [seg for seg in every if seg.state == STORED]
    now, started = db_clock(session)
    settled = {}
    if event_contacts is not None and now - started < FRESH:
        settled = _settled(every, event_contacts, fresh_contacts or {}, new, present)
    # Segments wanting the same contacts share one list, hence one array parameter. The
    # lists are in no particular order (an `= ANY` array needs none) and made with set
    # operations only: UUIDs hash and compare in Python, and sorting a list per segment, or
    # testing each id against a set, was a tenth of a batch's time with 200 segments.
    # A list is shared by what it is made from (the contacts wanted, and what fresh
    # events settle), not by its contents: which segments share a list is then the same
    # from batch to batch, as is the statement (its cache key), even where the contacts
    # left to evaluate happen to be the same, or none.
    lists: dict[tuple[Any, ...], list[uuid.UUID]] = {}
    scope: dict[uuid.UUID, Sequence[uuid.UUID]] = {}
    scope_sets: dict[uuid.UUID, frozenset[uuid.UUID]] = {}
    certain: dict[uuid.UUID, Sequence[uuid.UUID]] = {}
    for seg in every:
        ids = scope_sets[seg.id] = frozenset(wanted[seg.id] & present)
        key: tuple[Any, ...] = (ids,)
        if seg.id in settled:
            # Contacts settled without evaluating them are left out; the members among
            # them are given (_apply's `certain`).
            yes, no, members = settled[seg.id]
            certain[seg.id] = members
            key = (ids, seg.certain, seg.blank, seg.event_names)
            ids -= yes | no
        if key not in lists:
            lists[key] = list(ids)
        scope[seg.id] = lists[key]
    segments = [seg for seg in every if scope_sets[seg.id]]
    exits: dict[uuid.UUID, list[uuid.UUID]] | None = None
    if event_contacts is not None:
        # Only events were added. New contacts have no memberships to leave; an existing
        # one can have left a segment only by gaining an event its condition can be
        # turned false by (Dynamic.exit_event_names). Exits the clock alone makes stay the
        # sweeper's, as for every contact without an event in this write.
        exits = {}
        for seg in segments:
            can_leave = who_got(event_contacts, seg.exit_event_names)
            if seg.id in settled:
                # Those a fresh event took out are probed, those it keeps in are not.
                yes, no, _members = settled[seg.id]
                can_leave = (can_leave | no) - yes
            exits[seg.id] = list((can_leave - new) & scope_sets[seg.id]) if can_leave else []
        if not any(scope[seg.id] or certain.get(seg.id) or exits[seg.id] for seg in segments):
            # Every contact is settled out of every segment, and none can have left one:
            # the statement would write nothing (events of names no segment reads, for
            # contacts the batch created).
            segments = []
    # Entry/exit events recorded in one round can move segments that filter on them.
    followers = [seg for seg in every if seg.reads_segment_events]
    total = Changes(0, 0, 0)
    for _round in range(MAX_EVENT_ROUNDS):
        if not segments:
            break
        changes = _apply(
            session, project_id, segments, scope, now, exits=exits, certain=certain or None
        )
        total = Changes(
            total.entered + changes.entered,
            total.exited + changes.exited,
            total.events + changes.events,
        )
        if not changes.events:
            break
        segments = followers
        scope = {seg.id: locked for seg in followers}
        exits = None
        certain = {}
        now = db_now(session)
    return total


def who_got(by_name: Mapping[str, Collection[uuid.UUID]], names: Collection[str]) -> set[uuid.UUID]:
    """The contacts that got an event of one of these names (`by_name`: event name ->
    contacts, refresh_contacts' hints)."""
    found: set[uuid.UUID] = set()
    for name in by_name.keys() & names:
        found.update(by_name[name])
    return found


def _settled(
    segments: Sequence[Dynamic],
    event_contacts: Mapping[str, Collection[uuid.UUID]],
    fresh: Mapping[str, Collection[uuid.UUID]],
    new: set[uuid.UUID],
    present: set[uuid.UUID],
) -> dict[uuid.UUID, tuple[frozenset[uuid.UUID], frozenset[uuid.UUID], list[uuid.UUID]]]:
    """For a batch of events (`event_contacts`, of which `fresh` were stored at the
    transaction's start, for contacts of which `new` were created by it): per segment,
    the contacts whose membership is settled without evaluating them, as members and as
    non-members, and the members again as a list. That is a fresh event that settles the
    condition (Dynamic.certain), or a new contact with none of the events the condition
    reads (Dynamic.blank). The list is one per set of names, so that a segment keeps its
    array parameter from batch to batch (the statement's cache key), even when empty."""
    gained: dict[frozenset[str], frozenset[uuid.UUID]] = {}
    unread: dict[frozenset[str], frozenset[uuid.UUID]] = {}
    members: dict[tuple[frozenset[str], frozenset[str] | None], list[uuid.UUID]] = {}

    def got(names: frozenset[str]) -> frozenset[uuid.UUID]:
        if names not in gained:
            gained[names] = frozenset(who_got(fresh, names) & present)
        return gained[names]

    def newcomers(names: frozenset[str]) -> frozenset[uuid.UUID]:
        """The new contacts without an event of these names."""
        if names not in unread:
            unread[names] = frozenset((new - who_got(event_contacts, names)) & present)
        return unread[names]

    out = {}
    for seg in segments:
        c, blank = seg.certain, seg.blank
        if not c.true and not c.false and blank is None:
            continue
        yes, no = got(c.true), got(c.false)
        if blank is True:
            yes |= newcomers(seg.event_names)
        elif blank is False:
            no |= newcomers(seg.event_names)
        key = (c.true, seg.event_names if blank else None)
        if key not in members:
            members[key] = list(yes)
        out[seg.id] = (yes, no - yes, members[key])
    return out


def rebuild(
    session: Session,
    project_id: uuid.UUID,
    segment_ids: Iterable[uuid.UUID],
    *,
    emit: bool,
) -> Changes:
    """Recompute these segments over all contacts, under the exclusive project lock.

    `emit` records entry/exit events for the difference (tracked segments only)."""
    started = time.perf_counter()
    allow_long_statements(session)
    lock_exclusive(session, project_id)
    segments = dynamic_segments(session, project_id, segment_ids)
    if not segments:
        return Changes(0, 0, 0)
    s = tables.segments.c
    for seg in segments:
        session.execute(
            update(tables.segments)
            .where(s.project_id == project_id, s.id == seg.id)
            .values(time_dependent=seg.time_dependent)
        )
    changes = _apply(session, project_id, segments, None, db_now(session), emit=emit)
    if changes.entered + changes.exited >= ANALYZE_AFTER_ROWS:
        # Statistics from before a bulk change make the planner misjudge the per-batch
        # statements that follow (it hashed a whole 65k-row segment for 123 exits: 75 ms
        # instead of 1 ms) until autovacuum analyzes the table, up to minutes later.
        session.execute(text("ANALYZE segment_members"))
    metrics.BUILD_DURATION.labels("inline").observe(time.perf_counter() - started)
    return changes


def dependents(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> set[uuid.UUID]:
    """Segments whose conditions reach `segment_id` through references (transitively)."""
    r = tables.segment_references.c
    found: set[uuid.UUID] = set()
    frontier = {segment_id}
    while frontier:
        rows = session.execute(
            select(r.segment_id).where(r.project_id == project_id, r.referenced_id.in_(frontier))
        )
        frontier = {row.segment_id for row in rows} - found - {segment_id}
        found |= frontier
    return found


def record_entries_for_all(session: Session, project_id: uuid.UUID, segment_id: uuid.UUID) -> int:
    """Tracking was just turned on: one entry event per current member."""
    (segment,) = dynamic_segments(session, project_id, [segment_id])
    m = tables.segment_members.c
    changes = (
        select(m.segment_id, m.contact_id, literal("entry").label("kind"))
        .where(m.project_id == project_id, m.segment_id == segment_id)
        .subquery("changes")
    )
    recorded = record_events(project_id, [segment], changes)
    return int(session.execute(select(func.count()).select_from(recorded)).scalar_one())


def forget_contact(session: Session, project_id: uuid.UUID, contact_id: uuid.UUID) -> None:
    """Before a contact is deleted: its memberships leave the maintained counts (no exit
    events; the contact and its history are gone)."""
    lock_shared(session, project_id)
    s = tables.segments
    building = session.execute(
        select(s.c.id).where(s.c.project_id == project_id, s.c.membership_state == BUILDING)
    ).scalars()
    mark_dirty(session, project_id, {segment_id: [contact_id] for segment_id in building})
    w = tables.contact_wakeups.c
    session.execute(
        delete(tables.contact_wakeups).where(w.project_id == project_id, w.contact_id == contact_id)
    )
    for table in (tables.segment_members, tables.static_members):
        gone = (
            delete(table)
            .where(table.c.project_id == project_id, table.c.contact_id == contact_id)
            .returning(table.c.segment_id)
            .cte("gone")
        )
        session.execute(
            update(s)
            .where(s.c.project_id == project_id, s.c.id.in_(select(gone.c.segment_id)))
            .values(member_count=s.c.member_count - 1)
        )


def adjust_count(
    session: Session, project_id: uuid.UUID, segment_id: uuid.UUID, delta: int
) -> None:
    if delta:
        s = tables.segments
        session.execute(
            update(s)
            .where(s.c.project_id == project_id, s.c.id == segment_id)
            .values(member_count=s.c.member_count + delta)
        )


def mark_dirty(
    session: Session,
    project_id: uuid.UUID,
    contacts: Mapping[uuid.UUID, Collection[uuid.UUID]],
) -> None:
    """Note contacts a writer touched, per segment being built, for its build's catch-up."""
    segment_ids = [seg for seg, ids in contacts.items() for _ in ids]
    if not segment_ids:
        return
    d = tables.segment_build_dirty
    pairs = (
        func.unnest(
            literal(segment_ids, tables.UUID_ARRAY),
            literal([i for ids in contacts.values() for i in ids], tables.UUID_ARRAY),
        )
        .table_valued(column("segment_id", Uuid), column("contact_id", Uuid))
        .render_derived(name="pairs", with_types=False)
    )
    session.execute(
        pg_insert(d)
        .from_select(
            ["project_id", "segment_id", "contact_id"],
            select(literal(project_id, Uuid), pairs.c.segment_id, pairs.c.contact_id),
        )
        .on_conflict_do_nothing()
    )
