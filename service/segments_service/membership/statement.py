"""The one statement that re-evaluates contacts against dynamic segments: members wanted,
entries inserted, exits deleted, counts adjusted and entry/exit events recorded."""

from __future__ import annotations

import re
import uuid
from collections.abc import Hashable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Select,
    Text,
    Uuid,
    any_,
    bindparam,
    column,
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
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from segments_service import metrics, tables
from segments_service.filters import Derive, relative_values
from segments_service.kept import Kept
from segments_service.membership.dynamic import Changes, Dynamic


def slugify(name: str) -> str:
    """The name as used in entry/exit event names (README.md, Membership): lower-cased; letters (any
    script), digits, _, - and whitespace kept; whitespace runs become one -; repeated -
    collapse; no leading or trailing -."""
    kept = "".join(ch for ch in name.lower() if ch.isalnum() or ch in "_-" or ch.isspace())
    slug = re.sub(r"\s+", "-", kept)
    return re.sub(r"-{2,}", "-", slug).strip("-")


# Which contacts to evaluate, per segment id; None means all of the project's contacts.
Scope = Mapping[uuid.UUID, Sequence[uuid.UUID]] | None


def desired_members(
    project_id: uuid.UUID,
    segments: Sequence[Dynamic],
    scope: Scope,
    now: datetime,
    relative: dict[str, Derive] | None = None,
    certain: Mapping[uuid.UUID, Sequence[uuid.UUID]] | None = None,
) -> Select[Any]:
    """(segment_id, contact_id) of every member, among the scope's contacts.

    The scope's lists are parameters given at execution (scope_parameters);
    `relative`: see CompileContext. `certain`: per segment, contacts known to be members
    without evaluating them (kept out of its scope by the caller), a parameter too."""
    scopes: list[Any] = [None] * len(segments)
    given: list[Any] = [None] * len(segments)
    if scope is not None:
        # One array parameter per distinct list of ids, however many places read it.
        which, lists = scope_lists(segments, scope)
        arrays = [
            bindparam(_scope_parameter(n), type_=tables.UUID_ARRAY) for n in range(len(lists))
        ]
        given = [arrays[n] for n in which]
        scopes = [any_(array) for array in given]
    known = certain_lists(segments, certain or {})[0]
    parts = []
    for seg, seg_scope, array, n in zip(segments, scopes, given, known, strict=True):
        members = seg.members(project_id, now, seg_scope, relative).subquery()
        arm = select(literal(seg.id, Uuid).label("segment_id"), members.c.contact_id)
        if array is not None and n is not None:
            # Every contact of the scope may have been settled (`certain`): an empty list
            # skips the evaluation (a one-time test, in a generic plan as in a custom
            # one), where a plan for `= ANY('{}')` may scan the whole project's events.
            arm = arm.where(func.cardinality(array) > 0)
        parts.append(arm)
        if n is not None:
            ids = func.unnest(bindparam(_certain_parameter(n), type_=tables.UUID_ARRAY))
            parts.append(select(literal(seg.id, Uuid).label("segment_id"), ids.label("contact_id")))
    return union_all(*parts) if len(parts) > 1 else parts[0]  # type: ignore[return-value]


def scope_lists(
    segments: Sequence[Dynamic], scope: Mapping[uuid.UUID, Sequence[uuid.UUID]]
) -> tuple[tuple[int, ...], list[Sequence[uuid.UUID]]]:
    """Which list (by identity) each segment's scope is, and the distinct lists in that
    order: one array parameter each in desired_members."""
    index: dict[int, int] = {}
    lists: list[Sequence[uuid.UUID]] = []
    for seg in segments:
        if id(scope[seg.id]) not in index:
            index[id(scope[seg.id])] = len(lists)
            lists.append(scope[seg.id])
    return tuple(index[id(scope[seg.id])] for seg in segments), lists


def certain_lists(
    segments: Sequence[Dynamic], certain: Mapping[uuid.UUID, Sequence[uuid.UUID]]
) -> tuple[tuple[int | None, ...], list[Sequence[uuid.UUID]]]:
    """Which list (by identity) of known members each segment has, if any, and the
    distinct lists in that order, as scope_lists."""
    having = [seg for seg in segments if seg.id in certain]
    which, lists = scope_lists(having, certain)
    at = dict(zip((seg.id for seg in having), which, strict=True))
    return tuple(at.get(seg.id) for seg in segments), lists


def _scope_parameter(n: int) -> str:
    return f"scope_{n}"


def _certain_parameter(n: int) -> str:
    return f"certain_{n}"


# The parameters of the (segment, contact) pairs _apply's exits probe.
_PAIR_SEGMENTS, _PAIR_CONTACTS = "pair_segments", "pair_contacts"


def scope_parameters(
    segments: Sequence[Dynamic],
    scope: Mapping[uuid.UUID, Sequence[uuid.UUID]],
    lists: Sequence[Sequence[uuid.UUID]],
    exits: Mapping[uuid.UUID, Sequence[uuid.UUID]] | None = None,
    known: Sequence[Sequence[uuid.UUID]] = (),
) -> dict[str, Any]:
    """The values of desired_members' parameters for this scope (`lists` from
    scope_lists, `known` from certain_lists), and of the (segment, contact) pairs _apply's
    exits probe: the scope's, or those of `exits` (per segment, the scope's contacts that
    can have left it)."""
    probed = scope if exits is None else exits
    params: dict[str, Any] = {_scope_parameter(n): list(ids) for n, ids in enumerate(lists)}
    params.update({_certain_parameter(n): list(ids) for n, ids in enumerate(known)})
    params[_PAIR_SEGMENTS] = [seg.id for seg in segments for _ in probed.get(seg.id, ())]
    params[_PAIR_CONTACTS] = [i for seg in segments for i in probed.get(seg.id, ())]
    return params


# Statements that re-evaluate given contacts, by what they are built from (_apply): the
# same segments meet every batch of events, and building the statement anew (compiling
# each condition, then SQLAlchemy's cache key of the whole) cost a third of a batch's
# Python time. They hold no ids; each is a few dozen kB.
STATEMENT_CACHE_SIZE = 128
_statements: Kept[Hashable, tuple[Any, dict[str, Derive]]] = Kept(STATEMENT_CACHE_SIZE)


# psycopg prepares a statement from its fifth run on a connection; a prepared statement
# with plan_cache_mode force_generic_plan is planned at its first run, then reuses that plan.
_GENERIC_PLAN = text("SET LOCAL plan_cache_mode = force_generic_plan")
_CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")


def _apply(
    session: Session,
    project_id: uuid.UUID,
    segments: Sequence[Dynamic],
    scope: Scope,
    now: datetime,
    *,
    emit: bool = True,
    exits: Mapping[uuid.UUID, Sequence[uuid.UUID]] | None = None,
    certain: Mapping[uuid.UUID, Sequence[uuid.UUID]] | None = None,
) -> Changes:
    """Make `segment_members` match the conditions for the scope's contacts, in one
    statement; see the package doc (membership/__init__.py). With `exits`, only those of
    each segment's contacts are probed for an exit: the caller knows the others cannot
    have left (scope_parameters). With `certain`, a segment's listed contacts are members
    without being evaluated: the caller knows they are, and leaves them out of the scope
    and of `exits` (refresh_contacts)."""
    if scope is None:
        statement, relative = _apply_statement(project_id, segments, None, now, emit, None)
        params: dict[str, Any] = {}
    else:
        which, lists = scope_lists(segments, scope)
        known, known_lists = certain_lists(segments, certain or {})
        key = (project_id, emit, which, known, tuple(seg.signature for seg in segments))
        statement, relative = _statements.get(
            key, lambda: _apply_statement(project_id, segments, scope, now, emit, {}, certain)
        )
        params = scope_parameters(segments, scope, lists, exits, known_lists)
    params.update(relative_values(relative, now))
    if scope is None:
        row = session.execute(statement, params).one()._mapping
    else:
        # A batch's statement is the same text for every batch meeting the same segments,
        # and its shape (each segment's members among given contacts, probed by index)
        # suits every list of contacts: planned once per connection, not per batch. With
        # 200 segments its planning was 17 ms of a 100 ms statement. Everything else keeps
        # a plan per execution (database.make_engine).
        session.execute(_GENERIC_PLAN)
        row = session.execute(statement, params).one()._mapping
        session.execute(_CUSTOM_PLANS)
    # The events recorded are an output only when a tracked segment is there.
    events = row.get("events", 0)
    metrics.events_written(events)
    return Changes(entered=row["entered"], exited=row["exited"], events=events)


def _apply_statement(
    project_id: uuid.UUID,
    segments: Sequence[Dynamic],
    scope: Scope,
    now: datetime,
    emit: bool,
    relative: dict[str, Derive] | None,
    certain: Mapping[uuid.UUID, Sequence[uuid.UUID]] | None = None,
) -> tuple[Any, dict[str, Derive]]:
    """_apply's statement. Scoped, the contacts are parameters (scope_parameters) and with
    `relative`, so is the instant: it serves other batches."""
    m = tables.segment_members
    desired = desired_members(project_id, segments, scope, now, relative, certain).cte("desired")
    seg_ids = [seg.id for seg in segments]
    c = tables.contacts.c
    # Contacts are joined for the insert only, not in `desired`: many member sets never
    # read contacts, and the exits need none of their columns.
    rows = select(
        literal(project_id, Uuid),
        desired.c.segment_id,
        desired.c.contact_id,
        c.created_at,
    ).join_from(
        desired,
        tables.contacts,
        (c.project_id == project_id) & (c.id == desired.c.contact_id),
    )
    columns = ["project_id", "segment_id", "contact_id", "contact_created_at"]
    if scope is None:
        # A rebuild holds the project lock exclusively: nobody else inserts memberships
        # meanwhile, so the new ones are the desired less the stored, inserted plainly and
        # in contact order (two of the table's three indexes lead with the contact after
        # the segment). A million members: 11 s, against 17-19 s with ON CONFLICT in
        # random order.
        stored = (
            select(literal(1))
            .where(
                m.c.project_id == project_id,
                # The ids as values too: the planner cannot see through `desired` which
                # segments it holds, and would probe every membership of each contact.
                m.c.segment_id.in_(seg_ids),
                m.c.segment_id == desired.c.segment_id,
                m.c.contact_id == desired.c.contact_id,
            )
            .correlate(desired)
        )
        insert_new = insert(m).from_select(
            columns, rows.where(~exists(stored)).order_by(desired.c.contact_id)
        )
    else:
        # Batches insert the desired memberships of their contacts; stored ones are skipped.
        insert_new = pg_insert(m).from_select(columns, rows).on_conflict_do_nothing()
    entered = insert_new.returning(m.c.segment_id, m.c.contact_id).cte("entered")
    gone = delete(m).where(
        m.c.project_id == project_id,
        m.c.segment_id.in_(seg_ids),
        ~exists(
            select(literal(1)).where(
                desired.c.segment_id == m.c.segment_id, desired.c.contact_id == m.c.contact_id
            )
        ),
    )
    if scope is not None:
        # The (segment, contact) pairs in question, each probed by the primary key: an
        # index condition of `segment_id = ANY(..) AND contact_id = ANY(..)` lets the
        # planner pick the listing index and read whole segments instead (11 ms of an
        # 18 ms batch at a million contacts).
        pairs = (
            func.unnest(
                bindparam(_PAIR_SEGMENTS, type_=tables.UUID_ARRAY),
                bindparam(_PAIR_CONTACTS, type_=tables.UUID_ARRAY),
            )
            .table_valued(column("segment_id", Uuid), column("contact_id", Uuid))
            .render_derived(name="pairs", with_types=False)
        )
        gone = gone.where(
            m.c.segment_id == pairs.c.segment_id, m.c.contact_id == pairs.c.contact_id
        )
    exited = gone.returning(m.c.segment_id, m.c.contact_id).cte("exited")

    deltas = union_all(
        select(entered.c.segment_id, literal(1).label("delta")),
        select(exited.c.segment_id, literal(-1).label("delta")),
    ).subquery("deltas")
    totals = (
        select(deltas.c.segment_id, func.sum(deltas.c.delta).label("delta"))
        .group_by(deltas.c.segment_id)
        .subquery("totals")
    )
    s = tables.segments
    counted = (
        update(s)
        .where(s.c.project_id == project_id, s.c.id == totals.c.segment_id)
        .values(member_count=s.c.member_count + totals.c.delta)
        .returning(s.c.id)
        .cte("counted")
    )
    tracked = [seg for seg in segments if seg.tracked] if emit else []
    # The exits are counted, hence run, first: run after the inserts, their scan of a
    # segment's stored memberships would step over every entry just inserted.
    outputs = [
        select(func.count()).select_from(exited).scalar_subquery().label("exited"),
        select(func.count()).select_from(entered).scalar_subquery().label("entered"),
        select(func.count()).select_from(counted).scalar_subquery().label("counted"),
    ]
    if tracked:
        changes = union_all(
            select(entered.c.segment_id, entered.c.contact_id, literal("entry").label("kind")),
            select(exited.c.segment_id, exited.c.contact_id, literal("exit").label("kind")),
        ).subquery("changes")
        recorded = record_events(project_id, tracked, changes)
        outputs.append(select(func.count()).select_from(recorded).scalar_subquery().label("events"))
    return select(*outputs), relative or {}


def record_events(project_id: uuid.UUID, tracked: Sequence[Dynamic], changes: Any) -> Any:
    """A CTE recording `segment.<slug>.<kind>` events for `changes` (segment_id, contact_id,
    kind) of tracked segments, at consecutive positions of the project's feed.

    The positions come from the project's feed_positions row, whose lock is held until
    commit; see migration 0003 for why that makes the feed safe to read by position."""
    # Arrays rather than VALUES: a VALUES list has no cache key, so the whole statement
    # would be compiled again for every batch (a quarter of a batch's Python time).
    info = (
        func.unnest(
            literal([seg.id for seg in tracked], tables.UUID_ARRAY),
            literal([slugify(seg.name) for seg in tracked], ARRAY(Text)),
            literal([seg.name for seg in tracked], ARRAY(Text)),
        )
        .table_valued(
            column("segment_id", Uuid), column("slug", Text), column("segment_name", Text)
        )
        .render_derived(name="tracked", with_types=False)
    )
    named = (
        select(
            changes.c.contact_id,
            func.concat("segment.", info.c.slug, ".", changes.c.kind).label("name"),
            func.jsonb_build_object(
                "segmentId",
                func.cast(info.c.segment_id, Text),
                "segmentName",
                info.c.segment_name,
                type_=JSONB,
            ).label("data"),
            # Deterministic order of the events one transaction records.
            func.row_number()
            .over(order_by=(changes.c.segment_id, changes.c.kind, changes.c.contact_id))
            .label("n"),
        )
        .join_from(changes, info, info.c.segment_id == changes.c.segment_id)
        .cte("named")
    )
    f = tables.feed_positions
    allocated = (
        pg_insert(f)
        .from_select(
            ["project_id", "last_seq"],
            # No row (and no lock) when nothing is recorded.
            select(literal(project_id, Uuid), func.count())
            .select_from(named)
            .having(func.count() > 0),
        )
        .on_conflict_do_update(
            index_elements=[f.c.project_id],
            set_={"last_seq": f.c.last_seq + pg_insert(f).excluded.last_seq},
        )
        .returning(f.c.last_seq)
        .cte("allocated")
    )
    total = select(func.count()).select_from(named).scalar_subquery()
    e = tables.events
    return (
        insert(e)
        .from_select(
            ["project_id", "contact_id", "name", "data", "occurred_at", "feed_seq"],
            select(
                literal(project_id, Uuid),
                named.c.contact_id,
                named.c.name,
                named.c.data,
                func.now(),
                allocated.c.last_seq - total + named.c.n,
            )
            .select_from(named)
            .join(allocated, literal(True))
            .order_by(named.c.n),
        )
        .returning(e.c.id)
        .cte("recorded")
    )
